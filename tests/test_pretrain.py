"""Pretraining engine: Ray Train run with an injected worker failure, local-backend resume, recipe pieces."""
import json
import math
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from classification_shards import write_digit_shards

from vig.engine import launch, state
from vig.engine.config import OptimConfig, PretrainConfig, from_dict, pretrain_config
from vig.engine.optim import build_optimizer, build_scheduler, scaled_lrs
from vig.engine.pretrain import InjectedFailure, pretrain, run_dir
from vig.tracking import stage_run

STEPS_PER_EPOCH = 9  # 144 training digits / (8 per worker x 2 workers)
CLASSES = 3  # digits 0-2: few enough for the loss to fall visibly within 27 steps
TINY_VIG = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}
EPOCHS = 3


def tiny_section(root, **overrides):
    """A ViG of one block on 16x16 digits (4x4 tokens): a few seconds per epoch on one core."""
    section = {
        "num_workers": 2,
        "max_failures": 1,
        "log_every_steps": 1,
        "progress_bar": False,
        "out_dir": str(root / "checkpoints"),
        "plot": str(root / "plots" / "curves.png"),
        "metrics": str(root / "metrics" / "pretrain.json"),
        "model": {"name": "vig_tiny", "kwargs": TINY_VIG},
        "data": {"shard_root": str(root / "shards"), "img_size": 16, "shuffle_buffer": 64},
        "augment": {"scale": [0.6, 1.0], "hflip": 0.0, "auto_augment": "rand-m3-mstd0.5-inc1", "color_jitter": 0.0,
                    "re_prob": 0.1, "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.1, "eval_crop_pct": 1.0},
        "optim": {"epochs": EPOCHS, "warmup_epochs": 1, "batch_size": 8, "base_lr": 0.64, "warmup_lr": 1.0e-3,
                  "min_lr": 1.0e-2, "lr_reference_batch": 512},
        "ema": {"decay": 0.7},
    }  # fmt: skip
    for key, value in overrides.items():
        section[key] = {**section[key], **value} if isinstance(value, dict) else value
    return section


def closed_form_lr(config: OptimConfig, world_size: int, steps_per_epoch: int, step: int) -> float:
    """Learning rate used by optimizer step `step` (1-based): linear warmup, then half-cosine to min_lr."""
    factor = config.batch_size * world_size * config.accumulation_steps / config.lr_reference_batch
    peak, warmup, minimum = config.base_lr * factor, config.warmup_lr * factor, config.min_lr * factor
    done, warmup_steps = step - 1, config.warmup_epochs * steps_per_epoch
    if done < warmup_steps:
        return warmup + done * (peak - warmup) / warmup_steps
    decay_steps = (config.epochs - config.warmup_epochs) * steps_per_epoch
    return minimum + 0.5 * (peak - minimum) * (1 + math.cos(math.pi * (done - warmup_steps) / decay_steps))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_digit_shards(tmp_path_factory.mktemp("data") / "shards", train=144, val=40, classes=CLASSES)


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, shards):
    """A 2-worker CPU Ray Train run that loses its workers once, before step 13 (checkpoints every 4 steps and at
    each epoch end, so the restart continues mid-epoch from step 12)."""
    root = tmp_path_factory.mktemp("ray_run")
    shutil.copytree(shards, root / "shards")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlruns.db'}")
        env.setenv("VIG_ROOT", str(root))
        section = tiny_section(root, backend="ray", checkpoint_every_steps=4, fail_at_step=13)
        config = pretrain_config(section, root)
        with stage_run("pretrain", section, experiment="engine-test") as run:
            summary = pretrain(config, run.info.run_id)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns.db'}")
    return {"root": root, "config": config, "summary": summary, "client": client, "run_id": run.info.run_id}


def metric_steps(client, run_id, key):
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}, [
        m.step for m in client.get_metric_history(run_id, key)
    ]


def test_ray_run_loss_drops(ray_run):
    losses, _ = metric_steps(ray_run["client"], ray_run["run_id"], "train/loss")
    first, last = [losses[s] for s in (1, 2, 3)], [losses[s] for s in (25, 26, 27)]
    assert sum(last) / 3 < sum(first) / 3 - 0.15


def test_failed_workers_resume_from_the_last_checkpoint_without_repeating_or_skipping_steps(ray_run):
    client, run_id = ray_run["client"], ray_run["run_id"]
    _, steps = metric_steps(client, run_id, "train/loss")
    # Steps 1-12 ran before the injected failure, 13-27 after the restart from the step-12 checkpoint.
    assert steps == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))
    assert client.get_run(run_id).data.tags["train.resumed_from_step"] == "12"
    assert ray_run["summary"]["steps"] == STEPS_PER_EPOCH * EPOCHS
    assert not run_dir(ray_run["config"]).exists()  # resumable state is dropped once the outputs exist


