"""`python -m stages.finetune_det`: fine-tune Mask R-CNN with the pretrained ViG trunk on the detection shards.

Reads params.yaml's `finetune_det` section (`--params FILE` reads another params file, e.g. one with the
paper-scale section of pipelines/coco/; `--backend local` runs in this process without Ray). Initial weights
come from the pretrain stage's best.pt by default. Outputs: checkpoints/finetune_det/model.pt (weights +
model config) and metrics/finetune_det.json; per-step losses, the weights, a picture of predictions on val
images and the metrics go to the stage's MLflow run. An interrupted run resumes from its last checkpoint
when started again with unchanged params.
"""
from __future__ import annotations

import os

from vig.dense.cli import stage_params
from vig.dense.config import FinetuneDetConfig, load_section
from vig.dense.det_finetune import SECTION, finetune_detection
from vig.params import project_root
from vig.tracking import PIPELINE_ID_ENV, pipeline_id, stage_run


def main(argv: list[str] | None = None) -> None:
    params, section = stage_params(SECTION, __doc__, argv, backend_flag=True)
    config = load_section(FinetuneDetConfig, section, SECTION, project_root())
    os.environ.setdefault(PIPELINE_ID_ENV, pipeline_id())  # the workers tag the same pipeline as this run
    with stage_run(SECTION, section, experiment=params.get("experiment")) as run:
        metrics = finetune_detection(config, run.info.run_id)
    print(f"{SECTION}: {metrics['steps']} steps, final train loss {metrics['final_train_loss']:.4f}")


if __name__ == "__main__":
    main()
