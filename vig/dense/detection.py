"""Mask R-CNN (torchvision) on a ViG backbone: dense adapter -> FPN (+ LastLevelMaxPool) -> RPN / RoI heads.

Labels are COCO category ids used directly as class indices (torchvision's COCO convention:
`num_classes` = largest category id + 1, index 0 = background), so predictions need no id map.
Mask R-CNN's own transform resizes keeping the ratio (short side `min_size`, long side <= `max_size`),
normalises with `image_mean` / `image_std` and pads the batch to a multiple of 32.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from vig.dense.backbones import HierViGFeatures, PlainViGFeatures, create_dense_features

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class MaskRCNNConfig:
    """The detector around the trunk (defaults: the paper-scale COCO setting); `finetune_det.model` in params."""

    pyramid_strides: tuple[int, ...] = (4, 8, 16, 32)
    fpn_channels: int = 256
    # One tuple of anchor sizes per FPN level, the extra max-pooled level included.
    anchor_sizes: tuple[tuple[int, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    min_size: int | tuple[int, ...] = 800
    max_size: int = 1333
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD
    box_head_dim: int = 1024
    mask_head_dim: int = 256
    mask_head_convs: int = 4
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    box_detections_per_img: int = 100
    box_score_thresh: float = 0.05


class BackboneWithFPN(nn.Module):
    """Dense ViG features -> torchvision FPN; `out_channels` is the single int torchvision detection wants."""

    def __init__(self, features: PlainViGFeatures | HierViGFeatures, out_channels: int) -> None:
        super().__init__()
        self.body = features
        # LayerNorm in the FPN's lateral and output convs, as ViTDet does after its pyramid.
        self.fpn = FeaturePyramidNetwork(
            features.out_channels, out_channels, extra_blocks=LastLevelMaxPool(), norm_layer=LayerNorm2d
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def build_maskrcnn(
    trunk: str,
    trunk_kwargs: dict[str, Any],
    num_classes: int,
    config: MaskRCNNConfig,
    trunk_state_dict: dict[str, torch.Tensor] | None = None,
) -> MaskRCNN:
    """Mask R-CNN on the timm ViG `trunk`; anchors and RoI pools follow the pyramid keys "0".."n-1"
    (+ the FPN's max-pooled "pool" level for anchors). `num_classes` counts the background."""
    features = create_dense_features(
        trunk, trunk_kwargs, out_strides=config.pyramid_strides, trunk_state_dict=trunk_state_dict
    )
    backbone = BackboneWithFPN(features, config.fpn_channels)
    level_names = [str(i) for i in range(len(features.out_channels))]
    if len(config.anchor_sizes) != len(level_names) + 1:
        raise ValueError(
            f"anchor_sizes has {len(config.anchor_sizes)} entries but the FPN has {len(level_names) + 1} levels "
            f"({len(level_names)} backbone levels + the max-pooled one): give one list of sizes per level"
        )
    anchors = AnchorGenerator(
        sizes=tuple(tuple(s) for s in config.anchor_sizes),
        aspect_ratios=(tuple(config.aspect_ratios),) * len(config.anchor_sizes),
    )
    box_pool = MultiScaleRoIAlign(featmap_names=level_names, output_size=7, sampling_ratio=2)
    mask_pool = MultiScaleRoIAlign(featmap_names=level_names, output_size=14, sampling_ratio=2)
    mask_layers = (config.mask_head_dim,) * config.mask_head_convs
    min_size = tuple(config.min_size) if isinstance(config.min_size, Sequence) else config.min_size
    return MaskRCNN(
        backbone,
        num_classes=None,  # set through the box and mask predictors below
        min_size=min_size,
        max_size=config.max_size,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=config.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=config.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=config.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=config.rpn_post_nms_top_n_test,
        box_roi_pool=box_pool,
        box_head=TwoMLPHead(config.fpn_channels * 7 * 7, config.box_head_dim),
        box_predictor=FastRCNNPredictor(config.box_head_dim, num_classes),
        box_batch_size_per_image=config.box_batch_size_per_image,
        box_detections_per_img=config.box_detections_per_img,
        box_score_thresh=config.box_score_thresh,
        mask_roi_pool=mask_pool,
        mask_head=MaskRCNNHeads(config.fpn_channels, mask_layers, dilation=1),
        mask_predictor=MaskRCNNPredictor(mask_layers[-1], mask_layers[-1], num_classes),
    )
