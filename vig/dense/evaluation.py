"""Evaluating fine-tuned dense models: COCO box / mask AP for Mask R-CNN, mIoU / mAcc / aAcc for UperNet
(single scale, whole-image and sliding-window inference), and the prediction pictures.

`evaluate_detection` / `evaluate_segmentation` run in one process (GPU when present) over the val shards;
they write the metrics file and the picture and return the metrics, which the stages log to MLflow.
"""
from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pycocotools.coco import COCO
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.transforms import v2

from vig.atomic import write_json
from vig.data.layout import read_layout
from vig.dense.config import DenseDataConfig, EvaluateDetConfig, EvaluateSegConfig
from vig.dense.data import DenseShards, ReduceZeroLabel
from vig.dense.detection import MaskRCNNConfig, build_maskrcnn
from vig.dense.engine import load_weights, plain_tensors
from vig.dense.metrics import coco_evaluate, confusion_matrix, detections_to_coco, segmentation_scores
from vig.dense.segmentation import UperNetConfig, UperNetSegmentor, slide_logits
from vig.dense.transforms import fit_size
from vig.dense.visualize import detection_preview, save_png, segmentation_preview
from vig.engine.config import from_dict
from vig.engine.evaluation import autocast, autocast_dtype

COCO_VAL_ANNOTATIONS = "annotations/instances_val2017.json"


def _device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


# ------------------------------------------------------------------------------------------ detection


def rebuild_detector(record: dict[str, Any]) -> MaskRCNN:
    """The Mask R-CNN of a `finetune_det` weights file, weights loaded, on the CPU."""
    config = from_dict(MaskRCNNConfig, record["model_config"], "model_config")
    model = build_maskrcnn(record["trunk"]["name"], record["trunk"]["kwargs"], record["num_classes"], config)
    model.load_state_dict(record["model"])
    return model


@torch.no_grad()
def detection_results(
    model: nn.Module,
    batches: Iterable[tuple[list[torch.Tensor], list[dict[str, Any]]]],
    device: torch.device,
    dtype: torch.dtype | None,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """COCO result dicts of `model` (put in eval mode) over the batches."""
    model.eval()
    results: list[dict[str, Any]] = []
    for images, targets in batches:
        with autocast(device, dtype):
            outputs = model([plain_tensors(image, device) for image in images])
        for target, output in zip(targets, outputs):
            output = {k: v.float() if v.is_floating_point() else v for k, v in output.items()}
            results += detections_to_coco(target["image_id"], output, mask_threshold)
    return results


@torch.no_grad()
def detection_picture(
    model: nn.Module,
    samples: Sequence[tuple[torch.Tensor, dict[str, Any]]],
    class_names: dict[int, str],
    device: torch.device,
    score_thresh: float,
) -> torch.Tensor:
    """Ground truth (top) and predictions (bottom) of a few val samples, as a uint8 image grid."""
    model.eval()
    images = [plain_tensors(image, "cpu") for image, _ in samples]
    targets = [{k: plain_tensors(t[k], "cpu") for k in ("boxes", "labels", "masks")} for _, t in samples]
    outputs = model([image.to(device) for image in images])
    outputs = [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in outputs]
    return detection_preview(images, targets, outputs, class_names, score_thresh)


def coco_ground_truth(layout_path: str | Path) -> COCO:
    """The COCO val annotations of the dataset that `prepare` recorded in data/layout.json."""
    path = Path(read_layout(layout_path)["coco"]["root"]) / COCO_VAL_ANNOTATIONS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the COCO root recorded in {layout_path} has no val annotations")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def evaluate_detection(config: EvaluateDetConfig) -> dict[str, Any]:
    """COCO box and mask AP of the fine-tuned detector on the val shards; writes metrics and picture."""
    record = load_weights(config.checkpoint, "finetune_det")
    device = _device(config.device)
    dtype = autocast_dtype(config.precision, device)
    model = rebuild_detector(record).to(device)
    shards = DenseShards(DenseDataConfig(shard_root=config.shard_root), "detection", world_size=1)
    batches = shards.val_batches(None, config.batch_size)
    results = detection_results(model, batches, device, dtype, config.mask_threshold)
    coco_gt = coco_ground_truth(config.layout)
    scores, summary = coco_evaluate(coco_gt, results)
    metrics = {**scores, "images": len(coco_gt.getImgIds()), "detections": len(results)}
    write_json(config.metrics, metrics)
    class_names = {int(i): name for name, i in shards.class_index.items()}
    samples = shards.val_head(None, config.preview_images)
    save_png(detection_picture(model, samples, class_names, device, config.preview_score_thresh), config.plot)
    print(summary, flush=True)
    return metrics


# --------------------------------------------------------------------------------------- segmentation


def rebuild_segmentor(record: dict[str, Any]) -> UperNetSegmentor:
    """The UperNet of a `finetune_seg` weights file, weights loaded, on the CPU."""
    config = from_dict(UperNetConfig, record["model_config"], "model_config")
    model = UperNetSegmentor(record["trunk"]["name"], record["trunk"]["kwargs"], record["num_classes"], config)
    model.load_state_dict(record["model"])
    return model


@torch.no_grad()
def segmentation_logits(
    model: UperNetSegmentor,
    images: torch.Tensor,
    scale: Sequence[int],
    window: tuple[Sequence[int], Sequence[int]] | None = None,
) -> torch.Tensor:
    """[B, C, H, W] logits for same-size [B, 3, H, W] images at their own size: resized to `scale` (keeping
    the ratio), predicted whole, or with a sliding `window` = (crop size, stride), and resized back."""
    height, width = images.shape[-2:]
    resized = v2.functional.resize(images, fit_size(height, width, scale), antialias=True)
    if window is None:
        logits = model(resized)
    else:
        logits = slide_logits(model, resized, model.num_classes, *window)
    return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)


