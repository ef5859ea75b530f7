"""The prepare stage: DigitScenes generation (determinism, COCO / ADE20K correctness) and real-root validation.

The stage's MLflow run is tested with the shard stage's in test_shard.py (one sqlite store for both).
"""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from vig.data import digitscenes
from vig.data.layout import DatasetLayoutError, prepare, read_layout

SMALL = {"digits": 100, "detection": {"train": 8, "val": 4}, "segmentation": {"train": 8, "val": 4}}


def small_params(seed: int = 0, **overrides) -> dict:
    return {"source": "embedded", "seed": seed, "embedded": SMALL, **overrides}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("generated")
    prepare(small_params(), root / "data", root)
    return root / "data"


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_generation_is_byte_identical_for_a_seed_and_differs_across_seeds(generated, tmp_path):
    first = tree_bytes(generated / "digitscenes")
    assert len(first) == 100 + (8 + 4) + 2 + 2 * (8 + 4)  # digits, COCO scenes + jsons, ADE scenes + label maps
    spec = digitscenes.DigitScenesSpec.from_params(small_params())
    digitscenes.generate(tmp_path / "again", spec, ["coco", "ade20k"])
    again = tree_bytes(tmp_path / "again")
    assert again == {name: data for name, data in first.items() if not name.startswith("classification/")}
    # Classification images are pure functions of (seed, split, index): re-rendering gives the same bytes.
    digits = digitscenes.load_digits(spec)
    for split in ("train", "val"):
        for index in digits.split[split][:20]:
            name = f"classification/{split}/{digitscenes.CLASS_NAMES[digits.labels[index]]}/digit_{index:04d}.JPEG"
            rng = digitscenes.sample_rng(spec.seed, "classification", split, index)
            assert first[name] == digitscenes.encode_jpeg(digitscenes.render_digit(digits.images[index], 32, rng))

    other = digitscenes.DigitScenesSpec.from_params(small_params(seed=1))
    digitscenes.generate(tmp_path / "other", other, ["coco"])
    differing = [name for name, data in tree_bytes(tmp_path / "other").items() if first[name] != data]
    assert len(differing) == 8 + 4 + 2  # every scene and both annotation files
    assert not np.array_equal(digitscenes.load_digits(other).split["val"], digits.split["val"])


def test_classification_is_an_imagefolder_with_a_stratified_split(generated):
    root = generated / "digitscenes" / "classification"
    counts = {
        split: {folder.name: len(list(folder.glob("*.JPEG"))) for folder in (root / split).iterdir()}
        for split in ("train", "val")
    }
    assert sorted(counts["train"]) == sorted(counts["val"]) == list(digitscenes.CLASS_NAMES)
    assert sum(counts["train"].values()) == 80 and sum(counts["val"].values()) == 20
    for name in digitscenes.CLASS_NAMES:  # stratified: 10 of each class, 2 of them in val
        assert counts["train"][name] == 8 and counts["val"][name] == 2
    with Image.open(next((root / "val" / "digit_3").glob("*.JPEG"))) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (32, 32))


def tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def test_coco_loads_in_pycocotools_and_masks_boxes_agree_with_pixels(generated):
    spec = digitscenes.DigitScenesSpec.from_params(small_params())
    digits = digitscenes.load_digits(spec)
    root = generated / "digitscenes" / "coco"
    checked = 0
    for split, folder in digitscenes.COCO_SPLITS.items():
        coco = COCO(str(root / "annotations" / f"instances_{folder}.json"))
        assert [c["id"] for c in coco.loadCats(coco.getCatIds())] == list(range(1, 11))
        for index, image_id in enumerate(sorted(coco.getImgIds())):
            scene = digitscenes.generate_scene(spec, digits, "detection", split, index)
            annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            assert len(annotations) == len(scene.masks) >= 1
            with Image.open(root / folder / coco.imgs[image_id]["file_name"]) as image:
                pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
            assert np.abs(pixels - scene.image).mean() < 6  # JPEG q95 of exactly the rendered (noisy) scene
            for annotation, mask, cls, ink in zip(annotations, scene.masks, scene.classes, scene.inks):
                decoded = coco.annToMask(annotation).astype(bool)
                np.testing.assert_array_equal(decoded, mask)
                assert annotation["bbox"] == tight_box(mask)
                assert annotation["area"] == mask.sum()
                assert annotation["category_id"] == cls + 1 and annotation["iscrowd"] == 0
                assert np.all(scene.image[mask] == ink)  # the mask is exactly the inked stroke pixels
                # ...and it is what the stored JPEG shows: stroke pixels are near the ink, others far from it.
                near_ink = np.abs(pixels - np.array(ink)).max(axis=-1) < 40
                x, y, w, h = (int(v) for v in annotation["bbox"])
                window = np.s_[y : y + h, x : x + w]
                agreement = (near_ink[window] == mask[window]).mean()
                assert agreement > 0.9, agreement
                checked += 1
    assert checked >= 12


