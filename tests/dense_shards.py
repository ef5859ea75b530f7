"""Tiny DigitScenes detection / segmentation shards for the dense-prediction tests, written by the real
prepare + shard code (a few scenes of real handwritten digits, COCO and ADE20K layouts)."""
from __future__ import annotations

from pathlib import Path

from vig.data.layout import prepare, read_layout
from vig.data.sharding import ShardSettings, shard_all

SCENES = {"digits": 100, "detection": {"train": 8, "val": 4}, "segmentation": {"train": 8, "val": 4}}


def write_dense_shards(root: Path) -> Path:
    """`root/data/layout.json`, DigitScenes under `root/data`, shards under `root/shards`; returns root."""
    prepare({"source": "embedded", "seed": 0, "embedded": SCENES}, root / "data", root)
    layout = read_layout(root / "data" / "layout.json")
    shard_all(layout, root / "shards", ShardSettings.from_params({"samples_per_shard": 4, "seed": 0, "workers": 1}))
    return root