@torch.no_grad()
def segmentation_confusion(
    model: UperNetSegmentor,
    batches: Iterable[tuple[list[torch.Tensor], list[torch.Tensor]]],
    device: torch.device,
    dtype: torch.dtype | None,
    modes: Sequence[str],
    scale: Sequence[int],
    crop_size: Sequence[int],
    stride: Sequence[int],
) -> dict[str, torch.Tensor]:
    """Per inference mode, the confusion matrix of `model` (put in eval mode) over the batches (lists of
    images, which go through the model together where they have the same size)."""
    model.eval()
    confusion = {mode: torch.zeros(model.num_classes, model.num_classes, dtype=torch.long) for mode in modes}
    for images, labels in batches:
        by_size: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault(tuple(image.shape), []).append(index)
        for indices in by_size.values():
            stacked = torch.stack([plain_tensors(images[i], device) for i in indices])
            for mode in modes:
                window = (crop_size, stride) if mode == "slide" else None
                with autocast(device, dtype):
                    predictions = segmentation_logits(model, stacked, scale, window).float().argmax(1).cpu()
                for prediction, i in zip(predictions, indices):
                    confusion[mode] += confusion_matrix(prediction, plain_tensors(labels[i], "cpu"), model.num_classes)
    return confusion


def segmentation_transform(reduce_zero_label: bool) -> Any:
    """Val transform: float images; with `reduce_zero_label`, ADE20K's label convention."""
    to_float = v2.ToDtype(torch.float32, scale=True)
    return ReduceZeroLabel(to_float) if reduce_zero_label else to_float


@torch.no_grad()
def segmentation_picture(
    model: UperNetSegmentor,
    samples: Sequence[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    scale: Sequence[int],
) -> torch.Tensor:
    """Image, ground-truth colours, predicted colours (whole-image inference) for a few val samples."""
    model.eval()
    images = [plain_tensors(image, "cpu") for image, _ in samples]
    labels = [plain_tensors(label, "cpu") for _, label in samples]
    predictions = [segmentation_logits(model, image[None].to(device), scale)[0].argmax(0).cpu() for image in images]
    return segmentation_preview(images, labels, predictions, model.num_classes)


def evaluate_segmentation(config: EvaluateSegConfig) -> dict[str, Any]:
    """mIoU / mAcc / aAcc per inference mode of the fine-tuned segmenter on the val shards; writes the metrics
    and the picture."""
    record = load_weights(config.checkpoint, "finetune_seg")
    device = _device(config.device)
    dtype = autocast_dtype(config.precision, device)
    model = rebuild_segmentor(record).to(device)
    shards = DenseShards(DenseDataConfig(shard_root=config.shard_root), "segmentation", world_size=1)
    transform = segmentation_transform(record["reduce_zero_label"])
    batches = shards.val_batches(transform, config.batch_size)
    confusion = segmentation_confusion(
        model, batches, device, dtype, config.modes, config.scale, config.crop_size, config.stride
    )
    class_names = record["class_names"]
    metrics: dict[str, Any] = {"images": shards.val_samples}
    for mode, matrix in confusion.items():
        scores = segmentation_scores(matrix)
        per_class = dict(zip(class_names, scores.pop("IoU")))
        metrics[mode] = {**scores, "IoU": per_class}
    write_json(config.metrics, metrics)
    samples = shards.val_head(transform, config.preview_images)
    save_png(segmentation_picture(model, samples, device, config.scale), config.plot)
    print(json.dumps({mode: {k: metrics[mode][k] for k in ("mIoU", "mAcc", "aAcc")} for mode in config.modes}))
    return metrics
