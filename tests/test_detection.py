"""Mask R-CNN with a ViG backbone: forward/backward, COCO evaluation, and the finetune_det / evaluate_det path."""
import json
import shlex
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from pycocotools.coco import COCO
from torchvision import tv_tensors

import vig  # noqa: F401  (registers the ViG models)
from dense_shards import write_dense_shards
from vig.dense.config import EvaluateDetConfig, EvaluateSegConfig, FinetuneDetConfig, FinetuneSegConfig, load_section
from vig.dense.det_finetune import finetune_detection
from vig.dense.detection import MaskRCNNConfig, build_maskrcnn
from vig.dense.evaluation import evaluate_detection
from vig.dense.metrics import coco_evaluate, detections_to_coco, encode_masks
from vig.dense.transforms import detection_transform
from vig.engine.config import from_dict
from vig.tracking import stage_run

TRUNK = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 1}
SMALL_DETECTOR = {
    "pyramid_strides": [4, 8, 16, 32], "fpn_channels": 32, "anchor_sizes": [[12], [24], [48], [96], [192]],
    "min_size": 96, "max_size": 128, "box_head_dim": 64, "mask_head_dim": 32, "mask_head_convs": 1,
    "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100, "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50, "box_batch_size_per_image": 64, "box_detections_per_img": 20,
}  # fmt: skip


def test_maskrcnn_forward_backward_with_a_vig_backbone_on_cpu():
    torch.manual_seed(0)
    config = from_dict(MaskRCNNConfig, SMALL_DETECTOR, "model")
    model = build_maskrcnn("vig_tiny", TRUNK, 11, config)
    images = [torch.rand(3, 96, 128), torch.rand(3, 112, 80)]
    targets = []
    for image, boxes in zip(images, ([[10.0, 12.0, 40.0, 50.0], [60.0, 20.0, 90.0, 70.0]], [[5.0, 5.0, 30.0, 60.0]])):
        masks = torch.zeros(len(boxes), *image.shape[-2:], dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes):
            mask[int(y1) : int(y2), int(x1) : int(x2)] = 1
        targets.append({"boxes": torch.tensor(boxes), "labels": torch.tensor([3, 7][: len(boxes)]), "masks": masks})
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    assert model.backbone.body.trunk.pos_embed.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    for image, output in zip(images, outputs):
        assert output["masks"].shape[1:] == (1, *image.shape[-2:])  # pasted back at the input size
        assert len(output["boxes"]) <= SMALL_DETECTOR["box_detections_per_img"]


def test_training_transform_drops_crowd_regions_and_flips_boxes_with_masks():
    masks = torch.zeros(2, 20, 30, dtype=torch.uint8)
    masks[0, 2:8, 3:9] = 1
    target = {"boxes": tv_tensors.BoundingBoxes([[3.0, 2.0, 9.0, 8.0], [0.0, 0.0, 30.0, 20.0]], format="XYXY",
                                                canvas_size=(20, 30)),
              "labels": torch.tensor([4, 1]), "masks": tv_tensors.Mask(masks), "area": torch.tensor([36.0, 600.0]),
              "iscrowd": torch.tensor([0, 1]), "image_id": 5}  # fmt: skip
    image = tv_tensors.Image(torch.zeros(3, 20, 30, dtype=torch.uint8))
    image, out = detection_transform(hflip_prob=1.0)(image, target)
    assert image.dtype == torch.float32 and out["labels"].tolist() == [4] and out["iscrowd"].tolist() == [0]
    assert out["boxes"].tolist() == [[21.0, 2.0, 27.0, 8.0]]  # x -> 30 - x
    assert out["masks"].shape == (1, 20, 30) and out["masks"][0, 2:8, 21:27].all() and out["masks"].sum() == 36
    assert out["image_id"] == 5


def _ground_truth() -> tuple[COCO, list[dict]]:
    masks = np.zeros((3, 64, 80), np.uint8)
    masks[0, 5:20, 5:30] = 1
    masks[1, 30:60, 40:70] = 1
    masks[2, 10:50, 10:50] = 1
    annotations = []
    for index, (mask, rle, category, image_id) in enumerate(zip(masks, encode_masks(masks), [1, 2, 1], [1, 1, 2])):
        ys, xs = np.nonzero(mask)
        box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        annotations.append({"id": index + 1, "image_id": image_id, "category_id": category, "segmentation": rle,
                            "area": float(mask.sum()), "bbox": box, "iscrowd": 0})  # fmt: skip
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "width": 80, "height": 64}, {"id": 2, "width": 80, "height": 64}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": annotations,
    }
    coco.createIndex()
    return coco, annotations


