"""The shard stage and the readers: round trip, determinism, skips, atomic writes, splitting across ranks x workers."""
import collections
import hashlib
import io
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image
from pycocotools.coco import COCO

from vig.data import (
    classification_pipeline,
    collate_lists,
    detection_pipeline,
    load_manifest,
    make_loader,
    segmentation_pipeline,
    shard_urls,
)
from vig.data.layout import prepare, read_layout
from vig.data.sharding import SPLITS, TASKS, ShardSettings, list_task, sample_key, shard_all, shard_task

DATA = {
    "source": "embedded",
    "seed": 0,
    "embedded": {"digits": 100, "detection": {"train": 32, "val": 16}, "segmentation": {"train": 16, "val": 8}},
}
SETTINGS = ShardSettings(samples_per_shard=8, seed=0, workers=2)
INLINE = ShardSettings(samples_per_shard=8, seed=0, workers=1)  # encodes in-process: monkeypatches apply


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("prepared")
    prepare(DATA, root / "data", root)
    return read_layout(root / "data" / "layout.json")


@pytest.fixture(scope="module")
def shards(layout, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    shard_all(layout, out, SETTINGS)
    return out


def raw_samples(urls: list[str]) -> list[dict]:
    return list(wds.WebDataset(urls, shardshuffle=False))


def test_round_trip_gives_back_every_input_and_matches_the_manifest(layout, shards):
    for task in TASKS:
        manifest = load_manifest(shards, task)
        assert manifest["skipped"] == []
        inputs = list_task(task, layout)
        for split in SPLITS:
            urls = shard_urls(shards, task, split)
            info = manifest["splits"][split]
            assert info["samples"] == info["inputs"] == len(inputs.items[split])
            for url, shard in zip(urls, info["shards"]):
                assert hashlib.sha256(Path(url).read_bytes()).hexdigest() == shard["sha256"]
                assert len(raw_samples([url])) == shard["samples"] <= SETTINGS.samples_per_shard
            samples = {sample["__key__"]: sample for sample in raw_samples(urls)}
            assert len(samples) == info["samples"]
            for item in inputs.items[split]:
                sample = samples[item[1]]
                assert sample["jpg"] == Path(item[0]).read_bytes()  # JPEG inputs are stored untouched
                if task == "classification":
                    assert int(sample["cls"]) == item[2]
                    assert manifest["class_index"][Path(item[0]).parent.name] == item[2]
                elif task == "segmentation":
                    assert sample["png"] == Path(item[2]).read_bytes()
                else:
                    stored = json.loads(sample["json"])
                    assert stored["image_id"] == item[2]["id"] and stored["boxes"] == [a["bbox"] for a in item[3]]
                    assert stored["category_ids"] == [a["category_id"] for a in item[3]]
                    assert all(isinstance(mask["counts"], str) for mask in stored["masks"])


def test_decoded_detection_and_segmentation_samples_equal_the_annotations(layout, shards):
    root = Path(layout["coco"]["root"])
    coco = COCO(str(root / "annotations" / "instances_val2017.json"))
    seen = 0
    for image, target in detection_pipeline(shard_urls(shards, "detection", "val")):
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=target["image_id"]))
        with Image.open(root / "val2017" / coco.imgs[target["image_id"]]["file_name"]) as original:
            expected = torch.from_numpy(np.asarray(original.convert("RGB"))).permute(2, 0, 1)
        assert image.dtype == torch.float32 and torch.equal((image * 255).round().to(torch.uint8), expected)
        xywh = torch.tensor([a["bbox"] for a in annotations])
        xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        assert torch.equal(target["boxes"].as_subclass(torch.Tensor), xyxy)
        assert target["labels"].dtype == torch.int64
        assert target["labels"].tolist() == [a["category_id"] for a in annotations]
        masks = np.stack([coco.annToMask(a) for a in annotations])
        assert target["masks"].dtype == torch.uint8
        np.testing.assert_array_equal(target["masks"].numpy(), masks)
        seen += 1
    assert seen == 16

    ade = Path(layout["ade20k"]["root"]) / "annotations" / "validation"
    labels = [np.asarray(Image.open(path)) for path in sorted(ade.glob("*.png"))]
    decoded = [label.numpy() for _, label in segmentation_pipeline(shard_urls(shards, "segmentation", "val"))]
    assert all(label.dtype == np.int64 for label in decoded)
    assert sorted(label.tobytes() for label in decoded) == sorted(label.astype(np.int64).tobytes() for label in labels)


