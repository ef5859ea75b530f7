"""Evaluation metrics: COCO box / mask AP through pycocotools, and mIoU / mAcc / aAcc from a confusion matrix."""
from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def detections_to_coco(
    image_id: int, prediction: dict[str, torch.Tensor], mask_threshold: float = 0.5
) -> list[dict[str, Any]]:
    """One image's torchvision Mask R-CNN output -> COCO result dicts (xywh boxes, RLE masks).

    Labels are taken as COCO category ids (see vig.dense.detection). Masks, when present, are the
    soft [N, 1, H, W] masks torchvision pastes into the image; they are binarised at `mask_threshold`.
    """
    boxes = prediction["boxes"].detach().cpu().clone()
    boxes[:, 2:] -= boxes[:, :2]
    scores = prediction["scores"].detach().cpu().tolist()
    labels = prediction["labels"].detach().cpu().tolist()
    results = [
        {"image_id": int(image_id), "category_id": int(label), "bbox": [round(v, 3) for v in box], "score": score}
        for box, label, score in zip(boxes.tolist(), labels, scores)
    ]
    if "masks" in prediction:
        binary = (prediction["masks"].detach().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)
        for result, rle in zip(results, encode_masks(binary)):
            result["segmentation"] = rle
    return results


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """[N, H, W] binary masks -> COCO RLEs with JSON-ready (str) counts."""
    rles = mask_utils.encode(np.asfortranarray(masks.astype(np.uint8).transpose(1, 2, 0))) if len(masks) else []
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return list(rles)


def _results_coco(coco_gt: COCO, results: list[dict[str, Any]]) -> COCO:
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(copy.deepcopy(results))
    # pycocotools' loadRes cannot take an empty list; an empty result set scores 0 everywhere.
    empty = COCO()
    empty.dataset = {key: coco_gt.dataset[key] for key in ("images", "categories")} | {"annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        empty.createIndex()
    return empty


def coco_evaluate(
    coco_gt: COCO, results: list[dict[str, Any]], iou_types: Iterable[str] = ("bbox", "segm")
) -> tuple[dict[str, dict[str, float]], str]:
    """COCOeval over the ground truth's images -> ({iou_type: {AP, AP50, AP75, APs, APm, APl}}, printed summary).

    Values follow COCO conventions: fractions in [0, 1], -1 where a size range has no ground truth.
    """
    results_coco = _results_coco(coco_gt, results)
    metrics: dict[str, dict[str, float]] = {}
    summary = io.StringIO()
    for iou_type in iou_types:
        if iou_type == "segm" and results and "segmentation" not in results[0]:
            raise ValueError("segm evaluation needs 'segmentation' in the results: the model returned no masks")
        evaluator = COCOeval(coco_gt, results_coco, iouType=iou_type)
        with contextlib.redirect_stdout(summary):
            print(f"== {iou_type} ==")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        metrics[iou_type] = {name: float(value) for name, value in zip(COCO_STAT_NAMES, evaluator.stats)}
    return metrics, summary.getvalue()


def confusion_matrix(
    prediction: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """[num_classes, num_classes] int64 counts, rows = ground truth, columns = prediction; ignored pixels skipped."""
    if prediction.shape != label.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and label {tuple(label.shape)} differ in shape")
    valid = label != ignore_index
    label, prediction = label[valid].long(), prediction[valid].long()
    if len(label) and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(
            f"labels outside 0..{num_classes - 1} (and not ignore_index {ignore_index}): check num_classes "
            "and reduce_zero_label"
        )
    counts = torch.bincount(label * num_classes + prediction, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor) -> dict[str, Any]:
    """mmseg's metrics from a confusion matrix: mIoU and mAcc average the classes present in the
    ground truth or prediction (NaN classes skipped); aAcc is overall pixel accuracy."""
    confusion = confusion.double()
    intersect = confusion.diag()
    area_label = confusion.sum(1)
    area_pred = confusion.sum(0)
    union = area_label + area_pred - intersect
    iou = intersect / union
    acc = intersect / area_label
    return {
        "mIoU": float(torch.nanmean(iou)),
        "mAcc": float(torch.nanmean(acc)),
        "aAcc": float(intersect.sum() / area_label.sum()),
        "IoU": [None if torch.isnan(v) else float(v) for v in iou],
    }
