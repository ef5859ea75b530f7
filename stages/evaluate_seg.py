"""`python -m stages.evaluate_seg`: mIoU, mAcc and aAcc of the fine-tuned UperNet on the segmentation val
shards, single scale, with whole-image and sliding-window inference.

Reads params.yaml's `evaluate_seg` section (`--params FILE`: another params file). Outputs:
metrics/evaluate_seg.json (per mode: mIoU, mAcc, aAcc and per-class IoU) and a picture of images,
ground-truth and predicted label maps; both go to the stage's MLflow run.
"""
from __future__ import annotations

import re

import mlflow

from vig.dense.cli import stage_params
from vig.dense.config import EvaluateSegConfig, load_section
from vig.dense.evaluation import evaluate_segmentation
from vig.params import project_root
from vig.tracking import stage_run

SECTION = "evaluate_seg"


def metric_name(class_name: str) -> str:
    """Class names may hold characters MLflow refuses in metric keys (ADE20K's use ';' and ',')."""
    return re.sub(r"[^\w\-. /]", "_", class_name)


def main(argv: list[str] | None = None) -> None:
    params, section = stage_params(SECTION, __doc__, argv, backend_flag=False)
    config = load_section(EvaluateSegConfig, section, SECTION, project_root())
    with stage_run(SECTION, section, experiment=params.get("experiment")):
        metrics = evaluate_segmentation(config)
        for mode in config.modes:
            mlflow.log_metrics({f"{mode}/{k}": metrics[mode][k] for k in ("mIoU", "mAcc", "aAcc")})
            per_class = metrics[mode]["IoU"].items()
            mlflow.log_metrics({f"{mode}/IoU/{metric_name(name)}": v for name, v in per_class if v is not None})
        mlflow.log_artifact(config.metrics, "metrics")
        mlflow.log_artifact(config.plot, "plots")
    print(f"{SECTION}: " + ", ".join(f"{mode} mIoU {metrics[mode]['mIoU']:.3f}" for mode in config.modes))


if __name__ == "__main__":
    main()
