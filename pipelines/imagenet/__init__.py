"""Paper-scale ImageNet-1K pretraining variants: `recipe.yaml` (shared) merged with one model file.

A variant's sections replace the same-named sections of params.yaml; everything else (data, shard, the
fine-tuning stages...) stays. It runs as a DVC experiment: `dvc exp run --set-param` writes the values into
params.yaml for the run and records them with the experiment, so `dvc exp show` compares variants.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from vig.params import flatten

VARIANT_DIR = Path(__file__).parent
RECIPE = VARIANT_DIR / "recipe.yaml"


def models() -> list[str]:
    return sorted(p.stem for p in VARIANT_DIR.glob("*.yaml") if p != RECIPE)


def load_variant(model: str) -> dict[str, Any]:
    """recipe.yaml deep-merged with `<model>.yaml`."""
    path = VARIANT_DIR / f"{model}.yaml"
    if not path.is_file():
        raise ValueError(f"no ImageNet variant {model!r}; choose one of {', '.join(models())}")
    return _merge(yaml.safe_load(RECIPE.read_text()), yaml.safe_load(path.read_text()))


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_dicts else value
    return merged


def replace_sections(params: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
    """params with each of the variant's top-level entries replacing its namesake."""
    return {**params, **copy.deepcopy(variant)}


def set_param_overrides(params: dict[str, Any], variant: dict[str, Any]) -> list[str]:
    """`dvc exp run --set-param` values (Hydra override grammar) that turn `params` into replace_sections(...).

    Every leaf of the variant is set (`++` adds or overrides), and every leaf the replaced sections have
    in params but not in the variant is deleted (`~`), since Hydra merges mappings instead of replacing them.
    """
    wanted = flatten(variant)
    stale = [k for k in flatten({name: params[name] for name in variant if name in params}) if k not in wanted]
    return [f"++{key}={_hydra_value(value)}" for key, value in wanted.items()] + [f"~{key}" for key in stale]


def _hydra_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot express {value!r} as a --set-param value")
