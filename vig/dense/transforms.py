"""Joint image / target augmentation for dense tasks with torchvision.transforms.v2 (boxes, masks and
label maps follow the image; the shard readers hand over tv_tensors).

Detection only flips here: Mask R-CNN's own `GeneralizedRCNNTransform` resizes keeping the aspect
ratio (short side `min_size`, long side at most `max_size`), normalises and pads, in training and
evaluation alike, and maps predictions back to the original image size.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from vig.dense.segmentation import IGNORE_INDEX


class DropCrowd:
    """COCO crowd annotations (iscrowd=1) mark regions of many instances, not instances: no training targets."""

    PER_OBJECT = ("boxes", "labels", "masks", "area", "iscrowd")

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        keep = target["iscrowd"] == 0
        if bool(keep.all()):
            return image, target
        kept = dict(target)
        for key in self.PER_OBJECT:
            value = target[key][keep]
            is_tv_tensor = isinstance(target[key], tv_tensors.TVTensor)
            kept[key] = tv_tensors.wrap(value, like=target[key]) if is_tv_tensor else value
        return image, kept


def detection_transform(hflip_prob: float = 0.5) -> v2.Transform:
    """Training (image, target) -> float [0, 1] image and target without crowd regions, randomly flipped;
    degenerate boxes dropped."""
    return v2.Compose([
        DropCrowd(), v2.RandomHorizontalFlip(hflip_prob), v2.ToDtype(torch.float32, scale=True),
        v2.SanitizeBoundingBoxes(),
    ])  # fmt: skip


def reduce_zero_label(label: torch.Tensor) -> torch.Tensor:
    """ADE20K convention: label 0 ("other") is ignored and 1..K become 0..K-1."""
    reduced = label.long() - 1
    reduced[label == 0] = IGNORE_INDEX
    reduced[label == IGNORE_INDEX] = IGNORE_INDEX
    return reduced


def fit_size(height: int, width: int, scale: Sequence[float]) -> list[int]:
    """mmseg's keep-ratio rescale: the image's ratio, long edge <= max(scale), short edge <= min(scale)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return [int(height * factor + 0.5), int(width * factor + 0.5)]


class RandomRatioRescale(v2.Transform):
    """mmseg's `Resize(scale, ratio_range, keep_ratio=True)`: rescale to fit `scale` x r, r ~ U(ratio_range)
    (bilinear for images, nearest for label maps)."""

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float]) -> None:
        super().__init__()
        self.scale = tuple(scale)
        self.ratio_range = tuple(ratio_range)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        ratio = float(torch.empty(()).uniform_(*self.ratio_range))
        return {"size": fit_size(height, width, [s * ratio for s in self.scale])}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(v2.functional.resize, inpt, params["size"], antialias=True)


def segmentation_train_transform(
    scale: Sequence[int],
    ratio_range: Sequence[float],
    crop_size: Sequence[int],
    hflip_prob: float = 0.5,
    photometric: bool = True,
) -> v2.Transform:
    """mmseg's ADE20K training pipeline: random ratio rescale, random crop to `crop_size` (padding the image
    with 0 and the label with 255 where it is smaller), flip, SSD-style photometric distortion.
    (mmseg's `cat_max_ratio` crop retry is not reproduced.)"""
    steps: list[v2.Transform] = [
        RandomRatioRescale(scale, ratio_range),
        v2.RandomCrop(
            tuple(crop_size), pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
        ),
        v2.RandomHorizontalFlip(hflip_prob),
    ]
    if photometric:
        steps.append(v2.RandomPhotometricDistort())
    steps.append(v2.ToDtype(torch.float32, scale=True))  # a dtype, not a dict: converts the image only
    return v2.Compose(steps)
