"""Sharding: dataset layouts -> WebDataset tars `<out>/<task>/<split>-NNNNNN.tar` plus `manifest.json`.

Samples: classification `jpg` + `cls`; detection `jpg` + `json` (boxes xywh, category ids, masks as COCO
RLE); segmentation `jpg` + `png` (single-channel label map). JPEG inputs are stored byte for byte, other
image formats re-encoded to JPEG.

Decoding and validation run in a process pool; results come back in input order, so equal inputs give
byte-identical shards (sorted inputs, a seeded shuffle so every shard mixes classes, fixed tar member
metadata). An unreadable image skips its sample, a bad annotation (box outside the image, unknown
category, undecodable mask...) is dropped from its sample; both are counted in the manifest by reason,
never silently lost. Each shard is written under a temporary name and renamed when complete, and a
task's whole folder is swapped in only when all its shards and the manifest are written.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import multiprocessing
import multiprocessing.pool
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from vig.atomic import atomic_path, write_json
from vig.data.layout import IMAGE_SUFFIXES

TASKS = ("classification", "detection", "segmentation")
SPLITS = ("train", "val")
TASK_DATASET = {"classification": "imagenet", "detection": "coco", "segmentation": "ade20k"}
MANIFEST = "manifest.json"
SAMPLE_FORMAT = {
    "classification": {"jpg": "image (JPEG)", "cls": "class id (decimal text), see class_index"},
    "detection": {"jpg": "image (JPEG)", "json": "image_id, file_name, height, width and per object: "
                  "annotation_ids, boxes [x, y, w, h], category_ids, masks (COCO RLE, counts as str), area, iscrowd"},
    "segmentation": {"jpg": "image (JPEG)", "png": "label map (8-bit single channel), ids see class_index"},
}  # fmt: skip
REENCODE_JPEG_QUALITY = 95
BOX_TOLERANCE = 1.0  # pixels a COCO box may poke past the image border (float rounding in real annotations)
_CHUNK = 32  # inputs per pool task
_CHUNKS_IN_FLIGHT_PER_WORKER = 4  # bounds memory: results wait in order, never the whole dataset
# Fixed tar member metadata: shards depend only on their samples.
_TAR_OWNER = "vig"
_TAR_MTIME = 0


@dataclass(frozen=True)
class Skip:
    """An input (or one annotation of it) left out of the shards, and why."""

    input: str
    reason: str  # a short code, counted in the manifest and logged as a metric
    detail: str = ""


@dataclass(frozen=True)
class Encoded:
    key: str
    sample: dict[str, bytes]
    dropped: tuple[Skip, ...] = ()  # bad annotations removed from an otherwise good sample


@dataclass
class TaskInputs:
    """What one task shards: the class index and, per split, sorted work items for the task's encoder."""

    class_index: dict[str, int] | None
    items: dict[str, list[tuple]]
    skipped: dict[str, list[Skip]] = field(default_factory=lambda: {split: [] for split in SPLITS})


# ----------------------------------------------------------------------------------------------- encoders
# Module-level functions of one picklable work item: they run in the pool's worker processes.


def _decode_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # a full decode: Image.open alone accepts truncated files
    return image


def _read_image(path: str) -> tuple[bytes, Image.Image] | Skip:
    try:
        data = Path(path).read_bytes()
        return data, _decode_image(data)
    except Exception as error:  # noqa: BLE001 - any failure to read or decode makes the image unusable
        return Skip(path, "unreadable_image", f"{type(error).__name__}: {error}")


def _as_jpeg(data: bytes, image: Image.Image) -> bytes:
    if image.format == "JPEG":
        return data
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=REENCODE_JPEG_QUALITY)
    return buffer.getvalue()


def encode_classification(item: tuple[str, str, int]) -> Encoded | Skip:
    path, key, label = item
    read = _read_image(path)
    if isinstance(read, Skip):
        return read
    data, image = read
    return Encoded(key, {"jpg": _as_jpeg(data, image), "cls": str(label).encode()})


