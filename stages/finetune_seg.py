"""`python -m stages.finetune_seg`: fine-tune UperNet with the pretrained ViG trunk on the segmentation shards.

Reads params.yaml's `finetune_seg` section (initial weights from the pretrain stage's best.pt by default).
Outputs: checkpoints/finetune_seg/model.pt (weights + model config + class names) and
metrics/finetune_seg.json; per-step losses, the weights, a picture of predicted label maps next to the
ground truth and the metrics go to the stage's MLflow run. An interrupted run resumes from its last
checkpoint when started again with unchanged params.
"""
from __future__ import annotations

from vig.dense.config import FinetuneSegConfig, load_section
from vig.dense.seg_finetune import SECTION, finetune_segmentation
from vig.params import load_params, project_root
from vig.tracking import stage_run


def main() -> None:
    params = load_params()[SECTION]
    config = load_section(FinetuneSegConfig, params, SECTION, project_root())
    with stage_run(SECTION, params) as run:
        metrics = finetune_segmentation(config, run.info.run_id)
    print(f"{SECTION}: {metrics['steps']} steps, final train loss {metrics['final_train_loss']:.4f}")


if __name__ == "__main__":
    main()