def test_sharding_is_deterministic_and_shuffles_classes_across_shards(layout, shards, tmp_path):
    # The same bytes, manifests included, whether encoded in a pool or inline and wherever the project lives.
    elsewhere = tmp_path / "another" / "checkout"
    prepare(DATA, elsewhere / "data", elsewhere)
    shard_all(read_layout(elsewhere / "data" / "layout.json"), tmp_path / "shards", INLINE)
    for task in TASKS:
        assert load_manifest(shards, task)["source"] == "embedded"
        written = sorted(path.name for path in (shards / task).iterdir())
        assert written == sorted(path.name for path in (tmp_path / "shards" / task).iterdir())
        for name in written:
            assert (shards / task / name).read_bytes() == (tmp_path / "shards" / task / name).read_bytes(), (task, name)
    # Sorted inputs hold 8 images per class, so unshuffled 8-sample shards would each hold a single class.
    for url in shard_urls(shards, "classification", "train"):
        assert len({int(sample["cls"]) for sample in raw_samples([url])}) >= 4


def copy_layout(layout: dict, folder: Path) -> dict:
    copied = json.loads(json.dumps(layout))
    for dataset, entry in layout.items():
        copied[dataset]["root"] = str(folder / dataset)
        shutil.copytree(entry["root"], folder / dataset)
    return copied


def test_corrupt_images_and_bad_annotations_are_skipped_and_counted(layout, tmp_path):
    broken = copy_layout(layout, tmp_path / "inputs")
    classification = Path(broken["imagenet"]["root"])
    [truncated, garbage, png] = sorted((classification / "val").rglob("*.JPEG"))[:3]
    truncated.write_bytes(truncated.read_bytes()[:200])
    garbage.write_bytes(b"not an image at all")
    with Image.open(png) as image:
        image.save(png, format="PNG")  # a PNG named .JPEG: kept, re-encoded to JPEG

    coco = Path(broken["coco"]["root"])
    annotations_file = coco / "annotations" / "instances_val2017.json"
    instances = json.loads(annotations_file.read_text())
    outside, unknown, undecodable = instances["annotations"][:3]
    outside["bbox"] = [100.0, 100.0, 40.0, 40.0]
    unknown["category_id"] = 99
    undecodable["segmentation"] = [[1.0, 2.0, 3.0]]
    annotations_file.write_text(json.dumps(instances))
    (coco / "val2017" / instances["images"][-1]["file_name"]).write_bytes(b"\xff\xd8\xff garbage")

    ade = Path(broken["ade20k"]["root"])
    [rgb_label, missing_label] = sorted((ade / "annotations" / "validation").glob("*.png"))[:2]
    with Image.open(rgb_label) as label:
        label.convert("RGB").save(rgb_label)
    missing_label.unlink()

    out = tmp_path / "shards"
    expected = {
        "classification": {"unreadable_image": 2},
        "detection": {"box_outside_image": 1, "unknown_category": 1, "undecodable_mask": 1, "unreadable_image": 1},
        "segmentation": {"label_map_not_8bit_single_channel": 1, "missing_label_map": 1},
    }
    val_samples = {"classification": 20 - 2, "detection": 16 - 1, "segmentation": 8 - 2}
    for task in TASKS:
        manifest = shard_task(task, broken, out, INLINE)
        assert manifest == load_manifest(out, task)
        assert manifest["skipped_by_reason"] == expected[task]
        assert all(entry["split"] == "val" and entry["input"] for entry in manifest["skipped"])
        val = manifest["splits"]["val"]
        assert val["samples"] == len(raw_samples(shard_urls(out, task, "val"))) == val_samples[task]
    png_key = sample_key(str(png.relative_to(classification / "val")))
    reencoded = {s["__key__"]: s for s in raw_samples(shard_urls(out, "classification", "val"))}[png_key]
    assert Image.open(io.BytesIO(reencoded["jpg"])).format == "JPEG"
    # A bad annotation is dropped from its image's sample; the image and its other annotations stay.
    stored = [json.loads(sample["json"]) for sample in raw_samples(shard_urls(out, "detection", "val"))]
    targets = {target["image_id"]: target for target in stored}
    bad = {outside["id"], unknown["id"], undecodable["id"]}
    for image_id in {annotation["image_id"] for annotation in (outside, unknown, undecodable)}:
        good = [a["id"] for a in instances["annotations"] if a["image_id"] == image_id and a["id"] not in bad]
        assert targets[image_id]["annotation_ids"] == good