def _annotation_mask(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """Any COCO segmentation (polygons, uncompressed or compressed RLE) -> one compressed RLE with str counts."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        rle = {"size": segmentation["size"], "counts": segmentation["counts"]}
    else:
        raise ValueError(f"segmentation is {type(segmentation).__name__}, not polygons or RLE")
    if [int(v) for v in rle["size"]] != [height, width]:
        raise ValueError(f"mask size {list(rle['size'])} differs from the image's [{height}, {width}]")
    mask_utils.decode(rle)  # proves the RLE decodes
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def _check_annotation(annotation: dict, height: int, width: int, categories: frozenset[int]) -> tuple[str, str] | None:
    """(reason, detail) when the annotation is unusable, else None."""
    if annotation.get("category_id") not in categories:
        return "unknown_category", f"category_id {annotation.get('category_id')!r}"
    bbox = annotation.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        return "malformed_box", f"bbox {bbox!r}"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return "degenerate_box", f"bbox {bbox}"
    if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE or y + h > height + BOX_TOLERANCE:
        return "box_outside_image", f"bbox {bbox} in a {width}x{height} image"
    return None


def encode_detection(item: tuple[str, str, dict, list[dict], frozenset[int]]) -> Encoded | Skip:
    path, key, image_info, annotations, categories = item
    read = _read_image(path)
    if isinstance(read, Skip):
        return read
    data, image = read
    height, width = image_info["height"], image_info["width"]
    if image.size != (width, height):
        detail = f"image is {image.size[0]}x{image.size[1]}, annotations say {width}x{height}"
        return Skip(path, "image_size_mismatch", detail)
    target: dict[str, Any] = {
        "image_id": image_info["id"], "file_name": image_info["file_name"], "height": height, "width": width,
        "annotation_ids": [], "boxes": [], "category_ids": [], "masks": [], "area": [], "iscrowd": [],
    }  # fmt: skip
    dropped = []
    for annotation in annotations:
        where = f"{path} (annotation {annotation.get('id')})"
        problem = _check_annotation(annotation, height, width, categories)
        if problem is None:
            try:
                mask = _annotation_mask(annotation.get("segmentation"), height, width)
            except Exception as error:  # noqa: BLE001 - pycocotools raises bare Exception for bad input
                problem = ("undecodable_mask", f"{type(error).__name__}: {error}")
        if problem is not None:
            dropped.append(Skip(where, *problem))
            continue
        target["annotation_ids"].append(annotation.get("id"))
        target["boxes"].append([float(v) for v in annotation["bbox"]])
        target["category_ids"].append(int(annotation["category_id"]))
        target["masks"].append(mask)
        target["area"].append(float(annotation.get("area", 0.0)))
        target["iscrowd"].append(int(annotation.get("iscrowd", 0)))
    encoded = json.dumps(target, sort_keys=True, separators=(",", ":")).encode()
    return Encoded(key, {"jpg": _as_jpeg(data, image), "json": encoded}, tuple(dropped))


def encode_segmentation(item: tuple[str, str, str, int | None]) -> Encoded | Skip:
    image_path, key, label_path, num_classes = item
    read = _read_image(image_path)
    if isinstance(read, Skip):
        return read
    data, image = read
    read_label = _read_image(label_path)
    if isinstance(read_label, Skip):
        return Skip(label_path, "unreadable_label_map", read_label.detail)
    label_data, label = read_label
    if label.format != "PNG" or label.mode not in ("L", "P"):
        return Skip(label_path, "label_map_not_8bit_single_channel", f"{label.format} mode {label.mode}")
    if label.size != image.size:
        return Skip(label_path, "label_map_size_mismatch", f"label map {label.size}, image {image.size}")
    if num_classes is not None:
        highest = int(np.asarray(label).max())
        if highest >= num_classes:
            return Skip(label_path, "label_id_out_of_range", f"label id {highest} >= {num_classes} classes")
    return Encoded(key, {"jpg": _as_jpeg(data, image), "png": label_data})


ENCODERS: dict[str, Callable[[Any], Encoded | Skip]] = {
    "classification": encode_classification,
    "detection": encode_detection,
    "segmentation": encode_segmentation,
}


# ------------------------------------------------------------------------------------------------ listing


def sample_key(relative: str) -> str:
    """A WebDataset key from a relative path: no suffix, and no dots or slashes (they would split the sample)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", relative.rsplit(".", 1)[0])


def _image_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def list_imagefolder(root: Path) -> TaskInputs:
    """ImageNet-style `train/<class>/*`, `val/<class>/*`; class ids are the sorted train class folders."""
    classes = sorted(path.name for path in (root / "train").iterdir() if path.is_dir())
    inputs = TaskInputs({name: index for index, name in enumerate(classes)}, {})
    for split in SPLITS:
        items = []
        for class_dir in sorted(path for path in (root / split).iterdir() if path.is_dir()):
            if class_dir.name not in inputs.class_index:
                inputs.skipped[split].append(Skip(str(class_dir), "class_not_in_train"))
                continue
            for path in _image_files(class_dir):
                key = sample_key(str(path.relative_to(root / split)))
                items.append((str(path), key, inputs.class_index[class_dir.name]))
        inputs.items[split] = items
    return inputs


def list_coco(root: Path) -> TaskInputs:
    """COCO `instances_{train,val}2017.json`; class ids are COCO category ids (from the train file)."""
    from pycocotools.coco import COCO

    inputs = TaskInputs(None, {})
    for split in SPLITS:
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress chatter
            coco = COCO(str(root / "annotations" / f"instances_{split}2017.json"))
        if inputs.class_index is None:
            inputs.class_index = {category["name"]: category["id"] for category in coco.loadCats(coco.getCatIds())}
        categories = frozenset(inputs.class_index.values())
        orphans = sorted(set(coco.imgToAnns) - set(coco.imgs))
        inputs.skipped[split] += [
            Skip(f"annotation {annotation['id']}", "annotation_of_unknown_image", f"image_id {image_id}")
            for image_id in orphans for annotation in coco.imgToAnns[image_id]
        ]  # fmt: skip
        items = []
        for image_id in sorted(coco.imgs):
            info = coco.imgs[image_id]
            image_info = {name: info[name] for name in ("id", "file_name", "height", "width")}
            path = root / f"{split}2017" / info["file_name"]
            annotations = coco.imgToAnns.get(image_id, [])
            items.append((str(path), sample_key(info["file_name"]), image_info, annotations, categories))
        inputs.items[split] = items
    return inputs


def list_ade20k(root: Path, classes: list[str] | None) -> TaskInputs:
    """ADE20K `images/{training,validation}/*.jpg` paired by name with `annotations/.../*.png`."""
    class_index = {name: index for index, name in enumerate(classes)} if classes else None
    inputs = TaskInputs(class_index, {})
    for split, folder in zip(SPLITS, ("training", "validation")):
        images = {path.stem: path for path in _image_files(root / "images" / folder)}
        labels = {path.stem: path for path in sorted((root / "annotations" / folder).glob("*.png"))}
        inputs.skipped[split] += [Skip(str(images[s]), "missing_label_map") for s in sorted(images.keys() - labels)]
        inputs.skipped[split] += [Skip(str(labels[s]), "label_map_without_image") for s in sorted(labels.keys() - images)]
        inputs.items[split] = [
            (str(images[stem]), sample_key(stem), str(labels[stem]), len(classes) if classes else None)
            for stem in sorted(images.keys() & labels.keys())
        ]
    return inputs


def list_task(task: str, layout: dict[str, Any]) -> TaskInputs:
    entry = layout[TASK_DATASET[task]]
    root = Path(entry["root"])
    if task == "classification":
        return list_imagefolder(root)
    if task == "detection":
        return list_coco(root)
    return list_ade20k(root, entry.get("classes"))


# ------------------------------------------------------------------------------------------------ writing


@dataclass(frozen=True)
class Encoders:
    """The process pool that decodes and validates inputs, with its size."""

    pool: multiprocessing.pool.Pool
    processes: int


def _encode_chunk(encode: Callable[[Any], Encoded | Skip], chunk: list) -> list[Encoded | Skip]:
    return [encode(item) for item in chunk]


def _encode_in_order(
    encode: Callable[[Any], Encoded | Skip], items: list, pool: Encoders | None, progress: tqdm
) -> Iterator[Encoded | Skip]:
    """Encode items in the pool (or inline without one), yielding results in input order with bounded look-ahead."""
    chunks = (items[start : start + _CHUNK] for start in range(0, len(items), _CHUNK))
    if pool is None:
        for chunk in chunks:
            yield from _encode_chunk(encode, chunk)
            progress.update(len(chunk))
        return
    in_flight = _CHUNKS_IN_FLIGHT_PER_WORKER * pool.processes
    submit = functools.partial(pool.pool.apply_async, _encode_chunk)
    pending = collections.deque(submit((encode, chunk)) for chunk in itertools.islice(chunks, in_flight))
    while pending:
        results = pending.popleft().get()
        for chunk in itertools.islice(chunks, 1):
            pending.append(submit((encode, chunk)))
        yield from results
        progress.update(len(results))


def _keep_encoded(results: Iterable[Encoded | Skip], skipped: list[Skip]) -> Iterator[Encoded]:
    """Pass good samples through; record skipped inputs, dropped annotations and duplicate keys in `skipped`."""
    keys: set[str] = set()
    for result in results:
        if isinstance(result, Skip):
            skipped.append(result)
        elif result.key in keys:
            skipped.append(Skip(result.key, "duplicate_key", "another input maps to the same sample key"))
        else:
            keys.add(result.key)
            skipped.extend(result.dropped)
            yield result


class _HashingFile:
    """Write-through file wrapper computing the sha256 on the way, so shards are never re-read to hash them."""

    def __init__(self, file: io.BufferedWriter):
        self.file = file
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.file.write(data)


def write_shards(samples: Iterable[Encoded], out_dir: Path, split: str, samples_per_shard: int) -> list[dict[str, Any]]:
    """Write `<split>-NNNNNN.tar` shards of `samples_per_shard` samples; returns [{file, samples, sha256}]."""
    samples = iter(samples)
    shards: list[dict[str, Any]] = []
    for index in itertools.count():
        batch = list(itertools.islice(samples, samples_per_shard))
        if not batch:
            return shards
        name = f"{split}-{index:06d}.tar"
        with atomic_path(out_dir / name) as temporary, open(temporary, "wb") as file:
            hashing = _HashingFile(file)
            with wds.TarWriter(hashing, encoder=False, user=_TAR_OWNER, group=_TAR_OWNER, mtime=_TAR_MTIME) as tar:
                for sample in batch:
                    tar.write({"__key__": sample.key, **sample.sample})
        shards.append({"file": name, "samples": len(batch), "sha256": hashing.sha256.hexdigest()})


@dataclass(frozen=True)
class ShardSettings:
    samples_per_shard: int = 128
    seed: int = 0
    workers: int = 2  # encoder processes; 0 means one per CPU, 1 encodes inline

    @classmethod
    def from_params(cls, shard_params: dict[str, Any]) -> ShardSettings:
        settings = cls(
            samples_per_shard=int(shard_params.get("samples_per_shard", cls.samples_per_shard)),
            seed=int(shard_params.get("seed", cls.seed)),
            workers=int(shard_params.get("workers", cls.workers)),
        )
        if settings.samples_per_shard < 1 or settings.workers < 0:
            raise ValueError(f"shard.samples_per_shard must be >= 1 and shard.workers >= 0, got {settings}")
        return settings

    @property
    def processes(self) -> int:
        return self.workers or os.cpu_count() or 1


def shard_task(
    task: str, layout: dict[str, Any], out_root: Path, settings: ShardSettings, pool: Encoders | None = None
) -> dict[str, Any]:
    """Shard one task's train and val splits into `out_root/<task>/`; returns (and writes) its manifest."""
    inputs = list_task(task, layout)
    entry = layout[TASK_DATASET[task]]
    # A user dataset's root; generated data is described by its params (its path would make the shards'
    # hash depend on where the project lives).
    source = entry["root"] if entry["source"] == "user" else entry["source"]
    manifest: dict[str, Any] = {
        "task": task,
        "dataset": TASK_DATASET[task],
        "source": source,
        "sample_format": SAMPLE_FORMAT[task],
        "class_index": inputs.class_index,
        "seed": settings.seed,
        "samples_per_shard": settings.samples_per_shard,
        "splits": {},
        "skipped": [],
    }
    with atomic_path(out_root / task) as staging:
        staging.mkdir(parents=True)
        for split in SPLITS:
            items = list(inputs.items[split])
            # Seeded shuffle of the sorted inputs: every shard mixes classes, and equal inputs give equal shards.
            random.Random(f"{settings.seed}:{task}:{split}").shuffle(items)
            skipped = inputs.skipped[split]
            with tqdm(total=len(items), desc=f"shard {task}/{split}", unit="img", mininterval=1.0) as progress:
                results = _encode_in_order(ENCODERS[task], items, pool, progress)
                shards = write_shards(_keep_encoded(results, skipped), staging, split, settings.samples_per_shard)
            manifest["splits"][split] = {
                "samples": sum(shard["samples"] for shard in shards),
                "inputs": len(items),
                "shards": shards,
            }
            manifest["skipped"] += [{"split": split, **dataclasses.asdict(skip)} for skip in skipped]
        reasons = collections.Counter(skip["reason"] for skip in manifest["skipped"])
        manifest["skipped_by_reason"] = dict(sorted(reasons.items()))
        write_json(staging / MANIFEST, manifest)
    return manifest


def shard_all(layout: dict[str, Any], out_root: Path, settings: ShardSettings) -> dict[str, Any]:
    """Shard every task; returns {task: manifest} plus the run's metrics under "metrics"."""
    manifests, seconds = {}, {}
    # The pool is forked once, before any progress-bar thread exists.
    with contextlib.ExitStack() as stack:
        pool = None
        if settings.processes > 1:
            pool = Encoders(stack.enter_context(multiprocessing.Pool(settings.processes)), settings.processes)
        for task in TASKS:
            start = time.perf_counter()
            manifests[task] = shard_task(task, layout, out_root, settings, pool)
            seconds[task] = time.perf_counter() - start
    return {"manifests": manifests, "metrics": shard_metrics(manifests, seconds)}


def _throughput(samples: int, seconds: float) -> dict[str, float]:
    return {"samples": samples, "seconds": round(seconds, 3), "samples_per_s": round(samples / max(seconds, 1e-9), 1)}


def shard_metrics(manifests: dict[str, dict[str, Any]], seconds: dict[str, float]) -> dict[str, float]:
    """Flat metrics: throughput overall and per task, samples/shards per split, skips per reason."""
    samples = {task: sum(split["samples"] for split in m["splits"].values()) for task, m in manifests.items()}
    metrics = _throughput(sum(samples.values()), sum(seconds.values()))
    for task, manifest in manifests.items():
        metrics.update({f"{task}.{name}": value for name, value in _throughput(samples[task], seconds[task]).items()})
        for split, info in manifest["splits"].items():
            metrics[f"{task}.{split}.samples"] = info["samples"]
            metrics[f"{task}.{split}.shards"] = len(info["shards"])
        metrics[f"{task}.skipped"] = len(manifest["skipped"])
        for reason, count in manifest["skipped_by_reason"].items():
            metrics[f"{task}.skipped.{reason}"] = count
    return metrics
