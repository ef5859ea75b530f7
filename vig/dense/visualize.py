"""Pictures of predictions for MLflow: detections (boxes + masks) over ground truth, and colour label maps
next to the ground truth."""
from __future__ import annotations

import io
import os
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

from vig.atomic import write_bytes
from vig.dense.segmentation import IGNORE_INDEX

_PALETTE_SEED = 0
TILE = 256  # every picture in a grid is fitted into TILE x TILE (keeping its ratio, padded white)


def palette(num_classes: int) -> torch.Tensor:
    """[num_classes + 1, 3] uint8 colours; the last row (black) is for ignored pixels."""
    generator = torch.Generator().manual_seed(_PALETTE_SEED)
    colours = torch.randint(40, 256, (num_classes, 3), generator=generator, dtype=torch.uint8)
    return torch.cat([colours, torch.zeros(1, 3, dtype=torch.uint8)])


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """A float [0, 1] (or uint8) [3, H, W] image as uint8."""
    if image.dtype == torch.uint8:
        return image
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def fit_tile(picture: torch.Tensor, nearest: bool = False) -> torch.Tensor:
    """uint8 [3, H, W] scaled to fit TILE x TILE keeping its ratio, centred on white."""
    height, width = picture.shape[-2:]
    factor = TILE / max(height, width)
    size = [max(1, round(height * factor)), max(1, round(width * factor))]
    mode = InterpolationMode.NEAREST if nearest else InterpolationMode.BILINEAR
    picture = TF.resize(picture, size, interpolation=mode, antialias=not nearest)
    top, left = (TILE - size[0]) // 2, (TILE - size[1]) // 2
    canvas = torch.full((3, TILE, TILE), 255, dtype=torch.uint8)
    canvas[:, top : top + size[0], left : left + size[1]] = picture
    return canvas


def draw_detections(
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: Sequence[str],
    masks: torch.Tensor | None,
    colours: Sequence[tuple[int, int, int]],
) -> torch.Tensor:
    """uint8 [3, H, W] with the boolean [N, H, W] masks filled (translucent) and the boxes outlined and named."""
    canvas = to_uint8(image.cpu())
    if masks is not None and len(masks):
        canvas = draw_segmentation_masks(canvas, masks.cpu().bool(), alpha=0.45, colors=list(colours))
    if len(boxes):
        canvas = draw_bounding_boxes(canvas, boxes.cpu(), labels=list(labels), colors=list(colours), width=1)
    return canvas


def detection_preview(
    images: Sequence[torch.Tensor],
    targets: Sequence[dict[str, torch.Tensor]],
    predictions: Sequence[dict[str, torch.Tensor]],
    class_names: dict[int, str],
    score_thresh: float,
    mask_threshold: float = 0.5,
) -> torch.Tensor:
    """Grid: top row ground truth, bottom row predictions scoring at least `score_thresh` (name + score)."""
    colours = palette(max(class_names) + 1)
    ground_truth, predicted = [], []
    for image, target, prediction in zip(images, targets, predictions):
        labels = target["labels"].tolist()
        ground_truth.append(fit_tile(draw_detections(
            image, target["boxes"], [class_names.get(i, str(i)) for i in labels], target.get("masks"),
            [tuple(colours[i].tolist()) for i in labels],
        )))  # fmt: skip
        keep = prediction["scores"] >= score_thresh
        labels = prediction["labels"][keep].tolist()
        scores = prediction["scores"][keep].tolist()
        masks = prediction["masks"][keep, 0] > mask_threshold if "masks" in prediction else None
        predicted.append(fit_tile(draw_detections(
            image, prediction["boxes"][keep], [f"{class_names.get(i, str(i))} {s:.2f}" for i, s in zip(labels, scores)],
            masks, [tuple(colours[i].tolist()) for i in labels],
        )))  # fmt: skip
    return make_grid(ground_truth + predicted, nrow=len(images), padding=4, pad_value=255)


def colour_labels(label_map: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[H, W] class ids (255 = ignored) -> uint8 [3, H, W] colours."""
    indices = label_map.cpu().long().clone()
    indices[indices == IGNORE_INDEX] = num_classes
    return palette(num_classes)[indices].permute(2, 0, 1)


def segmentation_preview(
    images: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    predictions: Sequence[torch.Tensor],
    num_classes: int,
) -> torch.Tensor:
    """Grid with one row per image: the image, its ground-truth colours, the predicted colours."""
    tiles = []
    for image, label, prediction in zip(images, labels, predictions):
        tiles += [
            fit_tile(to_uint8(image.cpu())),
            fit_tile(colour_labels(label, num_classes), nearest=True),
            fit_tile(colour_labels(prediction, num_classes), nearest=True),
        ]
    return make_grid(tiles, nrow=3, padding=4, pad_value=255)


def save_png(picture: torch.Tensor, path: str | os.PathLike) -> None:
    """uint8 [3, H, W] -> PNG file, written atomically."""
    buffer = io.BytesIO()
    Image.fromarray(picture.permute(1, 2, 0).contiguous().numpy()).save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())
