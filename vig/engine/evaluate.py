"""Evaluating a checkpoint on the classification val shards: top-1 / top-5 / loss of the model and, when the
checkpoint has one, its EMA, in one exact pass split over the same kind of workers as pretraining.

Checkpoints are either our pretraining weights files (`kind: pretrain`, model rebuilt from the config stored
in the file) or released official ones (`kind: official`, through vig.checkpoint.load_official, with the
model named in the params).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from vig.atomic import write_json
from vig.engine import state
from vig.engine.config import CheckpointSource, EvaluateConfig, from_dict, to_dict
from vig.engine.data import ClassificationShards
from vig.engine.evaluation import autocast_dtype, evaluate
from vig.engine.launch import run_on_workers
from vig.engine.run_log import RunLog
from vig.engine.session import LocalSession, RaySession, Session


def load_models(source: CheckpointSource) -> dict[str, nn.Module]:
    """{"model": ..., "ema": ...} (EMA only when the checkpoint holds one), on the CPU."""
    if source.kind == "pretrain":
        _, model, ema = state.build_models(source.path)
        return {"model": model, **({"ema": ema} if ema is not None else {})}

    from vig.checkpoint import load_official

    checkpoint = torch.load(source.path, map_location="cpu", weights_only=True)
    for part in source.key.split(".") if source.key else ():
        if part not in checkpoint:
            raise KeyError(
                f"{source.path} has no entry {part!r} on the way to evaluate.checkpoint.key {source.key!r}; "
                f"found {sorted(checkpoint)}"
            )
        checkpoint = checkpoint[part]
    build = dict(source.model.kwargs, drop_path_rate=source.model.drop_path_rate)
    models = {"model": load_official(checkpoint, source.model.name, **build)}
    if "model_ema" in checkpoint:
        models["ema"] = load_official(checkpoint, source.model.name, use_ema=True, **build)
    return models


def evaluate_worker(loop_config: dict[str, Any]) -> None:
    """Per-worker entry point (Ray Train worker, or this process with backend local); rank 0 writes the metrics."""
    config = from_dict(EvaluateConfig, loop_config["evaluate"], "evaluate")
    session: Session = RaySession() if config.backend == "ray" else LocalSession()
    data = ClassificationShards(config.data, config.augment, session.world_size)
    models = {name: model.to(session.device) for name, model in load_models(config.checkpoint).items()}
    for name, model in models.items():
        if model.num_classes != data.num_classes:
            raise ValueError(
                f"the checkpoint's {name} has {model.num_classes} classes but the val shards have {data.num_classes}"
            )
    dtype = autocast_dtype(config.precision, session.device)
    scores = evaluate(models, data.val_batches(config.batch_size), session.device, dtype)
    if session.rank != 0:
        return
    seen = {name: s.samples for name, s in scores.items()}
    if any(count != data.val_samples for count in seen.values()):
        raise RuntimeError(f"the exact pass saw {seen} samples but the manifest lists {data.val_samples}")
    metrics: dict[str, Any] = {"samples": data.val_samples}
    for name, s in scores.items():
        metrics.update(s.as_metrics("" if name == "model" else f"{name}_"))
    write_json(config.metrics, metrics)
    run_log = RunLog(loop_config.get("mlflow_run_id"))
    run_log.metrics({f"val/{k}": v for k, v in metrics.items()}, step=0)
    run_log.tags({"evaluate.checkpoint": config.checkpoint.path, "system.world_size": session.world_size})
    run_log.flush()
    run_log.artifact(config.metrics, "metrics")


def run_evaluate(config: EvaluateConfig, mlflow_run_id: str | None = None) -> dict[str, Any]:
    """Evaluate the configured checkpoint; returns the metrics also written to `config.metrics`."""
    if not Path(config.checkpoint.path).is_file():
        raise FileNotFoundError(
            f"checkpoint {config.checkpoint.path} not found (evaluate.checkpoint.path): run the pretrain stage "
            "first, or point it at an existing file"
        )
    loop_config = {"evaluate": to_dict(config), "mlflow_run_id": mlflow_run_id}
    if config.backend == "ray":
        # Evaluation reports no checkpoints, so Ray's run folder holds nothing worth keeping.
        with tempfile.TemporaryDirectory(prefix="vig-evaluate-") as storage:
            run_on_workers(
                evaluate_worker,
                loop_config,
                num_workers=config.num_workers,
                use_gpu=config.use_gpu,
                cpus_per_worker=config.cpus_per_worker,
                storage=Path(storage),
                name="evaluate",
                max_failures=0,
            )
    else:
        evaluate_worker(loop_config)
    return json.loads(Path(config.metrics).read_text())
