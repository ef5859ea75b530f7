"""Mask R-CNN fine-tuning on the detection shards (`finetune_det` stage): the COCO 1x recipe by default
(AdamW, lr steps at epochs 8 and 11 after a linear warmup, flip augmentation, 1333x800 resizing inside
the model). See vig.dense.engine for the loop, checkpoints, resume and outputs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.scheduler import MultiStepLRScheduler
from torch import nn

from vig.dense.config import FinetuneDetConfig
from vig.dense.data import DenseShards
from vig.dense.detection import build_maskrcnn
from vig.dense.engine import DenseFinetuning, launch, make_session
from vig.dense.evaluation import detection_picture
from vig.dense.transforms import detection_transform
from vig.dense.visualize import save_png
from vig.engine.config import from_dict
from vig.engine.run_log import RunLog

SECTION = "finetune_det"
PREVIEW_SCORE_THRESH = 0.5


class DetectionFinetuning(DenseFinetuning):
    section = SECTION

    def setup_data(self) -> None:
        self.shards = DenseShards(self.config.data, "detection", self.session.world_size)
        self.class_names = {int(i): name for name, i in self.shards.class_index.items()}
        self.num_classes = max(self.class_names) + 1  # category ids used as class indices; 0 = background
        self.train_samples = self.shards.train_samples
        self.transform = detection_transform(self.config.hflip_prob)

    def planned_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch

    def build_model(
        self, trunk: str, trunk_kwargs: dict[str, Any], trunk_weights: dict[str, torch.Tensor] | None
    ) -> nn.Module:
        return build_maskrcnn(trunk, trunk_kwargs, self.num_classes, self.config.model, trunk_weights)

    def build_scheduler(self) -> MultiStepLRScheduler:
        optim = self.config.optim
        return MultiStepLRScheduler(
            self.optimizer,
            decay_t=[epoch * self.steps_per_epoch for epoch in self.config.lr_steps],
            decay_rate=self.config.lr_decay,
            warmup_t=optim.warmup_iters,
            warmup_lr_init=optim.lr * optim.warmup_ratio,
            warmup_prefix=False,  # mmdet: the warmup overlaps the first steps; milestones count from step 0
            t_in_epochs=False,
        )

    def train_batches(self, num_batches: int, seed: int) -> Any:
        return self.shards.train_batches(self.transform, self.config.optim.batch_size, num_batches, seed)

    def losses(self, batch: tuple[list[torch.Tensor], list[dict[str, Any]]]) -> dict[str, torch.Tensor]:
        images, targets = batch
        return self.ddp(images, targets)

    def weights_extra(self) -> dict[str, Any]:
        return {"class_names": self.class_names}

    def preview(self, path: Path) -> None:
        samples = self.shards.val_head(None, self.config.data.preview_images)
        save_png(detection_picture(self.model, samples, self.class_names, self.device, PREVIEW_SCORE_THRESH), path)


def detection_worker(loop_config: dict[str, Any]) -> None:
    """Per-worker entry point: Ray Train's train_loop_per_worker, or called directly with backend local."""
    config = from_dict(FinetuneDetConfig, loop_config[SECTION], SECTION)
    session = make_session(config)
    run_log = RunLog(loop_config.get("mlflow_run_id") if session.rank == 0 else None)
    DetectionFinetuning(config, session, run_log).run()


def finetune_detection(config: FinetuneDetConfig, mlflow_run_id: str | None = None) -> dict[str, Any]:
    """Run (or resume) Mask R-CNN fine-tuning; returns the summary metrics also written to `config.metrics`."""
    return launch(config, SECTION, detection_worker, mlflow_run_id)
