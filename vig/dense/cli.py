"""Command line shared by the dense-prediction stages: `--params FILE` (another params file, e.g. one holding a
paper-scale section from pipelines/coco/ or pipelines/ade20k/) and, for fine-tuning, `--backend`."""
from __future__ import annotations

import argparse
from typing import Any

from vig.engine.config import BACKENDS
from vig.params import load_params


def stage_params(
    section: str, doc: str, argv: list[str] | None, backend_flag: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the whole params file, its `section` with the command-line overrides applied)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", help="params file to read instead of params.yaml")
    if backend_flag:
        parser.add_argument("--backend", choices=BACKENDS, help=f"override {section}.backend")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if section not in params:
        raise SystemExit(f"{args.params or 'params.yaml'} has no `{section}` section")
    overrides = {"backend": args.backend} if backend_flag and args.backend else {}
    return params, {**params[section], **overrides}
