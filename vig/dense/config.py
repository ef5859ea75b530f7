"""Typed views of the `finetune_det:`, `evaluate_det:`, `finetune_seg:` and `evaluate_seg:` params sections.

Built with vig.engine.config.from_dict, so unknown keys are errors naming their full path. Relative paths
are made absolute against the project root (Ray workers run in another directory).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vig.dense.detection import MaskRCNNConfig
from vig.dense.segmentation import UperNetConfig
from vig.engine.config import BACKENDS, PRECISIONS, check_choice, from_dict

INIT_KINDS = ("pretrain", "official", "none")
PRETRAIN_WEIGHTS = ("auto", "model", "ema")
SEG_INFERENCE = ("whole", "slide")


@dataclass
class TrunkConfig:
    """The ViG trunk: a timm model name and create_model kwargs (taken from the checkpoint for `init.kind:
    pretrain`, where only `drop_path_rate` applies)."""

    name: str = "vig_tiny"
    drop_path_rate: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class InitConfig:
    """Where the trunk's initial weights come from.

    pretrain: a weights file of the pretrain stage (`weights`: its model, its EMA, or `auto` = the one with
    the higher val top-1); official: a released hustvl/ViG checkpoint through vig.checkpoint.load_official
    (`key` picks an entry of a file bundling several); none: random init (tests, ablations).
    """

    kind: str = "pretrain"
    path: str = "checkpoints/pretrain/best.pt"
    weights: str = "auto"
    key: str | None = None


@dataclass
class DenseDataConfig:
    shard_root: str = "shards"
    shuffle_buffer: int = 200
    loader_workers: int = 0
    preview_images: int = 4  # val images drawn in the predictions picture


@dataclass
class DenseOptimConfig:
    """AdamW without weight decay on norms, biases and position embeddings; linear warmup from
    `warmup_ratio` x lr over `warmup_iters` steps, then the task's schedule."""

    batch_size: int = 2  # per worker
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    clip_grad: float | None = None


@dataclass
class _RunConfig:
    backend: str = "ray"  # ray | local (one process, no Ray)
    num_workers: int = 2
    use_gpu: str | bool = "auto"
    cpus_per_worker: int = 1
    max_failures: int = 1
    resume: bool = True
    seed: int = 0
    precision: str = "auto"
    checkpoint_every_steps: int = 0  # 0: at every epoch end only
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    progress_bar: bool = True
    # Test hook: raise once, before this optimizer step, in a run that did not start from a checkpoint.
    fail_at_step: int | None = None
    out_dir: str = ""
    metrics: str = ""
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    init: InitConfig = field(default_factory=InitConfig)
    data: DenseDataConfig = field(default_factory=DenseDataConfig)
    optim: DenseOptimConfig = field(default_factory=DenseOptimConfig)

    def _validate(self, section: str) -> None:
        check_choice(f"{section}.backend", self.backend, BACKENDS)
        check_choice(f"{section}.precision", self.precision, PRECISIONS)
        check_choice(f"{section}.init.kind", self.init.kind, INIT_KINDS)
        check_choice(f"{section}.init.weights", self.init.weights, PRETRAIN_WEIGHTS)
        if self.use_gpu not in ("auto", True, False):
            raise ValueError(f"{section}.use_gpu must be auto, true or false, got {self.use_gpu!r}")


@dataclass
class FinetuneDetConfig(_RunConfig):
    """Mask R-CNN fine-tuning; the schedule counts epochs (passes over the training set), lr x `lr_decay`
    at each epoch of `lr_steps` (the COCO 1x recipe: 12 epochs, steps at 8 and 11)."""

    epochs: int = 12
    lr_steps: tuple[int, ...] = (8, 11)
    lr_decay: float = 0.1
    hflip_prob: float = 0.5
    out_dir: str = "checkpoints/finetune_det"
    metrics: str = "metrics/finetune_det.json"
    model: MaskRCNNConfig = field(default_factory=MaskRCNNConfig)

    def validate(self) -> FinetuneDetConfig:
        self._validate("finetune_det")
        if any(not 0 < s <= self.epochs for s in self.lr_steps):
            raise ValueError(f"finetune_det.lr_steps {self.lr_steps} must lie within 1..epochs ({self.epochs})")
        return self


