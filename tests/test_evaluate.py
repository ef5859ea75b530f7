"""Evaluation: exact distributed pass over the val shards for our checkpoints and the official fixture."""
import json
from pathlib import Path

import mlflow
import pytest
from classification_shards import write_digit_shards

from vig.engine.config import evaluate_config, pretrain_config
from vig.engine.evaluate import run_evaluate
from vig.engine.pretrain import pretrain
from vig.tracking import stage_run

OFFICIAL_FIXTURE = Path(__file__).parent / "fixtures" / "official" / "official_tiny_fixtures.pt"
VAL_SAMPLES = 40  # in shards of 16, 16 and 8: the two workers read 24 and 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Shards of real digits and a one-epoch pretrain checkpoint (with EMA), made without Ray."""
    root = tmp_path_factory.mktemp("evaluate")
    write_digit_shards(root / "shards", train=64, val=VAL_SAMPLES)
    section = {
        "backend": "local",
        "progress_bar": False,
        "out_dir": str(root / "checkpoints"),
        "plot": str(root / "curves.png"),
        "metrics": str(root / "pretrain.json"),
        "model": {"name": "vig_tiny", "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1,
                                                 "num_heads": 2}},
        "data": {"shard_root": str(root / "shards"), "img_size": 16},
        "augment": {"auto_augment": None, "mixup": 0.0, "cutmix": 0.0, "re_prob": 0.0, "eval_crop_pct": 1.0},
        "optim": {"epochs": 2, "warmup_epochs": 1, "batch_size": 16, "base_lr": 0.2},
        "ema": {"decay": 0.5},
    }  # fmt: skip
    pretrain(pretrain_config(section, root))
    return root


def evaluate_section(root, **overrides):
    return {
        "num_workers": 2,
        "batch_size": 8,
        "checkpoint": {"path": str(root / "checkpoints" / "best.pt")},
        "data": {"shard_root": str(root / "shards"), "img_size": 16},
        "augment": {"eval_crop_pct": 1.0},
        "metrics": str(root / "metrics" / "evaluate.json"),
        **overrides,
    }


def test_ray_evaluation_is_one_exact_pass_equal_to_a_single_process(trained, mlflow_store):
    with stage_run("evaluate", experiment="engine-test") as run:
        distributed = run_evaluate(evaluate_config(evaluate_section(trained, backend="ray"), trained), run.info.run_id)
    assert json.loads((trained / "metrics" / "evaluate.json").read_text()) == distributed
    single = run_evaluate(evaluate_config(evaluate_section(trained, backend="local"), trained))
    assert distributed["samples"] == single["samples"] == VAL_SAMPLES
    for key in ("top1", "top5", "loss", "ema_top1", "ema_top5", "ema_loss"):
        assert distributed[key] == pytest.approx(single[key], rel=1e-5), key
    assert distributed["loss"] != distributed["ema_loss"]  # the EMA is its own set of weights
    logged = mlflow.MlflowClient(tracking_uri=mlflow_store).get_run(run.info.run_id).data
    assert logged.metrics["val/top1"] == distributed["top1"]
    assert logged.metrics["val/ema_top1"] == distributed["ema_top1"]
    assert logged.tags["system.world_size"] == "2"


def test_official_fixture_checkpoint_evaluates_on_resized_digits(trained):
    section = evaluate_section(
        trained,
        backend="local",
        checkpoint={
            "kind": "official",
            "path": str(OFFICIAL_FIXTURE),
            "key": "plain.state_dict",
            "model": {"name": "vig_tiny", "kwargs": {"img_size": 64, "patch_size": 16, "embed_dim": 64, "depth": 2,
                                                     "num_heads": 2, "num_classes": 10}},
        },  # fmt: skip
        data={"shard_root": str(trained / "shards"), "img_size": 64},
    )
    metrics = run_evaluate(evaluate_config(section, trained))
    assert metrics["samples"] == VAL_SAMPLES and "ema_top1" not in metrics
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100 and metrics["loss"] > 0


def test_missing_checkpoint_and_wrong_file_kind_are_explained(trained):
    with pytest.raises(FileNotFoundError, match="run the pretrain stage first"):
        run_evaluate(evaluate_config(evaluate_section(trained, checkpoint={"path": "nowhere.pt"}), trained))
    section = evaluate_section(trained, backend="local", checkpoint={"path": str(OFFICIAL_FIXTURE)})
    with pytest.raises(ValueError, match=r"not a pretraining weights file .*evaluate\.checkpoint\.kind: official"):
        run_evaluate(evaluate_config(section, trained))