def test_coco_ap_is_one_for_predictions_equal_to_the_ground_truth_and_zero_for_none():
    coco, annotations = _ground_truth()
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "segmentation": a["segmentation"], "score": 1.0} for a in annotations]  # fmt: skip
    scores, summary = coco_evaluate(coco, perfect)
    for iou_type in ("bbox", "segm"):
        assert scores[iou_type]["AP"] == pytest.approx(1.0)
        assert scores[iou_type]["AP50"] == pytest.approx(1.0) and scores[iou_type]["AP75"] == pytest.approx(1.0)
        assert scores[iou_type]["APl"] == -1.0  # no object above 96^2 px: COCO's "not applicable"
    assert "Average Precision" in summary
    empty, _ = coco_evaluate(coco, [])
    assert all(empty[t][k] == 0.0 for t in ("bbox", "segm") for k in ("AP", "AP50", "AP75", "APs"))
    # A wrong class everywhere scores 0 too.
    wrong = [{**p, "category_id": 3 - p["category_id"]} for p in perfect]
    assert coco_evaluate(coco, wrong, iou_types=("bbox",))[0]["bbox"]["AP"] == 0.0


def test_torchvision_outputs_become_coco_results():
    masks = torch.zeros(2, 1, 20, 30)
    masks[0, 0, 2:8, 3:9] = 0.9
    masks[1, 0, 10:20, 0:30] = 0.6
    prediction = {"boxes": torch.tensor([[3.0, 2.0, 9.0, 8.0], [0.0, 10.0, 30.0, 20.0]]),
                  "labels": torch.tensor([4, 9]), "scores": torch.tensor([0.9, 0.3]), "masks": masks}  # fmt: skip
    results = detections_to_coco(17, prediction)
    assert [r["bbox"] for r in results] == [[3.0, 2.0, 6.0, 6.0], [0.0, 10.0, 30.0, 10.0]]
    assert [(r["image_id"], r["category_id"]) for r in results] == [(17, 4), (17, 9)]
    assert results[0]["score"] == pytest.approx(0.9)
    assert json.loads(json.dumps(results)) == results  # JSON-ready RLEs


@pytest.fixture(scope="module")
def dense_root(tmp_path_factory):
    return write_dense_shards(tmp_path_factory.mktemp("dense"))


def test_finetune_det_on_ray_workers_lowers_the_loss_logs_pictures_and_evaluates(dense_root, mlflow_store):
    section = {
        "backend": "ray", "num_workers": 2, "use_gpu": False, "init": {"kind": "none"},
        "trunk": {"name": "vig_tiny", "kwargs": TRUNK},
        "epochs": 6, "lr_steps": [5], "log_every_steps": 1, "progress_bar": False,
        "optim": {"batch_size": 2, "lr": 1.0e-3, "warmup_iters": 2},
        "data": {"shard_root": str(dense_root / "shards"), "shuffle_buffer": 8, "preview_images": 2},
        "model": SMALL_DETECTOR,
        "out_dir": str(dense_root / "finetune_det"), "metrics": str(dense_root / "metrics" / "finetune_det.json"),
    }  # fmt: skip
    config = load_section(FinetuneDetConfig, section, "finetune_det", dense_root)
    with stage_run("finetune_det", section, experiment="unit") as run:
        metrics = finetune_detection(config, run.info.run_id)
    # 8 scenes, 2 workers x 2 images per step: 2 steps per epoch.
    assert metrics["steps"] == 12 and metrics["global_batch"] == 4 and metrics["train_images_per_s"] > 0
    client = mlflow.MlflowClient(mlflow_store)
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert {m.key for m in client.get_metric_history(run.info.run_id, "train/loss_mask")} == {"train/loss_mask"}
    artifacts = {a.path for folder in ("plots", "checkpoints") for a in client.list_artifacts(run.info.run_id, folder)}
    assert artifacts == {"plots/predictions.png", "checkpoints/model.pt"}
    assert not (dense_root / "finetune_det" / "run").exists()  # the resumable state is removed once done

    evaluation = {"checkpoint": str(dense_root / "finetune_det" / "model.pt"), "shard_root": str(dense_root / "shards"),
                  "layout": str(dense_root / "data" / "layout.json"), "preview_images": 2,
                  "metrics": str(dense_root / "metrics" / "evaluate_det.json"), "plot": str(dense_root / "det.png")}
    scores = evaluate_detection(load_section(EvaluateDetConfig, evaluation, "evaluate_det", dense_root))
    assert scores["images"] == 4
    for iou_type in ("bbox", "segm"):
        assert set(scores[iou_type]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert all(-1.0 <= value <= 1.0 for value in scores[iou_type].values())
    assert json.loads((dense_root / "metrics" / "evaluate_det.json").read_text()) == scores
    assert (dense_root / "det.png").stat().st_size > 0


ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"finetune_det": FinetuneDetConfig, "evaluate_det": EvaluateDetConfig,
            "finetune_seg": FinetuneSegConfig, "evaluate_seg": EvaluateSegConfig}  # fmt: skip


