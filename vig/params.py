"""Reading params.yaml and locating the project root (stages run from it; Ray workers do not)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

ROOT_ENV = "VIG_ROOT"


def project_root() -> Path:
    """The folder holding dvc.yaml: $VIG_ROOT if set (Ray workers run in another cwd), else the nearest parent."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").exists():
            return folder
    return here


def load_params(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The whole params file (default: params.yaml at the project root)."""
    path = Path(path) if path is not None else project_root() / "params.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run from the project root or set {ROOT_ENV}")
    with open(path) as f:
        return yaml.safe_load(f) or {}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are kept as values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
