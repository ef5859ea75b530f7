"""WebDataset readers for the shards written by `vig.data.sharding`, used by every training stage.

Two modes, chosen by `resampled`:

- training (`resampled=True`, `epoch_samples=n`): each rank x loader-worker draws shards with replacement
  from its own seeded stream (WebDataset's ResampledShards seeds with rank, worker, epoch and `seed`), and
  an epoch is exactly `ceil(n / loader workers)` samples per worker on every rank, so all ranks run the same
  number of steps and DDP never waits on a rank that ran out of data;
- exact pass (`resampled=False`, evaluation): shards are split by node (`wds.split_by_node`) and then by
  loader worker (`wds.split_by_worker`), so every sample is read exactly once across ranks x workers. A
  rank or worker left without shards yields nothing (no error), so ranks may get unequal counts: evaluate
  with a sum-reduction, never a step-synchronised loop.

Shuffling is seeded: `seed` and the epoch (`pipeline.set_epoch(e)`, like DistributedSampler) fix the
shard order and the sample-buffer shuffle, so a run can be repeated. Transforms are arguments; by
default samples are only decoded (float images in [0, 1], channels first):

- classification: `transform(PIL.Image RGB) -> tensor` (a timm / torchvision transform) -> (image, label);
- detection: `transform(image, target) -> (image, target)` (torchvision.transforms.v2: the image is a
  tv_tensors.Image, boxes are tv_tensors.BoundingBoxes XYXY, masks tv_tensors.Mask, so geometric v2
  transforms move them together) -> (image, {boxes [N,4] float, labels int64, masks uint8 [N,H,W],
  image_id, area, iscrowd}), torchvision's detection convention; labels are the manifest's category ids;
- segmentation: `transform(image, label_map) -> (image, label_map)` (v2, label_map is a tv_tensors.Mask)
  -> (image, label map int64 [H,W]).
"""
from __future__ import annotations

import io
import itertools
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
import webdataset as wds
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from vig.data.sharding import MANIFEST, SPLITS, TASKS

DEFAULT_SHUFFLE_BUFFER = 1000
_SHARD_SHUFFLE_ALL = 1_000_000  # buffer larger than any shard list: a full permutation of the shards


def load_manifest(shard_root: str | Path, task: str) -> dict[str, Any]:
    """The manifest `shard` wrote for `task` (sample counts, class index, shards with sha256, skips)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    path = Path(shard_root) / task / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the shard stage first (`python -m stages.shard`)")
    return json.loads(path.read_text())


def shard_urls(shard_root: str | Path, task: str, split: str) -> list[str]:
    """Absolute paths of the shards of one split, in manifest order; errors if any is missing."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    manifest = load_manifest(shard_root, task)
    folder = (Path(shard_root) / task).resolve()
    urls = [str(folder / shard["file"]) for shard in manifest["splits"][split]["shards"]]
    missing = [url for url in urls if not Path(url).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} shard(s) listed in {folder / MANIFEST} are missing, e.g. {missing[0]}: rerun the shard stage"
        )
    if not urls:
        raise ValueError(f"{folder / MANIFEST} lists no {split} shards: the split had no usable samples")
    return urls


class ShardPipeline(wds.DataPipeline):
    """A WebDataset pipeline whose seeded shuffles follow `set_epoch` (call it before each epoch)."""

    def set_epoch(self, epoch: int) -> None:
        # ResampledShards and detshuffle increment `epoch` when iteration starts; loader workers get a copy
        # of this object at the start of each epoch, so they see `epoch` itself.
        for stage in self.pipeline:
            if hasattr(stage, "epoch"):
                stage.epoch = epoch - 1


def _take_per_worker(samples: Iterator[Any], epoch_samples: int) -> Iterator[Any]:
    """The loader worker's share of an epoch: ceil(epoch_samples / workers), so every rank gets the same count."""
    _, _, _, workers = wds.utils.pytorch_worker_info()
    yield from itertools.islice(samples, math.ceil(epoch_samples / workers))


_take_per_worker_stage = wds.pipelinefilter(_take_per_worker)


def shard_pipeline(
    urls: list[str],
    decode: Callable[[dict[str, Any]], Any],
    *,
    shuffle_buffer: int = 0,
    seed: int = 0,
    resampled: bool = False,
    epoch_samples: int | None = None,
) -> ShardPipeline:
    """The shared pipeline: shard source -> samples -> shuffle -> `decode(sample)` (which also transforms).

    `shuffle_buffer` 0 keeps the order (and, with `resampled=False`, the shard order too).
    """
    if not urls:
        raise ValueError("no shard urls given")
    if resampled:
        if not epoch_samples or epoch_samples < 1:
            raise ValueError("resampled=True needs epoch_samples (samples per rank per epoch)")
        stages: list[Any] = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        if epoch_samples is not None:
            raise ValueError("epoch_samples applies to resampled=True only; an exact pass reads every sample once")
        stages = [wds.SimpleShardList(urls)]
        if shuffle_buffer:
            # Same seed on every rank: one shard permutation, then split into disjoint parts.
            stages.append(wds.detshuffle(_SHARD_SHUFFLE_ALL, _SHARD_SHUFFLE_ALL, seed=seed))
        stages += [wds.split_by_node, wds.split_by_worker]
    stages.append(wds.tarfile_to_samples())
    if shuffle_buffer:
        stages.append(wds.detshuffle(shuffle_buffer, min(shuffle_buffer, 100), seed=seed))
    stages.append(wds.map(decode))
    if resampled:
        stages.append(_take_per_worker_stage(epoch_samples))
    return ShardPipeline(*stages)


