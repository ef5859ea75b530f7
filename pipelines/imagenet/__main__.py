"""`python -m pipelines.imagenet MODEL [--imagenet PATH] [--target STAGE] [--dry-run] [-- DVC ARGS]`

Runs the paper-scale ImageNet-1K pretraining + evaluation of MODEL (vig_tiny, vig_small, vig_base, vig_h_tiny,
vig_h_small, vig_h_base) as the DVC experiment `imagenet-MODEL`:

    dvc exp run -n imagenet-MODEL --set-param ... TARGET

with the sections of pipelines/imagenet/recipe.yaml + MODEL.yaml replacing params.yaml's, and
data.imagenet set to --imagenet. `--write FILE` instead writes the complete params file, for running the
stages without DVC: `python -m stages.pretrain --params FILE` (e.g. inside a SLURM job from vig-submit).
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

import yaml

from pipelines.imagenet import load_variant, models, replace_sections, set_param_overrides
from pipelines.repro import pipeline_env
from vig.params import load_params, project_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=models())
    parser.add_argument("--imagenet", help="ImageNet root (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG): sets data.imagenet")
    parser.add_argument("--target", default="evaluate", help="last stage to run (default: evaluate)")
    parser.add_argument("--write", metavar="FILE", help="write the complete params file instead of running DVC")
    parser.add_argument("--dry-run", action="store_true", help="print the dvc command instead of running it")
    parser.add_argument("dvc_args", nargs="*", help="more `dvc exp run` arguments (after --)")
    args = parser.parse_args(argv)

    variant = load_variant(args.model)
    params = load_params()
    if args.imagenet:
        variant["data"] = {**params.get("data", {}), "imagenet": args.imagenet}
    if args.write:
        with open(args.write, "w") as f:
            yaml.safe_dump(replace_sections(params, variant), f, sort_keys=False)
        print(f"wrote {args.write}: python -m stages.pretrain --params {args.write}")
        return 0
    command = [sys.executable, "-m", "dvc", "exp", "run", "-n", f"imagenet-{args.model}"]
    for override in set_param_overrides(params, variant):
        command += ["--set-param", override]
    command += [*args.dvc_args, args.target]
    if args.dry_run:
        print(shlex.join(command))
        return 0
    return subprocess.call(command, cwd=project_root(), env=pipeline_env())


if __name__ == "__main__":
    sys.exit(main())
