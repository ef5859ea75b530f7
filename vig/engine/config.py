"""Typed views of the `pretrain:` and `evaluate:` sections of params.yaml.

Unknown keys are errors (a typo must not silently fall back to a default). Relative paths are
resolved against the project root by `resolve_paths`, because Ray workers run in another directory.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vig.data.transforms import AugmentConfig

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
BACKENDS = ("ray", "local")


@dataclass
class ModelConfig:
    """A timm model name (ViG models register on `import vig`) and its create_model kwargs."""

    name: str = "vig_tiny"
    drop_path_rate: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    shard_root: str = "shards"
    task: str = "classification"
    img_size: int = 32
    shuffle_buffer: int = 1000
    loader_workers: int = 0


@dataclass
class OptimConfig:
    """DeiT/Swin recipe. Learning rates are per `lr_reference_batch` images and scale with the global batch."""

    epochs: int = 300
    warmup_epochs: int = 20
    batch_size: int = 128  # per worker and per micro-step
    accumulation_steps: int = 1
    base_lr: float = 1e-3
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6
    lr_reference_batch: int = 512
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float | None = 5.0


@dataclass
class EmaConfig:
    enabled: bool = True
    decay: float = 0.9999
    warmup: bool = False  # timm ModelEmaV3 decay warmup: 1 - (1 + step)^-2/3, capped at `decay`


@dataclass
class PretrainConfig:
    backend: str = "ray"  # ray | local (one process without Ray, e.g. a GPU box without Ray)
    num_workers: int = 2
    use_gpu: str | bool = "auto"  # auto: GPU workers when the cluster has GPUs
    cpus_per_worker: int = 1
    max_failures: int = 1
    resume: bool = True
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU; fp16 adds a GradScaler
    compile: bool = False
    eval_every_epochs: int = 1
    checkpoint_every_steps: int = 0  # 0: at the end of every epoch only
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    progress_bar: bool = True
    # Test hook: raise once, before this optimizer step, in a run that did not start from a checkpoint.
    fail_at_step: int | None = None
    out_dir: str = "checkpoints/pretrain"
    plot: str = "plots/pretrain_curves.png"
    metrics: str = "metrics/pretrain.json"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)

    def validate(self) -> PretrainConfig:
        check_choice("pretrain.backend", self.backend, BACKENDS)
        check_choice("pretrain.precision", self.precision, PRECISIONS)
        if self.use_gpu not in ("auto", True, False):
            raise ValueError(f"pretrain.use_gpu must be auto, true or false, got {self.use_gpu!r}")
        for name in ("num_workers", "cpus_per_worker", "eval_every_epochs", "keep_checkpoints", "log_every_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"pretrain.{name} must be >= 1, got {getattr(self, name)}")
        if self.optim.batch_size < 1 or self.optim.accumulation_steps < 1:
            raise ValueError("pretrain.optim.batch_size and pretrain.optim.accumulation_steps must be >= 1")
        if self.optim.warmup_epochs >= self.optim.epochs:
            raise ValueError(
                f"pretrain.optim.warmup_epochs ({self.optim.warmup_epochs}) must be smaller than "
                f"pretrain.optim.epochs ({self.optim.epochs})"
            )
        if self.augment.mixes and self.augment.mixup_mode == "batch" and self.optim.batch_size % 2:
            raise ValueError(
                f"pretrain.optim.batch_size ({self.optim.batch_size}) must be even when mixup/cutmix is on "
                "(timm Mixup mixes each batch with its flipped copy)"
            )
        return self


# Keys whose change never alters the training trajectory: resuming across them is allowed.
RESUME_NEUTRAL_KEYS = frozenset(
    {
        "max_failures", "resume", "compile", "eval_every_epochs", "checkpoint_every_steps",
        "keep_checkpoints", "log_every_steps", "progress_bar", "fail_at_step", "out_dir", "plot", "metrics",
        "data.shard_root", "data.loader_workers", "cpus_per_worker", "use_gpu",
    }
)  # fmt: skip


@dataclass
class CheckpointSource:
    """What `evaluate` loads: our pretrain weights file, or an official release through vig.checkpoint."""

    kind: str = "pretrain"  # pretrain | official
    path: str = "checkpoints/pretrain/best.pt"
    key: str | None = None  # official: the entry holding the weights in a bundle file; dots go deeper (a.b)
    model: ModelConfig = field(default_factory=ModelConfig)  # official only: how to build the model


@dataclass
class EvaluateConfig:
    backend: str = "ray"
    num_workers: int = 2
    use_gpu: str | bool = "auto"
    cpus_per_worker: int = 1
    precision: str = "auto"
    batch_size: int = 128
    checkpoint: CheckpointSource = field(default_factory=CheckpointSource)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # only the eval transform fields are used
    metrics: str = "metrics/evaluate.json"

    def validate(self) -> EvaluateConfig:
        check_choice("evaluate.backend", self.backend, BACKENDS)
        check_choice("evaluate.precision", self.precision, PRECISIONS)
        check_choice("evaluate.checkpoint.kind", self.checkpoint.kind, ("pretrain", "official"))
        return self


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise a ValueError naming the param `name` and its allowed values if `value` is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def from_dict(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    """Build dataclass `cls` from a (nested) params dict, rejecting unknown keys with their full name."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; known: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"{where}.{name} must be a mapping, got {value!r}")
            kwargs[name] = from_dict(hint, value, f"{where}.{name}")
        else:
            kwargs[name] = _checked(value, hint, f"{where}.{name}")
    return cls(**kwargs)


def _checked(value: Any, hint: Any, name: str) -> Any:
    """`value` if it fits type `hint` (ints pass as floats, lists as tuples); else a clear error."""
    for option in typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,):
        origin = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return None
        if origin is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            # PyYAML (YAML 1.1) reads exponents without a dot, e.g. 5e-07 as written by `dvc exp run -S`, as text.
            return float(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (str, bool, dict, Any) and isinstance(value, origin if origin is not Any else object):
            return value
    raise ValueError(f"{name} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), for Ray's train_loop_config, checkpoints and MLflow."""
    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def pretrain_config(section: dict[str, Any], root: Path) -> PretrainConfig:
    return resolve_paths(from_dict(PretrainConfig, section, "pretrain").validate(), root)


def evaluate_config(section: dict[str, Any], root: Path) -> EvaluateConfig:
    config = from_dict(EvaluateConfig, section, "evaluate").validate()
    config.checkpoint.path = str(_absolute(config.checkpoint.path, root))
    return resolve_paths(config, root)


def resolve_paths(config: Any, root: Path) -> Any:
    """Make the file paths of a Pretrain/EvaluateConfig absolute (relative ones are against `root`)."""
    config.data.shard_root = str(_absolute(config.data.shard_root, root))
    for name in ("out_dir", "plot", "metrics"):
        if hasattr(config, name):
            setattr(config, name, str(_absolute(getattr(config, name), root)))
    return config


def _absolute(path: str, root: Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else (root / path).resolve()
