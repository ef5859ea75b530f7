"""`python -m pipelines.imagenet MODEL [--imagenet PATH] [--target STAGE] [--write FILE] [--dry-run] [-- DVC ARGS]`

Runs the paper-scale ImageNet-1K pretraining + evaluation of MODEL (vig_tiny, vig_small, vig_base, vig_h_tiny,
vig_h_small, vig_h_base) as the DVC experiment `imagenet-MODEL`:

    dvc exp run -n imagenet-MODEL --set-param ... TARGET

with the sections of pipelines/imagenet/recipe.yaml + MODEL.yaml replacing params.yaml's, and
data.imagenet set to --imagenet. `--write FILE` instead writes the complete params file, for running the
stages without DVC: `python -m stages.pretrain --params FILE` (e.g. inside a SLURM job from vig-submit).
"""
from __future__ import annotations

from typing import Any

from pipelines.recipes import RECIPE_SETS


def models() -> list[str]:
    return RECIPE_SETS["imagenet"].names()


def load_variant(model: str) -> dict[str, Any]:
    """recipe.yaml deep-merged with `<model>.yaml`."""
    return RECIPE_SETS["imagenet"].load(model)
