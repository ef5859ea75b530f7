"""`python -m stages.finetune_det`: fine-tune Mask R-CNN with the pretrained ViG trunk on the detection shards.

Reads params.yaml's `finetune_det` section (initial weights from the pretrain stage's best.pt by default).
Outputs: checkpoints/finetune_det/model.pt (weights + model config) and metrics/finetune_det.json; per-step
losses, the weights, a picture of predictions on val images and the metrics go to the stage's MLflow run.
An interrupted run resumes from its last checkpoint when started again with unchanged params.
"""
from __future__ import annotations

from vig.dense.config import FinetuneDetConfig, load_section
from vig.dense.det_finetune import SECTION, finetune_detection
from vig.params import load_params, project_root
from vig.tracking import stage_run


def main() -> None:
    params = load_params()[SECTION]
    config = load_section(FinetuneDetConfig, params, SECTION, project_root())
    with stage_run(SECTION, params) as run:
        metrics = finetune_detection(config, run.info.run_id)
    print(f"{SECTION}: {metrics['steps']} steps, final train loss {metrics['final_train_loss']:.4f}")


if __name__ == "__main__":
    main()
