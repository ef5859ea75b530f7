"""Tiny classification shards for the engine tests: real handwritten digits (scikit-learn's bundled set),
upsampled to RGB, written as WebDataset tars plus the manifest fields the vig.data readers use."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from sklearn.datasets import load_digits


def write_digit_shards(
    shard_root: Path, *, train: int, val: int, classes: int = 10, size: int = 16, per_shard: int = 16
) -> Path:
    """`train` + `val` images of the digits 0..classes-1 as `<shard_root>/classification/{train,val}-NNNNNN.tar`
    (`per_shard` samples each); returns shard_root."""
    digits = load_digits()
    chosen = np.flatnonzero(digits.target < classes)
    folder = shard_root / "classification"
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train": chosen[:train], "val": chosen[train : train + val]}
    manifest = {
        "task": "classification",
        "class_index": {f"digit_{label}": label for label in range(classes)},
        "splits": {},
    }
    for split, indices in splits.items():
        shards = []
        for shard_index, start in enumerate(range(0, len(indices), per_shard)):
            members = indices[start : start + per_shard]
            name = f"{split}-{shard_index:06d}.tar"
            with wds.TarWriter(str(folder / name)) as tar:
                for index in members:
                    tar.write({"__key__": f"{split}_{index:05d}", "jpg": _jpeg(digits.images[index], size),
                               "cls": str(int(digits.target[index])).encode()})  # fmt: skip
            shards.append({"file": name, "samples": len(members)})
        manifest["splits"][split] = {"samples": len(indices), "shards": shards}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return shard_root


def _jpeg(intensity: np.ndarray, size: int) -> bytes:
    gray = Image.fromarray((intensity * (255 / 16)).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    gray.convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()
