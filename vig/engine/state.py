"""What a pretraining checkpoint holds, and the rules for resuming a run (pretraining and dense fine-tuning).

Two kinds of files:
- the resumable training state (`state.pt` inside each checkpoint folder): model, EMA, optimizer, scheduler,
  grad scaler, step/epoch and data position, metric history, and the params that shaped the run;
- weights files (`last.pt`, `best.pt`): model and EMA weights plus the model config needed to rebuild the
  model (`build_models`), with the metrics they scored.
Both hold only tensors and plain Python values, so they load with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn

from vig.atomic import atomic_path, write_json
from vig.engine.config import RESUME_NEUTRAL_KEYS, PretrainConfig, to_dict
from vig.params import flatten

_logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
SIGNATURE_FILE = "signature.json"  # in a run folder: the signature of the run training there
STATE_FORMAT = "vig-pretrain-state/1"
WEIGHTS_FORMAT = "vig-weights/1"


class ResumeMismatchError(ValueError):
    """A checkpoint written with other training params than the current ones."""


def run_signature(config: Any, world_size: int, neutral_keys: frozenset[str] = RESUME_NEUTRAL_KEYS) -> dict[str, Any]:
    """The flattened params that determine the training trajectory (all but `neutral_keys`), plus world size."""
    flat = {k: v for k, v in flatten(to_dict(config)).items() if k not in neutral_keys}
    flat["world_size"] = world_size
    return flat


def check_resumable(
    saved: dict[str, Any], current: dict[str, Any], source: str | os.PathLike, section: str = "pretrain"
) -> None:
    """Raise ResumeMismatchError naming every differing param (as `section.key`) if `saved` != `current`."""
    keys = sorted(set(saved) | set(current))
    differing = [k for k in keys if saved.get(k, "<absent>") != current.get(k, "<absent>")]
    if differing:
        lines = "\n".join(
            f"  {section}.{k}: {saved.get(k, '<absent>')!r} in the checkpoint, {current.get(k, '<absent>')!r} now"
            for k in differing
        )
        raise ResumeMismatchError(
            f"refusing to resume from {source}: it was written with different training params:\n{lines}\n"
            f"Restore those params to resume that run, or set {section}.resume: false to discard it and start over."
        )


def prepare_run_dir(folder: Path, signature: dict[str, Any], resume: bool, section: str) -> Path:
    """The run folder to train in: kept (resume) if it holds a run with this signature, an error if it holds
    another run; made fresh, with the signature written, when there is nothing to resume."""
    signature_file = folder / SIGNATURE_FILE
    if folder.exists() and resume and signature_file.exists():
        check_resumable(json.loads(signature_file.read_text()), signature, folder, section)
        _logger.info("resuming the unfinished run in %s", folder)
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    write_json(signature_file, signature)
    return folder


def save(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """torch.save under a temporary name, renamed into place when complete."""
    with atomic_path(path) as temporary:
        torch.save(obj, temporary)


def load(path: str | os.PathLike) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_state(folder: Path, signature: dict[str, Any]) -> dict[str, Any]:
    """The training state in checkpoint `folder`, after checking it belongs to a run with `signature`."""
    path = folder / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not a pretraining checkpoint: it has no {STATE_FILE}")
    state = load(path)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
    check_resumable(state["signature"], signature, folder)
    return state


def model_record(config: PretrainConfig, num_classes: int) -> dict[str, Any]:
    """Everything timm.create_model needs to rebuild the pretrained model."""
    return {
        "name": config.model.name,
        "num_classes": num_classes,
        "drop_path_rate": config.model.drop_path_rate,
        "kwargs": dict(config.model.kwargs),
    }


def create_model(record: dict[str, Any]) -> nn.Module:
    import vig  # noqa: F401  (registers the ViG models with timm)

    return timm.create_model(
        record["name"], num_classes=record["num_classes"], drop_path_rate=record["drop_path_rate"], **record["kwargs"]
    )


def weights(model_config: dict[str, Any], model: nn.Module, ema: nn.Module | None, **info: Any) -> dict[str, Any]:
    return {
        "format": WEIGHTS_FORMAT,
        "model_config": model_config,
        "model": model.state_dict(),
        "model_ema": ema.state_dict() if ema is not None else None,
        **info,
    }


def build_models(path: str | os.PathLike) -> tuple[dict[str, Any], nn.Module, nn.Module | None]:
    """(record, model, EMA model or None) from a weights file written by pretraining."""
    record = load(path)
    if record.get("format") != WEIGHTS_FORMAT:
        raise ValueError(
            f"{path} is not a pretraining weights file (format {record.get('format')!r}, expected "
            f"{WEIGHTS_FORMAT!r}); for a released official checkpoint use evaluate.checkpoint.kind: official"
        )
    model = create_model(record["model_config"])
    model.load_state_dict(record["model"])
    ema = None
    if record["model_ema"] is not None:
        ema = create_model(record["model_config"])
        ema.load_state_dict(record["model_ema"])
    return record, model, ema
