"""DigitScenes: the embedded default datasets, built from scikit-learn's bundled handwritten digits.

scikit-learn ships 1,797 real 8x8 digits (10 classes), so the pipeline runs offline. From them we write
the three datasets in the on-disk layouts of the real ones, so every later stage treats them alike:

- classification: digits upsampled to 32x32 RGB on a tinted, noisy background, ImageFolder like ImageNet;
- detection / instance segmentation: scenes with 1-4 digits of random size, position and ink colour on a
  textured background, COCO layout; an instance mask is the digit's stroke pixels, its box the mask's
  tight box, so annotations agree with the pixels;
- semantic segmentation: the same kind of scenes, ADE20K layout (0 = background, 1..10 = digit + 1).

Every image is a pure function of (seed, task, split, index), so generation is reproducible byte for
byte, and a single scene can be regenerated (tests do) without writing the dataset.
"""
from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from vig.atomic import atomic_path

CLASS_NAMES = tuple(f"digit_{digit}" for digit in range(10))
SKLEARN_DIGITS = 1797
BACKGROUND_NAME = "background"
# COCO category ids and ADE20K label ids are class index + 1: COCO ids start at 1, ADE20K's 0 is background.
LABEL_OFFSET = 1
STROKE_THRESHOLD = 0.5  # upsampled digit intensity (0..1) above which a pixel belongs to the stroke mask
JPEG_QUALITY = 95
PLACEMENT_ATTEMPTS = 30  # random placements tried before a scene gets one digit fewer (digits never overlap)
COCO_SPLITS = {"train": "train2017", "val": "val2017"}
ADE_SPLITS = {"train": "training", "val": "validation"}
ADE_PREFIX = {"train": "ADE_train", "val": "ADE_val"}
_TASK_STREAMS = {"classification": 0, "detection": 1, "segmentation": 2}
_SPLIT_STREAMS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class DigitScenesSpec:
    """What to generate; built from params.yaml's `data` section by `from_params`."""

    seed: int = 0
    digits: int = 1797  # how many of scikit-learn's digits to use (a stratified subset when fewer)
    val_fraction: float = 0.2
    image_size: int = 32
    scene_size: int = 128
    digits_per_scene: tuple[int, int] = (1, 4)
    digit_size: tuple[int, int] = (16, 48)
    detection: tuple[int, int] = (600, 150)  # scenes (train, val)
    segmentation: tuple[int, int] = (600, 150)

    @classmethod
    def from_params(cls, data_params: dict[str, Any]) -> DigitScenesSpec:
        embedded = dict(data_params.get("embedded") or {})
        known = {field.name for field in dataclasses.fields(cls)} - {"seed"}
        unknown = sorted(set(embedded) - known)
        if unknown:
            raise ValueError(f"unknown keys in data.embedded: {unknown}; known keys: {sorted(known)}")
        for task in ("detection", "segmentation"):
            if task in embedded:
                counts = embedded[task]
                if not isinstance(counts, dict) or set(counts) != {"train", "val"}:
                    raise ValueError(f"data.embedded.{task} must be a mapping {{train: N, val: N}}, got {counts!r}")
                embedded[task] = (int(counts["train"]), int(counts["val"]))
        for pair in ("digits_per_scene", "digit_size"):
            if pair in embedded:
                embedded[pair] = tuple(int(v) for v in embedded[pair])
        spec = cls(seed=int(data_params.get("seed", 0)), **embedded)
        spec.check()
        return spec

    def check(self) -> None:
        problems = []
        if not 0 < self.val_fraction < 1:
            problems.append(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        else:
            val = round(self.digits * self.val_fraction)
            if self.digits > SKLEARN_DIGITS or min(val, self.digits - val) < len(CLASS_NAMES):
                problems.append(f"digits must be at most {SKLEARN_DIGITS} and leave one digit per class in train and "
                                f"in val, got {self.digits} with val_fraction {self.val_fraction}")
        low, high = self.digits_per_scene
        if not 1 <= low <= high:
            problems.append(f"digits_per_scene must be [min, max] with 1 <= min <= max, got {self.digits_per_scene}")
        low, high = self.digit_size
        if not 8 <= low <= high <= self.scene_size:
            problems.append(f"digit_size must be [min, max] with 8 <= min <= max <= scene_size, got {self.digit_size}")
        if min(*self.detection, *self.segmentation) < 1:
            problems.append("detection and segmentation need at least one train and one val scene")
        if problems:
            raise ValueError("invalid data.embedded params: " + "; ".join(problems))

    def scene_counts(self, task: str) -> dict[str, int]:
        train, val = getattr(self, task)
        return {"train": train, "val": val}


@dataclass(frozen=True)
class Digits:
    """The 8x8 digits as intensities in [0, 1], their labels, and a stratified train/val split of indices."""

    images: np.ndarray  # [N, 8, 8] float32
    labels: np.ndarray  # [N] int64
    split: dict[str, np.ndarray]


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # [S, S, 3] uint8, before JPEG compression
    masks: np.ndarray  # [N, S, S] bool, pairwise disjoint
    classes: tuple[int, ...]  # digit class (0..9) of each instance
    inks: tuple[tuple[int, int, int], ...]  # RGB ink of each instance (every mask pixel has exactly this colour)


def load_digits(spec: DigitScenesSpec) -> Digits:
    """scikit-learn's digits, `spec.digits` of them (a stratified subset), split train/val stratified by class."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    labels = bunch.target.astype(np.int64)
    used = np.arange(len(labels))
    if spec.digits < len(labels):
        used, _ = train_test_split(used, train_size=spec.digits, stratify=labels, random_state=spec.seed)
    train, val = train_test_split(used, test_size=spec.val_fraction, stratify=labels[used], random_state=spec.seed)
    images = (bunch.images / 16.0).astype(np.float32)
    return Digits(images, labels, {"train": np.sort(train), "val": np.sort(val)})


def sample_rng(seed: int, task: str, split: str, index: int) -> np.random.Generator:
    """The random stream of one image: independent of every other image, so order and subsets don't matter."""
    return np.random.default_rng([seed, _TASK_STREAMS[task], _SPLIT_STREAMS[split], index])


def _upsample(plane: np.ndarray, size: int) -> np.ndarray:
    image = Image.fromarray(plane.astype(np.float32), mode="F")
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dark tinted background with smooth blotches and pixel noise: [size, size, 3] float."""
    base = rng.uniform(0, 90, size=3).astype(np.float32)
    blotches = np.clip(128 + 12 * rng.standard_normal((4, 4, 3)), 0, 255).astype(np.uint8)
    smooth = Image.fromarray(blotches, mode="RGB").resize((size, size), Image.Resampling.BICUBIC)
    texture = np.asarray(smooth, dtype=np.float32) - 128
    noise = rng.integers(-10, 11, size=(size, size, 3), dtype=np.int16)  # uniform: much cheaper than normal
    return np.clip(base + texture + noise, 0, 255)


def _ink(rng: np.random.Generator) -> np.ndarray:
    # One bright channel keeps every ink at least ~65 levels away from any background pixel.
    ink = rng.uniform(0, 255, size=3)
    ink[rng.integers(3)] = rng.uniform(170, 255)
    return np.round(ink)


def render_digit(intensity: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A classification image: the digit in a random ink, alpha-blended onto a background. [size, size, 3] uint8."""
    alpha = np.clip(_upsample(intensity, size), 0, 1)[..., None]
    image = _background(rng, size) * (1 - alpha) + _ink(rng) * alpha
    return np.round(image).astype(np.uint8)


def _boxes_overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    (ya, xa, sa), (yb, xb, sb) = a, b
    return ya < yb + sb and yb < ya + sa and xa < xb + sb and xb < xa + sa


def render_scene(spec: DigitScenesSpec, digits: Digits, pool: np.ndarray, rng: np.random.Generator) -> Scene:
    """A scene of non-overlapping digits drawn from `pool` (indices into `digits`)."""
    size = spec.scene_size
    image = _background(rng, size)
    squares: list[tuple[int, int, int]] = []
    masks, classes, inks = [], [], []
    for _ in range(rng.integers(spec.digits_per_scene[0], spec.digits_per_scene[1] + 1)):
        index = pool[rng.integers(len(pool))]
        side = int(rng.integers(spec.digit_size[0], spec.digit_size[1] + 1))
        for _attempt in range(PLACEMENT_ATTEMPTS):
            square = (int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1)), side)
            if not any(_boxes_overlap(square, other) for other in squares):
                break
        else:
            continue
        stroke = _upsample(digits.images[index], side) > STROKE_THRESHOLD
        if not stroke.any():
            continue
        y, x, _ = square
        mask = np.zeros((size, size), dtype=bool)
        mask[y : y + side, x : x + side] = stroke
        ink = _ink(rng)
        image[mask] = ink
        squares.append(square)
        masks.append(mask)
        classes.append(int(digits.labels[index]))
        inks.append(tuple(int(c) for c in ink))
    stacked = np.stack(masks) if masks else np.zeros((0, size, size), dtype=bool)
    return Scene(np.round(image).astype(np.uint8), stacked, tuple(classes), tuple(inks))


