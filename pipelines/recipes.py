"""Paper-scale recipes: YAML files whose top-level sections replace params.yaml's, run as DVC experiments.

A recipe's sections replace the same-named sections of params.yaml; everything else stays. It runs as a
DVC experiment: `dvc exp run --set-param` writes the values into params.yaml for the run and records them
with the experiment, so `dvc exp show` compares recipes. `python -m pipelines.imagenet|coco|ade20k` run
`main` over their own folders (RECIPE_SETS).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vig.params import flatten, load_params, project_root

PIPELINES_DIR = Path(__file__).parent


@dataclass(frozen=True)
class RecipeSet:
    """The paper-scale recipes of one dataset: the YAML files of pipelines/<dataset>/."""

    dataset: str  # also the params.yaml data key of its root and the folder name
    last_stage: str  # what `dvc exp run` runs up to by default
    base: str | None = None  # a file every recipe is merged over, not a recipe itself

    @property
    def folder(self) -> Path:
        return PIPELINES_DIR / self.dataset

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.yaml") if p.stem != self.base)

    def load(self, name: str) -> dict[str, Any]:
        """`<name>.yaml`, deep-merged over the base file when the set has one."""
        if name not in self.names():
            raise ValueError(f"no {self.dataset} recipe {name!r}; choose one of {', '.join(self.names())}")
        recipe = yaml.safe_load((self.folder / f"{name}.yaml").read_text())
        if self.base is None:
            return recipe
        return merge(yaml.safe_load((self.folder / f"{self.base}.yaml").read_text()), recipe)


RECIPE_SETS = {
    recipes.dataset: recipes
    for recipes in (
        RecipeSet("imagenet", "evaluate", base="recipe"),
        RecipeSet("coco", "evaluate_det"),
        RecipeSet("ade20k", "evaluate_seg"),
    )
}


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = merge(merged[key], value) if both_dicts else value
    return merged


def replace_sections(params: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
    """params with each of the recipe's top-level entries replacing its namesake."""
    return {**params, **copy.deepcopy(recipe)}


def set_param_overrides(params: dict[str, Any], recipe: dict[str, Any]) -> list[str]:
    """`dvc exp run --set-param` values (Hydra override grammar) that turn `params` into replace_sections(...).

    Every leaf of the recipe is set (`++` adds or overrides), and every leaf the replaced sections have
    in params but not in the recipe is deleted (`~`), since Hydra merges mappings instead of replacing them.
    """
    wanted = flatten(recipe)
    stale = [k for k in flatten({name: params[name] for name in recipe if name in params}) if k not in wanted]
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


def main(dataset: str, argv: list[str] | None = None) -> int:
    """`python -m pipelines.<dataset> RECIPE [--<dataset> ROOT] [--target STAGE] [--write FILE] [--dry-run]`:
    the recipe as the DVC experiment `<dataset>-<recipe>` (or its complete params file, for running stages
    without DVC, e.g. `python -m stages.pretrain --params FILE` in a SLURM job). Usage text: the package's
    docstring."""
    from pipelines.repro import pipeline_env

    recipes = RECIPE_SETS[dataset]
    parser = argparse.ArgumentParser(prog=f"python -m pipelines.{dataset}",
                                     description=importlib.import_module(f"pipelines.{dataset}").__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("recipe", choices=recipes.names())
    parser.add_argument(f"--{dataset}", dest="root", help=f"the {dataset} dataset root: sets data.{dataset}")
    parser.add_argument("--target", default=recipes.last_stage,
                        help=f"last stage to run (default: {recipes.last_stage})")
    parser.add_argument("--write", metavar="FILE", help="write the complete params file instead of running DVC")
    parser.add_argument("--dry-run", action="store_true", help="print the dvc command instead of running it")
    parser.add_argument("dvc_args", nargs="*", help="more `dvc exp run` arguments (after --)")
    args = parser.parse_args(argv)

    recipe = recipes.load(args.recipe)
    params = load_params()
    if args.root:
        recipe["data"] = {**params.get("data", {}), dataset: args.root}
    if args.write:
        with open(args.write, "w") as f:
            yaml.safe_dump(replace_sections(params, recipe), f, sort_keys=False)
        print(f"wrote {args.write}: run its stages with `python -m stages.<stage> --params {args.write}`")
        return 0
    command = [sys.executable, "-m", "dvc", "exp", "run", "-n", f"{dataset}-{args.recipe}"]
    for override in set_param_overrides(params, recipe):
        command += ["--set-param", override]
    command += [*args.dvc_args, args.target]
    if args.dry_run:
        print(shlex.join(command))
        return 0
    return subprocess.call(command, cwd=project_root(), env=pipeline_env())