@dataclass
class FinetuneSegConfig(_RunConfig):
    """UperNet fine-tuning; `iterations` optimizer steps with a poly schedule (mmseg: power 1, min lr 0)."""

    iterations: int = 160_000
    poly_power: float = 1.0
    min_lr: float = 0.0
    # ADE20K: label 0 ("other") is ignored and 1..150 become 0..149. DigitScenes: 0 is background, a real class.
    reduce_zero_label: bool = True
    scale: tuple[int, ...] = (512, 2048)  # long and short edge the image is fitted into (x the random ratio)
    ratio_range: tuple[float, ...] = (0.5, 2.0)
    crop_size: tuple[int, ...] = (512, 512)
    hflip_prob: float = 0.5
    photometric: bool = True
    out_dir: str = "checkpoints/finetune_seg"
    metrics: str = "metrics/finetune_seg.json"
    model: UperNetConfig = field(default_factory=UperNetConfig)

    def validate(self) -> FinetuneSegConfig:
        self._validate("finetune_seg")
        if self.optim.warmup_iters >= self.iterations:
            raise ValueError(
                f"finetune_seg.optim.warmup_iters ({self.optim.warmup_iters}) must be below "
                f"finetune_seg.iterations ({self.iterations})"
            )
        return self


@dataclass
class EvaluateDetConfig:
    checkpoint: str = "checkpoints/finetune_det/model.pt"
    device: str = "auto"  # auto: cuda when available
    precision: str = "auto"
    batch_size: int = 2
    shard_root: str = "shards"
    layout: str = "data/layout.json"
    mask_threshold: float = 0.5
    preview_images: int = 4
    preview_score_thresh: float = 0.5
    metrics: str = "metrics/evaluate_det.json"
    plot: str = "plots/evaluate_det_predictions.png"

    def validate(self) -> EvaluateDetConfig:
        check_choice("evaluate_det.precision", self.precision, PRECISIONS)
        return self


@dataclass
class EvaluateSegConfig:
    checkpoint: str = "checkpoints/finetune_seg/model.pt"
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 1  # val images of one size in a batch go through the model together
    shard_root: str = "shards"
    # Single scale: the image is resized keeping its ratio to fit `scale` (long, short edge), predicted whole
    # or with a sliding window of `crop_size` / `stride` (h, w), and the logits resized back to the label map.
    scale: tuple[int, ...] = (512, 2048)
    modes: tuple[str, ...] = ("whole", "slide")
    crop_size: tuple[int, ...] = (512, 512)
    stride: tuple[int, ...] = (341, 341)
    preview_images: int = 4
    metrics: str = "metrics/evaluate_seg.json"
    plot: str = "plots/evaluate_seg_predictions.png"

    def validate(self) -> EvaluateSegConfig:
        check_choice("evaluate_seg.precision", self.precision, PRECISIONS)
        for mode in self.modes:
            check_choice("evaluate_seg.modes[]", mode, SEG_INFERENCE)
        if not self.modes:
            raise ValueError("evaluate_seg.modes is empty: list whole and/or slide")
        return self


_PATH_FIELDS = ("out_dir", "metrics", "plot", "checkpoint", "shard_root", "layout")


def resolve_paths(config: Any, root: Path) -> Any:
    """Make every path field (and the nested data / init paths) absolute, relative ones against `root`."""
    for holder in (config, getattr(config, "data", None), getattr(config, "init", None)):
        if holder is None:
            continue
        for name in (*_PATH_FIELDS, "path"):
            value = getattr(holder, name, None)
            if isinstance(value, str) and value:
                setattr(holder, name, str(_absolute(value, root)))
    return config


def _absolute(path: str, root: Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else (root / path).resolve()


def load_section(cls: type, section: dict[str, Any] | None, name: str, root: Path) -> Any:
    """Params section `name` -> validated config of type `cls` with absolute paths."""
    return resolve_paths(from_dict(cls, section, name).validate(), root)
