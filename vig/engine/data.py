"""The classification shards as one worker sees them: its share of training batches per epoch and its exact
share of the validation set, through the vig.data WebDataset readers and the timm transforms."""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import torch

from vig.data.readers import classification_pipeline, load_manifest, make_loader, shard_urls
from vig.data.transforms import AugmentConfig, eval_transform, train_transform
from vig.engine.config import DataConfig

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


class ClassificationShards:
    def __init__(self, data: DataConfig, augment: AugmentConfig, world_size: int) -> None:
        self.data = data
        self.world_size = world_size
        manifest = load_manifest(data.shard_root, data.task)
        self.num_classes = len(manifest["class_index"])
        self.train_samples = manifest["splits"]["train"]["samples"]
        self.val_samples = manifest["splits"]["val"]["samples"]
        self.train_urls = shard_urls(data.shard_root, data.task, "train")
        self.val_urls = shard_urls(data.shard_root, data.task, "val")
        self.train_transform = train_transform(augment, data.img_size)
        self.eval_transform = eval_transform(augment, data.img_size)

    def batches_per_epoch(self, batch_size: int) -> int:
        """Per-worker batches in one pass over the training set (the remainder is dropped)."""
        batches = self.train_samples // (batch_size * self.world_size)
        if batches == 0:
            raise ValueError(
                f"{self.train_samples} training samples cannot fill one batch of {batch_size} on each of "
                f"{self.world_size} workers: lower the batch size or the number of workers"
            )
        return batches

    def train_batches(self, batch_size: int, num_batches: int, seed: int) -> Batches:
        """`num_batches` full, shuffled, augmented batches resampled from the training shards (same count on
        every worker)."""
        # Each loader process batches its own share, so give every one a whole number of batches.
        loaders = max(1, self.data.loader_workers)
        pipeline = classification_pipeline(
            self.train_urls,
            self.train_transform,
            shuffle_buffer=self.data.shuffle_buffer,
            seed=seed,
            resampled=True,
            epoch_samples=math.ceil(num_batches / loaders) * loaders * batch_size,
        )
        return itertools.islice(make_loader(pipeline, batch_size, self.data.loader_workers), num_batches)

    def val_batches(self, batch_size: int) -> Batches:
        """This worker's share of the validation shards, each sample once, unshuffled."""
        pipeline = classification_pipeline(self.val_urls, self.eval_transform, resampled=False)
        return make_loader(pipeline, batch_size, self.data.loader_workers)
