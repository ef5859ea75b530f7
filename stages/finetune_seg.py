"""`python -m stages.finetune_seg`: fine-tune UperNet with the pretrained ViG trunk on the segmentation shards.

Reads params.yaml's `finetune_seg` section (`--params FILE` reads another params file, e.g. one with the
paper-scale section of pipelines/ade20k/; `--backend local` runs in this process without Ray). Initial
weights come from the pretrain stage's best.pt by default. Outputs: checkpoints/finetune_seg/model.pt
(weights + model config + class names) and metrics/finetune_seg.json; per-step losses, the weights, a
picture of predicted label maps next to the ground truth and the metrics go to the stage's MLflow run. An
interrupted run resumes from its last checkpoint when started again with unchanged params.
"""
from __future__ import annotations

import os

from vig.dense.cli import stage_params
from vig.dense.config import FinetuneSegConfig, load_section
from vig.dense.seg_finetune import SECTION, finetune_segmentation
from vig.params import project_root
from vig.tracking import PIPELINE_ID_ENV, pipeline_id, stage_run


def main(argv: list[str] | None = None) -> None:
    params, section = stage_params(SECTION, __doc__, argv, backend_flag=True)
    config = load_section(FinetuneSegConfig, section, SECTION, project_root())
    os.environ.setdefault(PIPELINE_ID_ENV, pipeline_id())  # the workers tag the same pipeline as this run
    with stage_run(SECTION, section, experiment=params.get("experiment")) as run:
        metrics = finetune_segmentation(config, run.info.run_id)
    print(f"{SECTION}: {metrics['steps']} steps, final train loss {metrics['final_train_loss']:.4f}")


if __name__ == "__main__":
    main()
