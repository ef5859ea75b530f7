"""Semantic segmentation on a ViG backbone: UperNet decode head + FCN auxiliary head (as mmsegmentation's
UPerHead / FCNHead), whole-image and sliding-window inference."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

from vig.dense.backbones import create_dense_features
from vig.dense.detection import IMAGENET_MEAN, IMAGENET_STD

IGNORE_INDEX = 255


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, norm_layer: Callable[..., nn.Module]) -> nn.Module:
    return Conv2dNormActivation(in_ch, out_ch, kernel, norm_layer=norm_layer, activation_layer=nn.ReLU)


class PyramidPoolingModule(nn.Module):
    """PSPNet pooling: average-pool to each scale, 1x1 conv, upsample back; concatenated with the input."""

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int], norm_layer: Callable[..., nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), _conv_bn_relu(in_channels, channels, 1, norm_layer)) for s in scales
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, *(_resize(branch(x), x.shape[-2:]) for branch in self.branches)], dim=1)


class UperNetHead(nn.Module):
    """UperNet (Xiao et al. 2018): PPM on the coarsest level, top-down FPN fusion, all levels concatenated."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        *fine, coarsest = in_channels
        self.ppm = PyramidPoolingModule(coarsest, channels, pool_scales, norm_layer)
        self.ppm_bottleneck = _conv_bn_relu(coarsest + len(pool_scales) * channels, channels, 3, norm_layer)
        self.laterals = nn.ModuleList(_conv_bn_relu(c, channels, 1, norm_layer) for c in fine)
        self.fpn_convs = nn.ModuleList(_conv_bn_relu(channels, channels, 3, norm_layer) for _ in fine)
        self.fpn_bottleneck = _conv_bn_relu(len(in_channels) * channels, channels, 3, norm_layer)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        *fine, coarsest = features
        levels = [lateral(f) for lateral, f in zip(self.laterals, fine)]
        levels.append(self.ppm_bottleneck(self.ppm(coarsest)))
        for i in range(len(levels) - 1, 0, -1):
            levels[i - 1] = levels[i - 1] + _resize(levels[i], levels[i - 1].shape[-2:])
        outs = [conv(level) for conv, level in zip(self.fpn_convs, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0], *(_resize(o, size) for o in outs[1:])], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """Auxiliary head: conv-BN-ReLU stack on one level, dropout, 1x1 classifier."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        num_convs: int = 1,
        dropout: float = 0.1,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        convs = [_conv_bn_relu(in_channels if i == 0 else channels, channels, 3, norm_layer) for i in range(num_convs)]
        self.convs = nn.Sequential(*convs)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.convs(x)))


@dataclass
class UperNetConfig:
    """The segmenter around the trunk (defaults: the paper-scale ADE20K setting); `finetune_seg.model` in params."""

    pyramid_strides: tuple[int, ...] = (4, 8, 16, 32)
    channels: int = 512
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    aux_channels: int = 256
    aux_level: int = 2
    aux_weight: float = 0.4
    dropout: float = 0.1
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD


class UperNetSegmentor(nn.Module):
    """Backbone -> UperNet (+ FCN aux in training). Takes [0, 1] images, normalises them itself.

    """

    def __init__(
        self,
        trunk: str,
        trunk_kwargs: dict[str, Any],
        num_classes: int,
        config: UperNetConfig,
        trunk_state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= config.aux_level < len(config.pyramid_strides):
            raise ValueError(f"aux_level {config.aux_level} is not one of the {len(config.pyramid_strides)} levels")
        self.config = config
        self.num_classes = num_classes
        self.backbone = create_dense_features(
            trunk, trunk_kwargs, out_strides=config.pyramid_strides, trunk_state_dict=trunk_state_dict
        )
        channels = self.backbone.out_channels
        self.decode_head = UperNetHead(channels, num_classes, config.channels, config.pool_scales, config.dropout)
        self.aux_head = FCNHead(channels[config.aux_level], num_classes, config.aux_channels, 1, config.dropout)
        self.register_buffer("mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.backbone((images - self.mean) / self.std).values())

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Without labels: logits at the input size. With labels ([B, H, W], 255 = ignored): the loss terms,
        cross-entropy of the decode head and `aux_weight` x that of the auxiliary head."""
        features = self._features(images)
        size = images.shape[-2:]
        decode = _resize(self.decode_head(features), size)
        if labels is None:
            return decode
        aux = _resize(self.aux_head(features[self.config.aux_level]), size)
        return {
            "loss_decode": F.cross_entropy(decode, labels, ignore_index=IGNORE_INDEX),
            "loss_aux": self.config.aux_weight * F.cross_entropy(aux, labels, ignore_index=IGNORE_INDEX),
        }


@torch.no_grad()
def slide_logits(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    num_classes: int,
    crop_size: Sequence[int],
    stride: Sequence[int],
) -> torch.Tensor:
    """Sliding-window logits (mmseg's `slide_inference`): overlapping crops, averaged where they overlap.

    Images smaller than the crop are padded for the forward and the padding is cut off again.
    """
    (crop_h, crop_w), (stride_h, stride_w) = crop_size, stride
    batch, _, height, width = images.shape
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    padded = F.pad(images, (0, pad_w, 0, pad_h))
    full_h, full_w = padded.shape[-2:]
    rows = max(full_h - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(full_w - crop_w + stride_w - 1, 0) // stride_w + 1
    logits = images.new_zeros(batch, num_classes, full_h, full_w)
    counts = images.new_zeros(1, 1, full_h, full_w)
    for row in range(rows):
        for col in range(cols):
            y1 = min(row * stride_h, full_h - crop_h)
            x1 = min(col * stride_w, full_w - crop_w)
            crop = padded[:, :, y1 : y1 + crop_h, x1 : x1 + crop_w]
            logits[:, :, y1 : y1 + crop_h, x1 : x1 + crop_w] += model(crop)
            counts[:, :, y1 : y1 + crop_h, x1 : x1 + crop_w] += 1
    return (logits / counts)[:, :, :height, :width]