def test_an_interrupted_write_leaves_no_complete_looking_shard(layout, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    written = 0
    original_write = wds.TarWriter.write

    def write_then_fail(self, sample):
        nonlocal written
        written += 1
        if written == 20:  # in the middle of the third train shard
            raise OSError("disk full (injected)")
        return original_write(self, sample)

    monkeypatch.setattr(wds.TarWriter, "write", write_then_fail)
    with pytest.raises(OSError, match="injected"):
        shard_task("classification", layout, out, INLINE)
    assert [path for path in out.rglob("*")] == []  # no tar, no manifest, no leftover temporary

    monkeypatch.setattr(wds.TarWriter, "write", original_write)
    shard_task("classification", layout, out, INLINE)
    before = {path.name: path.read_bytes() for path in (out / "classification").iterdir()}
    written = 0
    monkeypatch.setattr(wds.TarWriter, "write", write_then_fail)
    with pytest.raises(OSError, match="injected"):
        shard_task("classification", layout, out, INLINE)
    assert {path.name: path.read_bytes() for path in (out / "classification").iterdir()} == before
    assert sorted(path.name for path in out.iterdir()) == ["classification"]


def image_ids(loader) -> list[int]:
    return [target["image_id"] for _, targets in loader for target in targets]


def test_exact_pass_reads_each_sample_once_across_workers_and_ranks(shards, monkeypatch):
    urls = shard_urls(shards, "detection", "train")
    everything = image_ids(make_loader(detection_pipeline(urls), batch_size=4, collate_fn=collate_lists))
    assert len(everything) == len(set(everything)) == 32

    loader = make_loader(detection_pipeline(urls), batch_size=4, num_workers=2, collate_fn=collate_lists)
    two_workers = image_ids(loader)
    assert sorted(two_workers) == sorted(everything)

    per_rank = []
    for rank in range(2):  # webdataset reads RANK / WORLD_SIZE when torch.distributed is not initialised
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        pipeline = detection_pipeline(urls, shuffle_buffer=8, seed=3)
        per_rank.append(image_ids(make_loader(pipeline, batch_size=4, num_workers=2, collate_fn=collate_lists)))
    assert sorted(per_rank[0] + per_rank[1]) == sorted(everything)
    assert per_rank[0] and per_rank[1]


def test_resampled_epochs_have_equal_length_on_every_rank_and_follow_the_seed(shards, monkeypatch):
    urls = shard_urls(shards, "classification", "train")
    monkeypatch.setenv("WORLD_SIZE", "2")

    def epoch(rank: int, number: int) -> list[int]:
        monkeypatch.setenv("RANK", str(rank))
        pipeline = classification_pipeline(urls, shuffle_buffer=32, seed=5, resampled=True, epoch_samples=50)
        pipeline.set_epoch(number)
        labels = [label for _, batch in make_loader(pipeline, batch_size=8, num_workers=2) for label in batch.tolist()]
        assert len(labels) == 50  # ceil(50 / 2 workers) = 25 samples per worker
        return labels

    assert epoch(0, 0) == epoch(0, 0)
    assert epoch(0, 0) != epoch(0, 1)
    assert epoch(0, 0) != epoch(1, 0)


def test_readers_say_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the shard stage first"):
        shard_urls(tmp_path, "detection", "val")
    with pytest.raises(ValueError, match="needs epoch_samples"):
        classification_pipeline(["a.tar"], resampled=True)


def test_prepare_and_shard_stages_log_their_mlflow_runs(mlflow_store, tmp_path, monkeypatch):
    from stages import prepare as prepare_stage
    from stages import shard as shard_stage
    from vig.tracking import PIPELINE_ID_ENV

    monkeypatch.setenv(PIPELINE_ID_ENV, "pipe-1")

    params = {"experiment": "unit", "data": DATA, "shard": {"samples_per_shard": 64, "seed": 0, "workers": 2}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    prepare_stage.main()
    corrupt = sorted((tmp_path / "data" / "digitscenes" / "classification" / "train" / "digit_7").iterdir())[0]
    corrupt.write_bytes(b"corrupt")
    shard_stage.main()

    client = mlflow.MlflowClient(tracking_uri=mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("unit").experiment_id], order_by=["attributes.start_time"])
    prepare_run, shard_run = runs
    for run, stage in ((prepare_run, "prepare"), (shard_run, "shard")):
        assert run.data.tags["stage"] == stage and run.data.tags["pipeline_id"] == "pipe-1"
        assert run.info.status == "FINISHED"
    assert prepare_run.data.params["prepare.source"] == "embedded" and prepare_run.data.metrics["coco.val"] == 16
    assert [a.path for a in client.list_artifacts(prepare_run.info.run_id)] == ["layout.json"]

    assert shard_run.data.params == {"shard.samples_per_shard": "64", "shard.seed": "0", "shard.workers": "2"}
    metrics = shard_run.data.metrics
    assert metrics["classification.train.samples"] == 79 and metrics["classification.skipped.unreadable_image"] == 1
    assert metrics["detection.val.samples"] == 16 and metrics["samples_per_s"] > 0
    assert [a.path for a in client.list_artifacts(shard_run.info.run_id)] == list(TASKS)
    logged = client.download_artifacts(shard_run.info.run_id, "detection/manifest.json", str(tmp_path / "download"))
    assert json.loads(Path(logged).read_text()) == load_manifest(tmp_path / "shards", "detection")
    assert json.loads((tmp_path / "metrics" / "shard.json").read_text()) == metrics