def test_ade20k_label_maps_hold_only_valid_ids_and_match_the_scenes(generated):
    spec = digitscenes.DigitScenesSpec.from_params(small_params())
    digits = digitscenes.load_digits(spec)
    root = generated / "digitscenes" / "ade20k" / "ADEChallengeData2016"
    for split, folder in digitscenes.ADE_SPLITS.items():
        labels = sorted((root / "annotations" / folder).glob("*.png"))
        images = sorted((root / "images" / folder).glob("*.jpg"))
        assert [p.stem for p in labels] == [p.stem for p in images] and len(labels) == SMALL["segmentation"][split]
        for index, path in enumerate(labels):
            with Image.open(path) as label_image:
                assert label_image.mode == "L"
                label = np.asarray(label_image)
            assert set(np.unique(label)) <= set(range(11)) and label.max() > 0
            scene = digitscenes.generate_scene(spec, digits, "segmentation", split, index)
            np.testing.assert_array_equal(label, digitscenes.label_map(scene))


def make_imagenet(root: Path, classes=("n01440764", "n01443537")) -> None:
    for split in ("train", "val"):
        for wnid in classes:
            folder = root / split / wnid
            folder.mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(folder / f"{wnid}_1.JPEG")


def test_validation_names_every_missing_piece_in_one_message(tmp_path):
    real = tmp_path / "datasets"
    make_imagenet(real / "imagenet")
    for path in (real / "imagenet" / "val").iterdir():  # val not sorted into class folders
        for image in path.iterdir():
            image.rename(real / "imagenet" / "val" / image.name)
        path.rmdir()
    (real / "coco" / "train2017").mkdir(parents=True)
    (real / "coco" / "annotations").mkdir()
    (real / "coco" / "annotations" / "instances_train2017.json").write_text("{}")
    (real / "ade20k" / "ADEChallengeData2016" / "images" / "training").mkdir(parents=True)

    with pytest.raises(DatasetLayoutError) as error:
        prepare({"source": str(real)}, tmp_path / "data", tmp_path)
    message = str(error.value)
    for missing in (
        "imagenet/val/ has no class folders",
        "valprep.sh",
        "coco/val2017/ missing",
        "coco/annotations/instances_val2017.json missing",
        "ADEChallengeData2016/images/validation/ missing",
        "ADEChallengeData2016/annotations/training/ missing",
        "ADEChallengeData2016/annotations/validation/ missing",
    ):
        assert missing in message, (missing, message)
    for present in ("coco/train2017/ missing", "images/training/ missing", "instances_train2017.json missing"):
        assert present not in message
    assert not (tmp_path / "data" / "layout.json").exists()


OBJECT_INFO = "Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n2\t0.1072\t6046\t612\tbuilding, edifice\n"


def test_explicit_real_roots_mix_with_embedded_data(tmp_path):
    make_imagenet(tmp_path / "imagenet")
    ade = tmp_path / "ade" / "ADEChallengeData2016"
    for folder in ("images/training", "images/validation", "annotations/training", "annotations/validation"):
        (ade / folder).mkdir(parents=True)
    (ade / "objectInfo150.txt").write_text(OBJECT_INFO)

    prepare(small_params(imagenet="imagenet", ade20k=str(tmp_path / "ade")), tmp_path / "data", tmp_path)
    layout = read_layout(tmp_path / "data" / "layout.json")
    assert layout["imagenet"] == {"root": str(tmp_path / "imagenet"), "source": "user"}
    assert layout["ade20k"] == {"root": str(ade), "source": "user", "classes": ["other", "wall", "building, edifice"]}
    assert layout["coco"]["source"] == "embedded" and Path(layout["coco"]["root"], "val2017").is_dir()
    assert sorted(path.name for path in (tmp_path / "data" / "digitscenes").iterdir()) == ["coco"]


def test_layout_of_generated_data_does_not_depend_on_where_the_project_lives(tmp_path):
    for project in ("a", "b/c"):
        prepare(small_params(), tmp_path / project / "data", tmp_path / project)
    layouts = [(tmp_path / project / "data" / "layout.json").read_bytes() for project in ("a", "b/c")]
    assert layouts[0] == layouts[1]
    layout = read_layout(tmp_path / "b/c" / "data" / "layout.json")
    assert layout["coco"]["root"] == str((tmp_path / "b/c" / "data" / "digitscenes" / "coco").resolve())
    assert all(Path(layout[dataset]["root"]).is_dir() for dataset in ("imagenet", "coco", "ade20k"))


def test_bad_embedded_params_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown keys in data.embedded: \\['scenes'\\]"):
        digitscenes.DigitScenesSpec.from_params({"embedded": {"scenes": 3}})
    with pytest.raises(ValueError, match="digit_size"):
        digitscenes.DigitScenesSpec.from_params({"embedded": {"digit_size": [16, 400]}})
    with pytest.raises(ValueError, match="one digit per class in train and in val, got 30"):
        digitscenes.DigitScenesSpec.from_params({"embedded": {"digits": 30}})

