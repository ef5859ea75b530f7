"""Where the three datasets live: resolving params to roots, validating real roots, and the layout file.

`prepare` writes `data/layout.json`; `shard` reads it, so sharding is the same for the embedded
DigitScenes and for real ImageNet / COCO / ADE20K. Resolution, per dataset:

1. an explicit root (`data.imagenet`, `data.coco`, `data.ade20k`) wins;
2. else with `data.source: embedded` the dataset is generated (DigitScenes);
3. else `data.source` is a folder holding `imagenet/`, `coco/` and `ade20k/`.

Relative paths are taken from the project root. Mixing is allowed, e.g. `source: embedded` with
`imagenet: /datasets/imagenet` pretrains on real ImageNet and fine-tunes on DigitScenes.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from vig.atomic import write_json
from vig.data import digitscenes

EMBEDDED = "embedded"
DATASETS = ("imagenet", "coco", "ade20k")
LAYOUT_FILE = "layout.json"
EMBEDDED_DIR = "digitscenes"
ADE_FOLDER = "ADEChallengeData2016"
ADE_CLASS_FILE = "objectInfo150.txt"  # shipped with ADEChallengeData2016: Idx, Ratio, Train, Val, Name
ADE_UNLABELLED_NAME = "other"  # ADE20K's label 0: pixels of none of the 150 classes
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

EXPECTED = {
    "imagenet": "ImageFolder: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG",
    "coco": "train2017/, val2017/, annotations/instances_{train,val}2017.json",
    "ade20k": f"{ADE_FOLDER}/images/{{training,validation}}/*.jpg, "
    f"{ADE_FOLDER}/annotations/{{training,validation}}/*.png",
}


class DatasetLayoutError(ValueError):
    """A real dataset root is missing pieces; the message lists every one of them."""


def resolve_roots(data_params: dict[str, Any], project_root: Path) -> dict[str, Path | None]:
    """Dataset -> absolute root of the user's data, or None where DigitScenes is generated."""
    source = data_params.get("source", EMBEDDED)
    if source is None or str(source).strip() == "":
        raise ValueError("data.source is empty: set it to `embedded` or to a folder holding imagenet/, coco/, ade20k/")
    roots: dict[str, Path | None] = {}
    for dataset in DATASETS:
        explicit = data_params.get(dataset)
        if explicit:
            roots[dataset] = _absolute(explicit, project_root)
        elif source == EMBEDDED:
            roots[dataset] = None
        else:
            roots[dataset] = _absolute(source, project_root) / dataset
    return roots


def _absolute(path: str | os.PathLike, project_root: Path) -> Path:
    path = Path(os.path.expanduser(str(path)))
    return (path if path.is_absolute() else project_root / path).resolve()


def ade20k_root(root: Path) -> Path:
    """Accept either the folder holding ADEChallengeData2016/ or ADEChallengeData2016/ itself."""
    if (root / ADE_FOLDER).is_dir():
        return root / ADE_FOLDER
    if root.name == ADE_FOLDER or (root / "images").is_dir():
        return root
    return root / ADE_FOLDER


def _missing_dirs(root: Path, relative: list[str]) -> list[str]:
    return [f"{root / name}/ missing" for name in relative if not (root / name).is_dir()]


def _class_folders(folder: Path) -> set[str]:
    return {entry.name for entry in os.scandir(folder) if entry.is_dir()}


def _has_images(folder: Path) -> bool:
    return any(entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES) for entry in os.scandir(folder))


def validate_imagenet(root: Path) -> list[str]:
    problems = _missing_dirs(root, ["train", "val"])
    if problems:
        return problems
    train, val = _class_folders(root / "train"), _class_folders(root / "val")
    if not train:
        problems.append(f"{root / 'train'}/ has no class folders (expected train/<wnid>/*.JPEG)")
    if not val:
        flat = _has_images(root / "val")
        hint = " (val/ holds the images directly: sort them into val/<wnid>/, e.g. with ImageNet's valprep.sh)"
        problems.append(f"{root / 'val'}/ has no class folders{hint if flat else ''}")
    empty = sorted(f"{split}/{name}" for split, names in (("train", train), ("val", val)) for name in names
                   if not _has_images(root / split / name))  # fmt: skip
    if empty:
        problems.append(f"class folders without images under {root}: {_first(empty)}")
    unknown = sorted(val - train)
    if unknown and train:
        problems.append(f"val/ classes that train/ lacks: {_first(unknown)}")
    return problems


