"""UperNet fine-tuning on the segmentation shards (`finetune_seg` stage): the ADE20K 160k recipe by default
(AdamW, linear warmup then poly decay per iteration, random rescale 0.5-2.0 + 512x512 crop + flip +
photometric distortion). See vig.dense.engine for the loop, checkpoints, resume and outputs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.scheduler import PolyLRScheduler
from torch import nn

from vig.dense.config import FinetuneSegConfig
from vig.dense.data import DenseShards, ReduceZeroLabel
from vig.dense.engine import DenseFinetuning, launch, make_session
from vig.dense.evaluation import segmentation_picture, segmentation_transform
from vig.dense.segmentation import UperNetSegmentor
from vig.dense.transforms import segmentation_train_transform
from vig.dense.visualize import save_png
from vig.engine.config import from_dict
from vig.engine.run_log import RunLog

SECTION = "finetune_seg"


class SegmentationFinetuning(DenseFinetuning):
    section = SECTION

    def setup_data(self) -> None:
        config = self.config
        self.shards = DenseShards(config.data, "segmentation", self.session.world_size)
        names = sorted(self.shards.class_index, key=self.shards.class_index.get)
        if config.reduce_zero_label:
            names = names[1:]  # label 0 is ignored, 1..K become classes 0..K-1
        self.class_names = names
        self.num_classes = len(names)
        self.train_samples = self.shards.train_samples
        transform = segmentation_train_transform(
            config.scale, config.ratio_range, config.crop_size, config.hflip_prob, config.photometric
        )
        self.transform = ReduceZeroLabel(transform) if config.reduce_zero_label else transform
        self.val_transform = segmentation_transform(config.reduce_zero_label)

    def planned_steps(self) -> int:
        return self.config.iterations

    def build_model(
        self, trunk: str, trunk_kwargs: dict[str, Any], trunk_weights: dict[str, torch.Tensor] | None
    ) -> nn.Module:
        model = UperNetSegmentor(trunk, trunk_kwargs, self.num_classes, self.config.model, trunk_weights)
        if self.device.type == "cuda" and self.session.world_size > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the paper setting: SyncBN over all GPUs
        return model

    def build_scheduler(self) -> PolyLRScheduler:
        optim = self.config.optim
        return PolyLRScheduler(
            self.optimizer,
            t_initial=self.config.iterations,
            power=self.config.poly_power,
            lr_min=self.config.min_lr,
            warmup_t=optim.warmup_iters,
            warmup_lr_init=optim.lr * optim.warmup_ratio,
            warmup_prefix=False,
            t_in_epochs=False,
        )

    def train_batches(self, num_batches: int, seed: int) -> Any:
        return self.shards.train_batches(self.transform, self.config.optim.batch_size, num_batches, seed)

    def losses(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch
        return self.ddp(images, labels)

    def weights_extra(self) -> dict[str, Any]:
        return {"class_names": self.class_names, "reduce_zero_label": self.config.reduce_zero_label}

    def preview(self, path: Path) -> None:
        samples = self.shards.val_head(self.val_transform, self.config.data.preview_images)
        save_png(segmentation_picture(self.model, samples, self.device, self.config.scale), path)


def segmentation_worker(loop_config: dict[str, Any]) -> None:
    """Per-worker entry point: Ray Train's train_loop_per_worker, or called directly with backend local."""
    config = from_dict(FinetuneSegConfig, loop_config[SECTION], SECTION)
    session = make_session(config)
    run_log = RunLog(loop_config.get("mlflow_run_id") if session.rank == 0 else None)
    SegmentationFinetuning(config, session, run_log).run()


def finetune_segmentation(config: FinetuneSegConfig, mlflow_run_id: str | None = None) -> dict[str, Any]:
    """Run (or resume) UperNet fine-tuning; returns the summary metrics also written to `config.metrics`."""
    return launch(config, SECTION, segmentation_worker, mlflow_run_id)
