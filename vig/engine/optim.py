"""Optimizer and schedule of the DeiT/Swin recipe: AdamW with linearly scaled learning rates, no weight decay
on position embeddings / norms / biases, and a per-step cosine schedule with a linear warmup prefix."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from vig.engine.config import OptimConfig


@dataclass(frozen=True)
class ScaledLRs:
    """Peak, warmup-start and final learning rates for one global batch size."""

    peak: float
    warmup: float
    minimum: float


def global_batch(config: OptimConfig, world_size: int) -> int:
    """Images per optimizer step: per-worker batch x workers x accumulation steps."""
    return config.batch_size * world_size * config.accumulation_steps


def scaled_lrs(config: OptimConfig, world_size: int) -> ScaledLRs:
    """The linear scaling rule, applied alike to the peak, warmup and minimum learning rates."""
    factor = global_batch(config, world_size) / config.lr_reference_batch
    return ScaledLRs(config.base_lr * factor, config.warmup_lr * factor, config.min_lr * factor)


def build_optimizer(model: nn.Module, config: OptimConfig, lrs: ScaledLRs) -> torch.optim.Optimizer:
    """AdamW; timm's parameter grouping exempts model.no_weight_decay() names and every tensor with ndim <= 1."""
    return create_optimizer_v2(
        model,
        "adamw",
        lr=lrs.peak,
        weight_decay=config.weight_decay,
        filter_bias_and_bn=True,
        betas=tuple(config.betas),
        eps=config.eps,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, lrs: ScaledLRs, steps_per_epoch: int
) -> CosineLRScheduler:
    """Cosine decay over (epochs - warmup_epochs) epochs after a linear warmup, counted in optimizer steps.

    Drive it with `scheduler.step_update(steps_done)`: the learning rate of step n + 1 (1-based) is
    warmup + n (peak - warmup) / W while n < W = warmup_epochs x steps_per_epoch, then
    min + (peak - min) (1 + cos(pi (n - W) / T)) / 2 with T = (epochs - warmup_epochs) x steps_per_epoch.
    """
    return CosineLRScheduler(
        optimizer,
        t_initial=(config.epochs - config.warmup_epochs) * steps_per_epoch,
        lr_min=lrs.minimum,
        warmup_t=config.warmup_epochs * steps_per_epoch,
        warmup_lr_init=lrs.warmup,
        warmup_prefix=True,
        cycle_limit=1,
        t_in_epochs=False,
    )
