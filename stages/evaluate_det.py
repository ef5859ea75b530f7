"""`python -m stages.evaluate_det`: COCO box and mask AP (pycocotools COCOeval) of the fine-tuned Mask R-CNN
on the detection val shards, against the val annotations of the dataset recorded in data/layout.json.

Reads params.yaml's `evaluate_det` section (`--params FILE`: another params file). Outputs:
metrics/evaluate_det.json ({bbox, segm}: AP, AP50, AP75, APs, APm, APl; -1 where a size range has no
ground truth) and a picture of ground truth vs predictions; both, and the COCOeval summary, go to the
stage's MLflow run.
"""
from __future__ import annotations

import mlflow

from vig.dense.cli import stage_params
from vig.dense.config import EvaluateDetConfig, load_section
from vig.dense.evaluation import evaluate_detection
from vig.params import flatten, project_root
from vig.tracking import stage_run

SECTION = "evaluate_det"


def main(argv: list[str] | None = None) -> None:
    params, section = stage_params(SECTION, __doc__, argv, backend_flag=False)
    config = load_section(EvaluateDetConfig, section, SECTION, project_root())
    with stage_run(SECTION, section, experiment=params.get("experiment")):
        metrics = evaluate_detection(config)
        mlflow.log_metrics({key: value for key, value in flatten(metrics).items() if isinstance(value, (int, float))})
        mlflow.log_artifact(config.metrics, "metrics")
        mlflow.log_artifact(config.plot, "plots")
    print(f"{SECTION}: box AP {metrics['bbox']['AP']:.3f} (AP50 {metrics['bbox']['AP50']:.3f}), "
          f"mask AP {metrics['segm']['AP']:.3f} (AP50 {metrics['segm']['AP50']:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