def test_logged_learning_rates_follow_the_closed_form_schedule(ray_run):
    lrs, _ = metric_steps(ray_run["client"], ray_run["run_id"], "train/lr")
    optim = ray_run["config"].optim
    for step in (1, 5, 9, 10, 13, 18, 20, 27):
        assert lrs[step] == pytest.approx(closed_form_lr(optim, 2, STEPS_PER_EPOCH, step), rel=1e-9)


def test_ema_weights_differ_from_the_model_and_both_are_evaluated(ray_run):
    client, run_id = ray_run["client"], ray_run["run_id"]
    record, model, ema = state.build_models(ray_run["config"].out_dir + "/last.pt")
    assert record["model_config"]["num_classes"] == CLASSES and ema is not None
    ema_weights = ema.state_dict()
    assert any(not torch.equal(v, ema_weights[k]) for k, v in model.state_dict().items() if v.is_floating_point())
    with torch.no_grad():
        images = torch.randn(4, 3, 16, 16)
        assert not torch.allclose(model.eval()(images), ema.eval()(images))
    for key in ("val/top1", "val/ema_top1", "val/top5", "val/ema_top5", "val/loss", "val/ema_loss"):
        assert len(client.get_metric_history(run_id, key)) == EPOCHS
    final = {k: client.get_metric_history(run_id, f"val/{k}")[-1].value for k in ("top1", "ema_top1")}
    assert final == {k: ray_run["summary"][f"final_{k}"] for k in final}


