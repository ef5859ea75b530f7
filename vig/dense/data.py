"""The detection / segmentation shards as one worker sees them: resampled training batches (same count on
every worker) and an exact, unshuffled pass over the val split, through the vig.data WebDataset readers."""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from vig.data.readers import (
    collate_lists,
    detection_pipeline,
    load_manifest,
    make_loader,
    segmentation_pipeline,
    shard_urls,
)
from vig.dense.config import DenseDataConfig
from vig.dense.transforms import reduce_zero_label

_PIPELINES = {"detection": detection_pipeline, "segmentation": segmentation_pipeline}


class ReduceZeroLabel:
    """Wraps a (image, label map) transform and then applies the ADE20K label convention (picklable)."""

    def __init__(self, transform: Callable[[Any, Any], tuple[Any, Any]]) -> None:
        self.transform = transform

    def __call__(self, image: Any, label: Any) -> tuple[Any, torch.Tensor]:
        image, label = self.transform(image, label)
        return image, reduce_zero_label(label.as_subclass(torch.Tensor))


class DenseShards:
    """Shards of `task` ("detection" or "segmentation"): class index, sample counts, batch streams."""

    def __init__(self, data: DenseDataConfig, task: str, world_size: int) -> None:
        self.data = data
        self.task = task
        self.world_size = world_size
        manifest = load_manifest(data.shard_root, task)
        self.class_index: dict[str, int] = manifest["class_index"]
        self.train_samples = manifest["splits"]["train"]["samples"]
        self.val_samples = manifest["splits"]["val"]["samples"]
        self.train_urls = shard_urls(data.shard_root, task, "train")
        self.val_urls = shard_urls(data.shard_root, task, "val")
        self.pipeline = _PIPELINES[task]
        # Detection batches are lists (images differ in size); segmentation crops are stacked.
        self.collate = collate_lists if task == "detection" else None

    def train_batches(
        self, transform: Callable[[Any, Any], tuple[Any, Any]], batch_size: int, num_batches: int, seed: int
    ) -> Iterable[Any]:
        """`num_batches` full, shuffled, augmented batches resampled from the training shards."""
        loaders = max(1, self.data.loader_workers)
        pipeline = self.pipeline(
            self.train_urls,
            transform,
            shuffle_buffer=self.data.shuffle_buffer,
            seed=seed,
            resampled=True,
            epoch_samples=math.ceil(num_batches / loaders) * loaders * batch_size,
        )
        loader = make_loader(pipeline, batch_size, self.data.loader_workers, collate_fn=self.collate)
        return itertools.islice(loader, num_batches)

    def val_head(self, transform: Callable[[Any, Any], tuple[Any, Any]] | None, count: int) -> list[Any]:
        """The first `count` samples of this worker's val share (rank 0's share starts with the first shard)."""
        return list(itertools.islice(self.pipeline(self.val_urls, transform, shuffle_buffer=0), count))

    def val_batches(self, transform: Callable[[Any, Any], tuple[Any, Any]] | None, batch_size: int) -> Iterable[Any]:
        """This worker's share of the val split, each sample exactly once, unshuffled, batched as lists
        (val images may differ in size). `transform` None: images only converted to float."""
        pipeline = self.pipeline(self.val_urls, transform, shuffle_buffer=0)
        return make_loader(pipeline, batch_size, self.data.loader_workers, collate_fn=collate_lists)