def _rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


_to_float_image = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
# With a dtype (not a dict), ToDtype converts images only: boxes, masks and labels keep theirs.
_images_to_float = v2.ToDtype(torch.float32, scale=True)


class ClassificationDecoder:
    """`jpg` + `cls` -> (transform(PIL image), label). A class, not a closure, so loader workers can pickle it."""

    def __init__(self, transform: Callable[[Image.Image], Any] | None = None):
        self.transform = transform or _to_float_image

    def __call__(self, sample: dict[str, Any]) -> tuple[Any, int]:
        return self.transform(_rgb(sample["jpg"])), int(sample["cls"])


def detection_target(annotation: dict[str, Any]) -> dict[str, Any]:
    """A shard's detection `json` -> torchvision target (boxes XYXY, labels, masks [N,H,W], ...)."""
    height, width = annotation["height"], annotation["width"]
    boxes = torch.tensor(annotation["boxes"], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    if annotation["masks"]:
        masks = torch.from_numpy(np.ascontiguousarray(mask_utils.decode(annotation["masks"]).transpose(2, 0, 1)))
    else:
        masks = torch.zeros((0, height, width), dtype=torch.uint8)
    return {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "labels": torch.tensor(annotation["category_ids"], dtype=torch.int64),
        "masks": tv_tensors.Mask(masks),
        "image_id": annotation["image_id"],
        "area": torch.tensor(annotation["area"], dtype=torch.float32),
        "iscrowd": torch.tensor(annotation["iscrowd"], dtype=torch.int64),
    }


class DetectionDecoder:
    """`jpg` + `json` -> transform(image, target), torchvision detection convention."""

    def __init__(self, transform: Callable[[Any, Any], tuple[Any, Any]] | None = None):
        self.transform = transform or _images_to_float

    def __call__(self, sample: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        image = tv_tensors.Image(v2.functional.pil_to_tensor(_rgb(sample["jpg"])))
        return self.transform(image, detection_target(json.loads(sample["json"])))


class SegmentationDecoder:
    """`jpg` + `png` -> transform(image, label map), label map int64 [H, W] holding the PNG's ids."""

    def __init__(self, transform: Callable[[Any, Any], tuple[Any, Any]] | None = None):
        self.transform = transform or _images_to_float

    def __call__(self, sample: dict[str, Any]) -> tuple[Any, Any]:
        image = tv_tensors.Image(v2.functional.pil_to_tensor(_rgb(sample["jpg"])))
        with Image.open(io.BytesIO(sample["png"])) as label_image:
            # Raw ids: no mode conversion (a palette PNG's indices are the labels).
            labels = torch.from_numpy(np.asarray(label_image).astype(np.int64))
        return self.transform(image, tv_tensors.Mask(labels))


def classification_pipeline(
    urls: list[str], transform: Callable[[Image.Image], Any] | None = None, **options: Any
) -> ShardPipeline:
    """Classification shards -> (image, label). `options`: those of `shard_pipeline` (see the module docstring)."""
    return shard_pipeline(urls, ClassificationDecoder(transform), **options)


def detection_pipeline(
    urls: list[str], transform: Callable[[Any, Any], tuple[Any, Any]] | None = None, **options: Any
) -> ShardPipeline:
    """Detection / instance segmentation shards -> (image, target), batched with `collate_lists`. `options`: those
    of `shard_pipeline`."""
    return shard_pipeline(urls, DetectionDecoder(transform), **options)


def segmentation_pipeline(
    urls: list[str], transform: Callable[[Any, Any], tuple[Any, Any]] | None = None, **options: Any
) -> ShardPipeline:
    """Semantic segmentation shards -> (image, label map). `options`: those of `shard_pipeline`."""
    return shard_pipeline(urls, SegmentationDecoder(transform), **options)


def collate_lists(batch: list[tuple[Any, ...]]) -> tuple[list[Any], ...]:
    """Batch as lists, not stacked tensors: torchvision detection models take list[image], list[target]."""
    return tuple(list(column) for column in zip(*batch))


def make_loader(
    pipeline: ShardPipeline,
    batch_size: int,
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    **loader_kwargs: Any,
) -> wds.WebLoader:
    """A WebLoader (torch DataLoader) over the pipeline; each worker batches its own samples.

    Workers are not persistent, so `pipeline.set_epoch(e)` before each epoch reaches them.
    """
    return wds.WebLoader(
        pipeline, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn, **loader_kwargs
    )