def validate_coco(root: Path) -> list[str]:
    problems = _missing_dirs(root, ["train2017", "val2017"])
    for split in ("train2017", "val2017"):
        annotation = root / "annotations" / f"instances_{split}.json"
        if not annotation.is_file():
            problems.append(f"{annotation} missing")
    return problems


def validate_ade20k(root: Path) -> list[str]:
    folders = [f"{kind}/{split}" for kind in ("images", "annotations") for split in ("training", "validation")]
    return _missing_dirs(ade20k_root(root), folders)


_VALIDATORS = {"imagenet": validate_imagenet, "coco": validate_coco, "ade20k": validate_ade20k}


def validate_roots(roots: dict[str, Path]) -> None:
    """Check every given dataset root; raise one DatasetLayoutError naming everything that is missing."""
    problems = []
    for dataset, root in roots.items():
        found = [f"{root}/ does not exist"] if not root.is_dir() else _VALIDATORS[dataset](root)
        problems += [f"{dataset}: {problem} (expected {EXPECTED[dataset]})" for problem in found]
    if problems:
        listing = "\n".join(f"  - {problem}" for problem in problems)
        raise DatasetLayoutError(
            f"dataset roots are incomplete:\n{listing}\n"
            "Fix the folders, point data.source / data.imagenet / data.coco / data.ade20k at the right places "
            f"in params.yaml, or set data.source: {EMBEDDED} to use the embedded DigitScenes."
        )


def _first(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def ade20k_classes(root: Path) -> list[str] | None:
    """Label id -> name from objectInfo150.txt (id 0 is 'other'), or None when the file is absent."""
    class_file = root / ADE_CLASS_FILE
    if not class_file.is_file():
        return None
    names = {}
    for line in class_file.read_text().splitlines():
        # Columns Idx, Ratio, Train, Val, Name; a name may hold spaces ("building, edifice").
        fields = line.strip().split(maxsplit=4)
        if len(fields) == 5 and fields[0].isdigit():
            names[int(fields[0])] = fields[4]
    if not names or sorted(names) != list(range(1, len(names) + 1)):
        raise DatasetLayoutError(
            f"{class_file}: expected a header, then rows 'Idx Ratio Train Val Name' numbered 1..N; "
            "restore the file from the ADEChallengeData2016 download or delete it (label ids are then unchecked)"
        )
    return [ADE_UNLABELLED_NAME] + [names[index] for index in sorted(names)]


def prepare(data_params: dict[str, Any], data_dir: Path, project_root: Path) -> dict[str, Any]:
    """The prepare stage: generate DigitScenes where needed, validate real roots, write `data_dir/layout.json`.

    Returns the stage's metrics (seconds, and image counts of generated datasets).
    """
    start = time.perf_counter()
    roots = resolve_roots(data_params, project_root)
    validate_roots({dataset: root for dataset, root in roots.items() if root is not None})
    embedded = [dataset for dataset, root in roots.items() if root is None]
    generated_dir = data_dir / EMBEDDED_DIR
    counts: dict[str, Any] = {}
    if embedded:
        spec = digitscenes.DigitScenesSpec.from_params(data_params)
        counts = digitscenes.generate(generated_dir, spec, embedded)
    elif generated_dir.exists():
        shutil.rmtree(generated_dir)  # left from an earlier embedded run; data/ should hold only what layout names
    layout: dict[str, Any] = {}
    for dataset, root in roots.items():
        if root is None:  # relative to data_dir, so that data/ hashes the same wherever the project lives
            root = Path(EMBEDDED_DIR, digitscenes.EMBEDDED_ROOTS[dataset]).as_posix()
        elif dataset == "ade20k":
            root = ade20k_root(root)
        layout[dataset] = {"root": str(root), "source": EMBEDDED if dataset in embedded else "user"}
    layout["ade20k"]["classes"] = (
        [digitscenes.BACKGROUND_NAME, *digitscenes.CLASS_NAMES] if "ade20k" in embedded
        else ade20k_classes(Path(layout["ade20k"]["root"]))
    )  # fmt: skip
    write_json(data_dir / LAYOUT_FILE, layout)
    return {"seconds": round(time.perf_counter() - start, 3), **counts}


def read_layout(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the prepare stage first (`python -m stages.prepare`)")
    layout = json.loads(path.read_text())
    missing = [dataset for dataset in DATASETS if dataset not in layout]
    if missing:
        raise ValueError(f"{path} lacks {missing}: rerun the prepare stage")
    for dataset in DATASETS:  # generated data is recorded relative to the layout file's folder
        if not Path(layout[dataset]["root"]).is_absolute():
            layout[dataset]["root"] = str((path.parent / layout[dataset]["root"]).resolve())
    return layout