def test_mlflow_run_holds_params_system_info_checkpoints_and_plot(ray_run, tmp_path):
    client, run_id = ray_run["client"], ray_run["run_id"]
    run = client.get_run(run_id)
    assert run.data.params["pretrain.optim.base_lr"] == "0.64"
    assert run.data.tags["system.world_size"] == "2" and run.data.tags["system.gpus"] == "none"
    throughput = client.get_metric_history(run_id, "train/throughput_img_s")
    assert len(throughput) == STEPS_PER_EPOCH * EPOCHS and all(m.value > 0 for m in throughput)
    assert ray_run["summary"]["train_images_per_s"] == pytest.approx(float(np.median([m.value for m in throughput])))
    artifacts = {a.path for folder in ("checkpoints", "plots") for a in client.list_artifacts(run_id, folder)}
    assert artifacts == {"checkpoints/last.pt", "checkpoints/best.pt", "plots/curves.png"}
    plot = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="plots/curves.png", dst_path=str(tmp_path))
    assert open(plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    best = state.load(ray_run["config"].out_dir + "/best.pt")
    summary = ray_run["summary"]
    assert best["metrics"][{"model": "top1", "ema": "ema_top1"}[summary["best_source"]]] == summary["best_top1"]
    assert summary["best_top1"] == max(
        m.value for key in ("val/top1", "val/ema_top1") for m in client.get_metric_history(run_id, key)
    )


def test_rerun_after_an_interruption_resumes_and_refuses_changed_params(tmp_path, shards, mlflow_store):
    shutil.copytree(shards, tmp_path / "shards")
    client = mlflow.MlflowClient(tracking_uri=mlflow_store)

    def run_stage(section):
        with stage_run("pretrain", section, experiment="engine-test") as run:
            summary = pretrain(pretrain_config(section, tmp_path), run.info.run_id)
        return summary, run.info.run_id

    local = {"backend": "local", "checkpoint_every_steps": 2}
    first = tiny_section(tmp_path, **local, fail_at_step=4, optim={"epochs": 2, "batch_size": 16})
    with pytest.raises(InjectedFailure):
        run_stage(first)
    checkpoints = run_dir(pretrain_config(first, tmp_path)) / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step_000000002"]

    changed = tiny_section(tmp_path, **local, optim={"epochs": 2, "batch_size": 16, "base_lr": 0.32})
    refusal = r"(?s)pretrain\.optim\.base_lr: 0\.64 in the checkpoint, 0\.32 now.*pretrain\.resume: false"
    with pytest.raises(state.ResumeMismatchError, match=refusal):
        run_stage(changed)

    # resume: false discards the old run; this fresh one is interrupted in turn, after its step-2 checkpoint.
    with pytest.raises(InjectedFailure):
        run_stage({**changed, "resume": False, "fail_at_step": 3})
    signature = json.loads((checkpoints.parent / "signature.json").read_text())
    assert signature["optim.base_lr"] == 0.32 and [p.name for p in checkpoints.iterdir()] == ["step_000000002"]

    # Same params: continues after step 2; the hook (still set) fires only in a run that did not resume.
    summary, run_id = run_stage({**changed, "fail_at_step": 3})
    assert metric_steps(client, run_id, "train/loss")[1] == list(range(3, 2 * STEPS_PER_EPOCH + 1))
    assert client.get_run(run_id).data.tags["train.resumed_from_step"] == "2"
    assert summary["steps"] == state.load(tmp_path / "checkpoints" / "last.pt")["step"] == 2 * STEPS_PER_EPOCH


@pytest.mark.parametrize("address", [None, "10.0.0.7:6379"])
def test_connect_starts_a_private_local_cluster_unless_ray_address_names_one(address, monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    if address is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
    for key in launch.RAY_SANDBOX_ENV:
        monkeypatch.delenv(key, raising=False)  # connect sets them; monkeypatch restores the originals
    launch.connect(num_cpus=2)
    assert len(calls) == 1
    if address is None:
        # "local" rather than no address: ray.init would otherwise join a cluster left running on the machine.
        assert calls[0]["address"] == "local" and calls[0]["num_cpus"] >= 2
    else:
        assert calls[0] == {"address": address, "log_to_driver": True}


def test_weight_decay_spares_position_embedding_norms_and_biases():
    config = from_dict(PretrainConfig, {"model": {"kwargs": TINY_VIG}}, "pretrain")
    model = state.create_model(state.model_record(config, 10))
    optimizer = build_optimizer(model, config.optim, scaled_lrs(config.optim, 1))
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        expected = 0.0 if (param.ndim <= 1 or name == "pos_embed") else config.optim.weight_decay
        assert decay_of[id(param)] == expected, name
    assert decay_of[id(model.pos_embed)] == 0.0 and decay_of[id(model.head.weight)] == 0.05


def test_scheduler_with_accumulation_matches_the_closed_form():
    optim = OptimConfig(epochs=10, warmup_epochs=2, batch_size=32, accumulation_steps=4, base_lr=1e-3)
    lrs = scaled_lrs(optim, world_size=8)
    assert lrs.peak == pytest.approx(1e-3 * 32 * 8 * 4 / 512)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lrs.peak)
    scheduler = build_scheduler(optimizer, optim, lrs, steps_per_epoch=5)
    for step in (1, 2, 10, 11, 12, 30, 50):
        scheduler.step_update(step - 1)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(closed_form_lr(optim, 8, 5, step), rel=1e-12)


def test_bad_params_are_named_in_the_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) pretrain\.optim\.lr"):
        pretrain_config({"optim": {"lr": 0.1}}, tmp_path)
    with pytest.raises(ValueError, match=r"pretrain\.optim\.base_lr must be float, got 'fast'"):
        pretrain_config({"optim": {"base_lr": "fast"}}, tmp_path)
    # PyYAML reads 5e-07 (no dot, as `dvc exp run -S` writes it) as text: still a number here.
    assert pretrain_config({"optim": {"warmup_lr": "5e-07"}}, tmp_path).optim.warmup_lr == 5e-07
    with pytest.raises(ValueError, match="batch_size .* must be even when mixup"):
        pretrain_config({"optim": {"batch_size": 7}}, tmp_path)


@pytest.mark.parametrize("model", ["vig_tiny", "vig_small", "vig_h_base"])
def test_imagenet_variant_set_params_turn_params_yaml_into_the_variant(model, tmp_path):
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run --set-param` does to params.yaml

    from pipelines.imagenet import load_variant
    from pipelines.recipes import set_param_overrides
    from vig.engine.config import evaluate_config, to_dict
    from vig.params import load_params

    repo_params = Path(__file__).parents[1] / "params.yaml"
    params = load_params(repo_params)
    params_file = tmp_path / "params.yaml"
    shutil.copy(repo_params, params_file)
    variant = load_variant(model)
    apply_overrides(str(params_file), set_param_overrides(params, variant))
    applied = load_params(params_file)
    assert applied["experiment"] == f"vig-imagenet-{model}"
    for name in ("pretrain", "evaluate"):
        build = pretrain_config if name == "pretrain" else evaluate_config
        assert to_dict(build(applied[name], tmp_path)) == to_dict(build(variant[name], tmp_path))
    assert applied["pretrain"]["model"]["kwargs"] == {} and applied["pretrain"]["model"]["name"] == model
    assert applied["pretrain"]["optim"]["batch_size"] * applied["pretrain"]["num_workers"] == 1024
    untouched = sorted(set(params) - set(variant))
    assert [applied[k] for k in untouched] == [params[k] for k in untouched]
