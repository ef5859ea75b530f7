"""UperNet on ViG: mIoU arithmetic, label conventions, sliding windows, transforms, and the
finetune_seg / evaluate_seg path (resume after a failure included)."""
import json

import mlflow
import numpy as np
import pytest
import torch
from torchvision import tv_tensors

import vig  # noqa: F401  (registers the ViG models)
from dense_shards import write_dense_shards
from vig.dense.config import EvaluateSegConfig, FinetuneSegConfig, load_section
from vig.dense.evaluation import evaluate_segmentation
from vig.dense.metrics import confusion_matrix, segmentation_scores
from vig.dense.seg_finetune import finetune_segmentation
from vig.dense.segmentation import UperNetConfig, UperNetSegmentor, slide_logits
from vig.dense.transforms import reduce_zero_label, segmentation_train_transform
from vig.engine.config import from_dict
from vig.engine.pretrain import InjectedFailure
from vig.tracking import stage_run


def test_miou_macc_aacc_match_hand_computed_values():
    label = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255]])
    prediction = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 2], [2, 0, 0, 1]])
    # Counting the 10 labelled pixels (rows = truth, columns = prediction):
    #   class 0: 4 pixels -> 3 right, 1 as class 1;  class 1: 4 -> 3 right, 1 as 2;  class 2: 2 -> 1 right, 1 as 0.
    confusion = confusion_matrix(prediction, label, num_classes=4)
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[1, 2], expected[2, 2], expected[2, 0] = 3, 1, 3, 1, 1, 1
    assert torch.equal(confusion, expected)
    scores = segmentation_scores(confusion)
    # IoU = TP / (TP + FP + FN): 0 -> 3/(3+1+1), 1 -> 3/(3+1+1), 2 -> 1/(1+1+1); class 3 absent (NaN, skipped).
    iou = [3 / 5, 3 / 5, 1 / 3]
    assert scores["IoU"][:3] == pytest.approx(iou) and scores["IoU"][3] is None
    assert scores["mIoU"] == pytest.approx(sum(iou) / 3)
    assert scores["mAcc"] == pytest.approx((3 / 4 + 3 / 4 + 1 / 2) / 3)
    assert scores["aAcc"] == pytest.approx(7 / 10)


def test_confusion_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match="reduce_zero_label"):
        confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 7), num_classes=4)


def test_reduce_zero_label_ignores_background_and_shifts_classes():
    label = torch.tensor([[0, 1, 2], [150, 255, 0]], dtype=torch.uint8)
    assert reduce_zero_label(label).tolist() == [[255, 0, 1], [149, 255, 255]]


def test_sliding_window_equals_whole_image_for_a_pixelwise_model():
    weight = torch.randn(5, 3, 1, 1)
    pixelwise = lambda x: torch.nn.functional.conv2d(x, weight)  # noqa: E731
    images = torch.rand(2, 3, 37, 50)
    whole = pixelwise(images)
    assert torch.allclose(slide_logits(pixelwise, images, 5, crop_size=(16, 16), stride=(11, 11)), whole, atol=1e-6)
    # A crop larger than the image: padded for the forward, cut back.
    assert torch.allclose(slide_logits(pixelwise, images, 5, crop_size=(64, 64), stride=(32, 32)), whole, atol=1e-6)


TRUNK = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 1}
UPERNET = {"pyramid_strides": [4, 8, 16, 32], "channels": 32, "pool_scales": [1, 2, 3, 6], "aux_channels": 16}
HIER = {"dims": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2)}


def test_upernet_on_hierarchical_vig_gives_logits_and_weighted_losses_at_non_square_sizes():
    torch.manual_seed(0)
    model = UperNetSegmentor("vig_h_tiny", HIER, 5, from_dict(UperNetConfig, UPERNET, "model"))
    images = torch.rand(2, 3, 96, 160)
    logits = model.eval()(images)
    assert logits.shape == (2, 5, 96, 160)
    labels = torch.randint(0, 5, (2, 96, 160))
    labels[:, :10] = 255
    model.train()
    losses = model(images, labels)
    assert set(losses) == {"loss_decode", "loss_aux"}
    # The aux head's loss carries the 0.4 weight; both are cross-entropies near log(5) at init.
    assert 0.2 < losses["loss_aux"].item() / 0.4 / torch.log(torch.tensor(5.0)).item() < 5
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_random_ratio_rescale_and_crop_keep_labels_aligned_with_the_image():
    torch.manual_seed(0)
    # A label map that encodes each pixel's column parity survives only if image and label move together.
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    label = torch.zeros(40, 60, dtype=torch.long)
    image[:, :, 30:] = 200
    label[:, 30:] = 1
    transform = segmentation_train_transform((60, 40), (0.5, 2.0), (32, 32), photometric=False)
    for _ in range(10):
        out_image, out_label = transform(tv_tensors.Image(image), tv_tensors.Mask(label))
        assert out_image.shape == (3, 32, 32) and out_image.dtype == torch.float32 and out_label.shape == (32, 32)
        valid = out_label != 255
        bright = out_image[0] > 0.5
        # Away from the (interpolated) edge, label 1 exactly where the image is bright.
        assert (bright[valid] == (out_label[valid] == 1)).float().mean() > 0.9


