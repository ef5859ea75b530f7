"""Classification transforms: the DeiT/Swin recipe, built from timm (train/eval transforms, mixup/cutmix, loss).

Every knob is a field of `AugmentConfig`, filled from the `pretrain.augment` section of params.yaml.
The defaults are the released recipe (VIG-SPEC section 2): RandomResizedCrop + flip, RandAugment
rand-m9-mstd0.5-inc1, colour jitter 0.4, random erasing 0.25 (pixel mode), bicubic resizing,
mixup 0.8 / cutmix 1.0 with label smoothing 0.1 (so the loss is a soft-target cross entropy), and
an eval transform that resizes to size / crop_pct and center-crops.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy


@dataclass
class AugmentConfig:
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4
    re_prob: float = 0.25
    re_mode: str = "pixel"
    re_count: int = 1
    interpolation: str = "bicubic"
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    label_smoothing: float = 0.1
    eval_crop_pct: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD

    @property
    def mixes(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0)


def train_transform(config: AugmentConfig, img_size: int) -> Callable:
    """PIL image -> normalised tensor with the training augmentations."""
    return create_transform(
        img_size,
        is_training=True,
        scale=tuple(config.scale),
        ratio=tuple(config.ratio),
        hflip=config.hflip,
        color_jitter=config.color_jitter,
        auto_augment=config.auto_augment,
        interpolation=config.interpolation,
        re_prob=config.re_prob,
        re_mode=config.re_mode,
        re_count=config.re_count,
        mean=tuple(config.mean),
        std=tuple(config.std),
    )


def eval_transform(config: AugmentConfig, img_size: int) -> Callable:
    """PIL image -> normalised tensor: resize to img_size / eval_crop_pct, then center crop img_size."""
    return create_transform(
        img_size,
        is_training=False,
        interpolation=config.interpolation,
        crop_pct=config.eval_crop_pct,
        mean=tuple(config.mean),
        std=tuple(config.std),
    )


def batch_mixer(config: AugmentConfig, num_classes: int) -> Mixup | None:
    """timm Mixup/CutMix applied to whole batches (with label smoothing inside), or None when mixing is off."""
    if not config.mixes:
        return None
    return Mixup(
        mixup_alpha=config.mixup,
        cutmix_alpha=config.cutmix,
        prob=config.mixup_prob,
        switch_prob=config.mixup_switch_prob,
        mode=config.mixup_mode,
        label_smoothing=config.label_smoothing,
        num_classes=num_classes,
    )


def train_criterion(config: AugmentConfig) -> nn.Module:
    """Soft-target cross entropy after mixing; otherwise (label-smoothed) cross entropy on class indices."""
    if config.mixes:
        return SoftTargetCrossEntropy()
    if config.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.label_smoothing)
    return nn.CrossEntropyLoss()