@pytest.mark.parametrize("path", ["params.yaml", "pipelines/coco/maskrcnn_vig_tiny_1x.yaml",
                                  "pipelines/ade20k/upernet_vig_tiny_160k.yaml"])  # fmt: skip
def test_dense_sections_of_params_and_paper_scale_variants_are_valid(path):
    params = yaml.safe_load((ROOT / path).read_text())
    found = [name for name in SECTIONS if name in params]
    assert found
    for name in found:
        load_section(SECTIONS[name], params[name], name, ROOT)
    if "finetune_det" in params and path != "params.yaml":  # the COCO 1x recipe
        det = load_section(FinetuneDetConfig, params["finetune_det"], "finetune_det", ROOT)
        assert (det.epochs, det.lr_steps, det.optim.lr, det.optim.weight_decay) == (12, (8, 11), 1e-4, 0.05)
        assert det.optim.batch_size * det.num_workers == 16 and (det.model.min_size, det.model.max_size) == (800, 1333)
    if "finetune_seg" in params and path != "params.yaml":  # the ADE20K 160k recipe
        seg = load_section(FinetuneSegConfig, params["finetune_seg"], "finetune_seg", ROOT)
        recipe = (seg.iterations, seg.crop_size, seg.ratio_range, seg.model.channels)
        assert recipe == (160_000, (512, 512), (0.5, 2.0), 512)
        assert seg.optim.batch_size * seg.num_workers == 16 and seg.model.aux_weight == 0.4 and seg.reduce_zero_label


@pytest.mark.parametrize("dataset, recipe, last_stage", [("coco", "maskrcnn_vig_tiny_1x", "evaluate_det"),
                                                         ("ade20k", "upernet_vig_h_tiny_160k", "evaluate_seg")])
def test_recipe_runner_writes_the_params_and_the_dvc_experiment_that_applies_them(dataset, recipe, last_stage,
                                                                                  tmp_path, capsys):
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run --set-param` does to params.yaml

    from pipelines.recipes import main

    recipe_sections = yaml.safe_load((ROOT / f"pipelines/{dataset}/{recipe}.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())

    def same_sections(got: dict) -> bool:
        names = [name for name in SECTIONS if name in recipe_sections]
        return all(load_section(SECTIONS[n], got[n], n, ROOT) == load_section(SECTIONS[n], recipe_sections[n], n, ROOT)
                   for n in names)  # fmt: skip

    written_file = tmp_path / "written.yaml"
    assert main(dataset, [recipe, f"--{dataset}", "/datasets/root", "--write", str(written_file)]) == 0
    written = yaml.safe_load(written_file.read_text())
    assert same_sections(written) and written["experiment"] == f"vig-{dataset}-{recipe}"
    assert written["data"] == {**params["data"], dataset: "/datasets/root"}
    assert written["pretrain"] == params["pretrain"]

    assert main(dataset, [recipe, "--dry-run"]) == 0
    command = shlex.split(capsys.readouterr().out.splitlines()[-1])
    assert command[command.index("-n") + 1] == f"{dataset}-{recipe}" and command[-1] == last_stage
    applied_file = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", applied_file)
    apply_overrides(str(applied_file), [command[i + 1] for i, arg in enumerate(command) if arg == "--set-param"])
    applied = yaml.safe_load(applied_file.read_text())
    assert same_sections(applied) and applied["experiment"] == f"vig-{dataset}-{recipe}"
    untouched = set(params) - set(recipe_sections)
    assert {k: applied[k] for k in untouched} == {k: params[k] for k in untouched}


def test_unknown_or_mistyped_params_are_named():
    with pytest.raises(ValueError, match="finetune_det.optim.learning_rate"):
        load_section(FinetuneDetConfig, {"optim": {"learning_rate": 0.1}}, "finetune_det", ROOT)
    with pytest.raises(ValueError, match="finetune_det.lr_steps"):
        load_section(FinetuneDetConfig, {"epochs": 4, "lr_steps": [6]}, "finetune_det", ROOT)
    with pytest.raises(ValueError, match="finetune_seg.init.kind"):
        load_section(FinetuneSegConfig, {"init": {"kind": "imagenet"}}, "finetune_seg", ROOT)