@pytest.fixture(scope="module")
def dense_root(tmp_path_factory):
    return write_dense_shards(tmp_path_factory.mktemp("dense"))


def test_finetune_seg_resumes_after_a_failure_lowers_the_loss_and_evaluate_seg_scores_it(dense_root, mlflow_store):
    section = {
        "backend": "local", "init": {"kind": "none"},
        "trunk": {"name": "vig_tiny", "kwargs": TRUNK},
        "iterations": 12, "reduce_zero_label": False, "scale": [64, 64], "crop_size": [64, 64],
        "log_every_steps": 1, "progress_bar": False, "checkpoint_every_steps": 2, "fail_at_step": 6,
        "optim": {"batch_size": 4, "lr": 1.0e-2, "warmup_iters": 1},
        "data": {"shard_root": str(dense_root / "shards"), "shuffle_buffer": 8, "preview_images": 2},
        "model": UPERNET,
        "out_dir": str(dense_root / "finetune_seg"), "metrics": str(dense_root / "metrics" / "finetune_seg.json"),
    }  # fmt: skip
    config = load_section(FinetuneSegConfig, section, "finetune_seg", dense_root)
    with stage_run("finetune_seg", section, experiment="unit") as run:
        with pytest.raises(InjectedFailure):
            finetune_segmentation(config, run.info.run_id)
        # Checkpoints every 2 steps (and at epoch ends, every 2 steps here): the newest is at step 4.
        checkpoints = sorted(p.name for p in (dense_root / "finetune_seg" / "run" / "checkpoints").iterdir())
        assert checkpoints[-1] == "step_000000004"
        # Resuming with other training params is refused, naming the difference.
        changed = load_section(FinetuneSegConfig, {**section, "iterations": 14}, "finetune_seg", dense_root)
        with pytest.raises(ValueError, match=r"finetune_seg\.iterations: 12 in the checkpoint, 14 now\n[^ ]"):
            finetune_segmentation(changed)
        metrics = finetune_segmentation(config, run.info.run_id)
    assert metrics["steps"] == 12
    client = mlflow.MlflowClient(mlflow_store)
    assert client.get_run(run.info.run_id).data.tags["train.resumed_from_step"] == "4"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    losses = [m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))]
    assert sorted({m.step for m in history}) == list(range(1, 13))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    artifacts = {a.path for folder in ("plots", "checkpoints") for a in client.list_artifacts(run.info.run_id, folder)}
    assert artifacts == {"plots/predictions.png", "checkpoints/model.pt"}

    evaluation = {"checkpoint": str(dense_root / "finetune_seg" / "model.pt"), "shard_root": str(dense_root / "shards"),
                  "scale": [64, 64], "crop_size": [48, 48], "stride": [32, 32], "preview_images": 2,
                  "metrics": str(dense_root / "metrics" / "evaluate_seg.json"), "plot": str(dense_root / "seg.png")}
    scores = evaluate_segmentation(load_section(EvaluateSegConfig, evaluation, "evaluate_seg", dense_root))
    assert scores["images"] == 4
    for mode in ("whole", "slide"):
        assert set(scores[mode]) == {"mIoU", "mAcc", "aAcc", "IoU"}
        assert list(scores[mode]["IoU"]) == ["background"] + [f"digit_{d}" for d in range(10)]
        assert 0.0 <= scores[mode]["mIoU"] <= scores[mode]["aAcc"] <= 1.0
    assert json.loads((dense_root / "metrics" / "evaluate_seg.json").read_text()) == scores
    assert (dense_root / "seg.png").stat().st_size > 0