def generate_scene(spec: DigitScenesSpec, digits: Digits, task: str, split: str, index: int) -> Scene:
    """Scene `index` of a split, exactly as the generated dataset holds it (digits come from that split only)."""
    return render_scene(spec, digits, digits.split[split], sample_rng(spec.seed, task, split, index))


def encode_jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # 4:4:4 chroma keeps thin coloured strokes crisp in tiny images.
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def encode_label_png(label_map: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(label_map.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def label_map(scene: Scene) -> np.ndarray:
    """Semantic labels of a scene: 0 background, class + 1 on each digit's strokes. [S, S] uint8."""
    labels = np.zeros(scene.image.shape[:2], dtype=np.uint8)
    for mask, cls in zip(scene.masks, scene.classes):
        labels[mask] = cls + LABEL_OFFSET
    return labels


def mask_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a binary mask, with `counts` as str so it is JSON-serialisable."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_categories() -> list[dict[str, Any]]:
    return [
        {"id": cls + LABEL_OFFSET, "name": name, "supercategory": "digit"} for cls, name in enumerate(CLASS_NAMES)
    ]


def write_classification(root: Path, spec: DigitScenesSpec, digits: Digits) -> dict[str, int]:
    counts = {}
    for split, indices in digits.split.items():
        for index in indices:
            rng = sample_rng(spec.seed, "classification", split, index)
            image = render_digit(digits.images[index], spec.image_size, rng)
            folder = root / split / CLASS_NAMES[digits.labels[index]]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"digit_{index:04d}.JPEG").write_bytes(encode_jpeg(image))
        counts[split] = len(indices)
    return counts


def write_coco(root: Path, spec: DigitScenesSpec, digits: Digits) -> dict[str, int]:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    counts = {}
    image_id = annotation_id = 0
    for split, scenes in spec.scene_counts("detection").items():
        folder = root / COCO_SPLITS[split]
        folder.mkdir(parents=True)
        images, annotations = [], []
        for index in range(scenes):
            scene = generate_scene(spec, digits, "detection", split, index)
            image_id += 1
            file_name = f"{image_id:012d}.jpg"
            (folder / file_name).write_bytes(encode_jpeg(scene.image))
            height, width = scene.image.shape[:2]
            images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
            for mask, cls in zip(scene.masks, scene.classes):
                annotation_id += 1
                rle = mask_rle(mask)
                x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
                annotations.append({
                    "id": annotation_id, "image_id": image_id, "category_id": cls + LABEL_OFFSET,
                    "bbox": [x, y, w, h], "area": int(mask.sum()), "iscrowd": 0, "segmentation": rle,
                })  # fmt: skip
        coco = {
            "info": {"description": f"DigitScenes detection (seed {spec.seed})", "version": "1.0"},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": coco_categories(),
        }
        (root / "annotations" / f"instances_{COCO_SPLITS[split]}.json").write_text(json.dumps(coco, sort_keys=True))
        counts[split] = scenes
        counts[f"{split}_annotations"] = len(annotations)
    return counts


def write_ade20k(root: Path, spec: DigitScenesSpec, digits: Digits) -> dict[str, int]:
    counts = {}
    for split, scenes in spec.scene_counts("segmentation").items():
        images = root / "images" / ADE_SPLITS[split]
        labels = root / "annotations" / ADE_SPLITS[split]
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for index in range(scenes):
            scene = generate_scene(spec, digits, "segmentation", split, index)
            stem = f"{ADE_PREFIX[split]}_{index + 1:08d}"
            (images / f"{stem}.jpg").write_bytes(encode_jpeg(scene.image))
            (labels / f"{stem}.png").write_bytes(encode_label_png(label_map(scene)))
        counts[split] = scenes
    return counts


# Where each dataset lives inside the generated folder, relative to it (the roots prepare records).
EMBEDDED_ROOTS = {"imagenet": "classification", "coco": "coco", "ade20k": "ade20k/ADEChallengeData2016"}
_WRITERS = {"imagenet": write_classification, "coco": write_coco, "ade20k": write_ade20k}


def generate(out_dir: Path, spec: DigitScenesSpec, datasets: Iterable[str] = tuple(EMBEDDED_ROOTS)) -> dict[str, Any]:
    """Write the requested DigitScenes datasets under `out_dir` (replacing it atomically); returns counts."""
    digits = load_digits(spec)
    counts = {}
    with atomic_path(out_dir) as staging:
        for dataset in datasets:
            counts[dataset] = _WRITERS[dataset](staging / EMBEDDED_ROOTS[dataset], spec, digits)
    return counts
