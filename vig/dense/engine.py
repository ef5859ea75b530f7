"""The fine-tuning loop shared by detection and segmentation, on the pretraining engine's pieces.

`DenseFinetuning` is one worker's share of a run: it builds the task model (initial trunk weights from
the pretrain stage or a released checkpoint), trains it with AdamW and a per-step schedule under DDP,
checkpoints the full training state through the worker `Session` (Ray Train or a plain process, so the
loop runs unchanged without Ray), and on rank 0 logs per-step losses to the stage's MLflow run and
writes the outputs: `<out_dir>/model.pt` (weights + everything to rebuild the model), the metrics file,
and a picture of predictions on a few val images. Task subclasses supply the model, the data and the
schedule.

While a run is unfinished `<out_dir>/run/` holds its checkpoints; calling again with `resume: true`
continues it if the training params are unchanged (otherwise the error names the params that differ).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler.scheduler import Scheduler
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vig.atomic import write_json
from vig.dense.backbones import no_weight_decay_names
from vig.dense.config import DenseOptimConfig, InitConfig, TrunkConfig
from vig.engine import state
from vig.engine.config import to_dict
from vig.engine.evaluation import autocast, autocast_dtype
from vig.engine.launch import CHECKPOINTS, run_training
from vig.engine.pretrain import InjectedFailure
from vig.engine.run_log import RunLog
from vig.engine.session import LocalSession, RaySession, Session
from vig.engine.worker import LossWindow, TrainingWorker, derived_seed, seed_everything

RUN_FOLDER = "run"
MODEL_FILE = "model.pt"
PREVIEW_FILE = "predictions.png"
STATE_FORMAT = "vig-dense-state/1"
WEIGHTS_FORMAT = "vig-dense-weights/1"
# Params whose change never alters the training trajectory: resuming across them is allowed.
RESUME_NEUTRAL_KEYS = frozenset(
    {
        "backend", "max_failures", "resume", "checkpoint_every_steps", "keep_checkpoints", "log_every_steps",
        "progress_bar", "fail_at_step", "out_dir", "metrics", "cpus_per_worker", "use_gpu", "data.shard_root",
        "data.loader_workers", "data.preview_images", "init.path",
    }
)  # fmt: skip


def initial_trunk(trunk: TrunkConfig, init: InitConfig) -> tuple[str, dict[str, Any], dict[str, torch.Tensor] | None]:
    """(timm model name, create_model kwargs, classifier state dict or None) for the dense model's trunk."""
    kwargs = {**trunk.kwargs, "drop_path_rate": trunk.drop_path_rate}
    if init.kind == "none":
        return trunk.name, kwargs, None
    if not Path(init.path).is_file():
        raise FileNotFoundError(
            f"initial weights {init.path} not found (init.path): run the pretrain stage first, point init.path at "
            "a released checkpoint with init.kind: official, or use init.kind: none"
        )
    if init.kind == "official":
        from vig.checkpoint import load_official

        checkpoint = torch.load(init.path, map_location="cpu", weights_only=True)
        if init.key is not None:
            if init.key not in checkpoint:
                raise KeyError(f"{init.path} has no entry {init.key!r} (init.key); it has {sorted(checkpoint)[:10]}")
            checkpoint = checkpoint[init.key]
        return trunk.name, kwargs, load_official(checkpoint, trunk.name, **trunk.kwargs).state_dict()
    record = state.load(init.path)
    if record.get("format") != state.WEIGHTS_FORMAT:
        raise ValueError(
            f"{init.path} is not a pretraining weights file (format {record.get('format')!r}); for a released "
            "official checkpoint set init.kind: official"
        )
    weights = init.weights
    if weights == "auto":
        metrics = record.get("metrics") or {}
        better_ema = record["model_ema"] is not None and metrics.get("ema_top1", -1) > metrics.get("top1", -1)
        weights = "ema" if better_ema else "model"
    if weights == "ema" and record["model_ema"] is None:
        raise ValueError(f"init.weights: ema, but {init.path} holds no EMA weights (pretraining ran without EMA)")
    model_config = record["model_config"]
    kwargs = {**model_config["kwargs"], "drop_path_rate": trunk.drop_path_rate}
    return model_config["name"], kwargs, record["model_ema" if weights == "ema" else "model"]


def build_optimizer(model: nn.Module, config: DenseOptimConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on 1-d tensors (norms, biases) and on what the trunk's no_weight_decay() names."""
    groups = param_groups_weight_decay(model, config.weight_decay, no_weight_decay_list=no_weight_decay_names(model))
    return create_optimizer_v2(groups, "adamw", lr=config.lr, betas=tuple(config.betas), eps=config.eps)


def plain_tensors(value: Any, device: torch.device | str) -> Any:
    """tv_tensors -> plain tensors on `device` (torchvision models expect plain tensors); others unchanged."""
    if isinstance(value, torch.Tensor):
        return value.as_subclass(torch.Tensor).to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: plain_tensors(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_tensors(v, device) for v in value)
    return value


class DenseFinetuning(TrainingWorker):
    """One worker's share of a fine-tuning run; subclasses set `section` and implement the task hooks."""

    section: str = ""

    def __init__(self, config: Any, session: Session, run_log: RunLog) -> None:
        self.config = config
        self.session = session
        self.is_main = session.rank == 0
        self.run_log = run_log
        self.device = session.device
        self.signature = state.run_signature(config, session.world_size, RESUME_NEUTRAL_KEYS)
        seed_everything(derived_seed(config.seed, session.rank))

        self.setup_data()
        self.steps_per_epoch = self.train_samples // (config.optim.batch_size * session.world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.train_samples} training samples cannot fill one batch of {config.optim.batch_size} on each "
                f"of {session.world_size} workers: lower {self.section}.optim.batch_size or num_workers"
            )
        self.total_steps = self.planned_steps()
        self.trunk_name, self.trunk_kwargs, trunk_weights = initial_trunk(config.trunk, config.init)
        self.model = self.build_model(self.trunk_name, self.trunk_kwargs, trunk_weights).to(self.device)
        self.optimizer = build_optimizer(self.model, config.optim)
        self.scheduler = self.build_scheduler()
        self.dtype = autocast_dtype(config.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.ddp: nn.Module = self.model
        if dist.is_initialized() and dist.get_world_size() > 1:
            device_ids = [self.device] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)
        self.step = 0
        self.history: dict[str, Any] = {"step": [], "loss": [], "lr": [], "epochs": []}
        self.started = time.perf_counter()

    # ------------------------------------------------------------ task hooks
    def setup_data(self) -> None:
        """Set `self.train_samples`, `self.num_classes` and whatever the batch hooks need."""
        raise NotImplementedError

    def planned_steps(self) -> int:
        raise NotImplementedError

    def build_model(
        self, trunk: str, trunk_kwargs: dict[str, Any], trunk_weights: dict[str, torch.Tensor] | None
    ) -> nn.Module:
        raise NotImplementedError

    def build_scheduler(self) -> Scheduler:
        raise NotImplementedError

    def train_batches(self, num_batches: int, seed: int) -> Iterable[Any]:
        raise NotImplementedError

    def losses(self, batch: Any) -> dict[str, torch.Tensor]:
        """Loss terms of one batch (already on the device) through `self.ddp`."""
        raise NotImplementedError

    def weights_extra(self) -> dict[str, Any]:
        """Task facts evaluation needs besides the model config (class names, label conventions)."""
        return {}

    def preview(self, path: Path) -> None:
        """Rank 0: write a PNG of the model's predictions on a few val images."""
        raise NotImplementedError

    # ---------------------------------------------------------------- resume
    def restore(self) -> int | None:
        with self.session.restored_checkpoint() as folder:
            if folder is None:
                return None
            path = folder / state.STATE_FILE
            saved = state.load(path)
        if saved.get("format") != STATE_FORMAT:
            raise ValueError(f"{path} has format {saved.get('format')!r}, expected {STATE_FORMAT!r}")
        state.check_resumable(saved["signature"], self.signature, folder, self.section)
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.step = saved["step"]
        self.scheduler.step_update(self.step)
        self.history = saved["history"]
        return self.step

    def training_state(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "signature": self.signature,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "history": self.history,
        }

    # -------------------------------------------------------------- training
    def train_epoch(self, epoch: int, fail_armed: bool) -> float:
        start = self.step % self.steps_per_epoch
        todo = min(self.steps_per_epoch - start, self.total_steps - self.step)
        seed_everything(derived_seed(self.config.seed, self.session.rank, epoch, start))
        batches = self.train_batches(todo, seed=derived_seed(self.config.seed, self.session.rank, epoch, start, 1))
        self.ddp.train()
        epoch_loss = torch.zeros(2, dtype=torch.float64, device=self.device)
        window = LossWindow(self.device)
        self.term_sums: dict[str, float] = {}
        epochs = -(-self.total_steps // self.steps_per_epoch)
        progress = tqdm(
            total=min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch),
            initial=start,
            desc=f"{self.section} epoch {epoch + 1}/{epochs}",
            disable=not (self.is_main and self.config.progress_bar),
            mininterval=2.0,
        )
        done = 0
        for batch in batches:
            if fail_armed and self.step + 1 == self.config.fail_at_step:
                raise InjectedFailure(f"fail_at_step={self.config.fail_at_step}: injected failure (test hook)")
            batch = plain_tensors(batch, self.device)
            with autocast(self.device, self.dtype):
                terms = self.losses(batch)
            loss = sum(term.float() for term in terms.values())
            if not torch.isfinite(loss):
                values = {key: term.item() for key, term in terms.items()}
                raise FloatingPointError(
                    f"{self.section}: non-finite loss at step {self.step + 1} ({values}): lower "
                    f"{self.section}.optim.lr or set {self.section}.optim.clip_grad"
                )
            self.scaler.scale(loss).backward()
            lr = self.optimizer.param_groups[0]["lr"]
            grad_norm = self.optimizer_step()
            self.step += 1
            done += 1
            self.scheduler.step_update(self.step)
            detached = loss.detach()
            epoch_loss += torch.stack([detached.double(), torch.ones((), dtype=torch.float64, device=self.device)])
            window.add(detached)
            for key, term in terms.items():
                self.term_sums[key] = self.term_sums.get(key, 0.0) + term.item()
            progress.update()
            if self.step % self.config.log_every_steps == 0 or self.step == self.total_steps:
                self.log_step(window, lr, grad_norm, progress)
                self.term_sums = {}
            every = self.config.checkpoint_every_steps
            if every and self.step % every == 0 and self.step % self.steps_per_epoch and self.step < self.total_steps:
                self.checkpoint({})
        progress.close()
        if done != todo:
            raise RuntimeError(
                f"the training stream of epoch {epoch + 1} ended after {done} of {todo} steps on rank "
                f"{self.session.rank}: the training shards are short"
            )
        if dist.is_initialized():
            dist.all_reduce(epoch_loss)
        return (epoch_loss[0] / epoch_loss[1]).item()

    def step_metrics(self, batches: int) -> dict[str, float]:
        """Rank 0's loss terms, averaged over the batches since the last log."""
        return {f"train/{key}": value / batches for key, value in self.term_sums.items()}

    # --------------------------------------------------------------- outputs
    def write_outputs(self) -> None:
        """Rank 0: model.pt, the predictions picture and the metrics file, also logged to MLflow."""
        out_dir = Path(self.config.out_dir)
        weights_path = out_dir / MODEL_FILE
        state.save(
            {
                "format": WEIGHTS_FORMAT,
                "task": self.section,
                "trunk": {"name": self.trunk_name, "kwargs": self.trunk_kwargs},
                "num_classes": self.num_classes,
                "model_config": to_dict(self.config.model),
                "model": self.model.state_dict(),
                "step": self.step,
                **self.weights_extra(),
            },
            weights_path,
        )
        self.model.eval()
        preview_path = out_dir / PREVIEW_FILE
        self.preview(preview_path)
        final = self.history["epochs"][-1]
        summary = {
            "final_train_loss": final["train_loss"],
            "first_logged_loss": self.history["loss"][0] if self.history["loss"] else None,
            "last_logged_loss": self.history["loss"][-1] if self.history["loss"] else None,
            "steps": self.step,
            "epochs": len(self.history["epochs"]),
            "global_batch": self.config.optim.batch_size * self.session.world_size,
            "train_images_per_s": self.median_throughput(),
            "seconds_this_session": round(time.perf_counter() - self.started, 1),
        }
        write_json(self.config.metrics, summary)
        self.run_log.metrics({f"summary/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}, self.step)
        self.run_log.flush()
        self.run_log.artifact(weights_path, "checkpoints")
        self.run_log.artifact(preview_path, "plots")
        self.run_log.artifact(self.config.metrics, "metrics")

    def system_info(self, resumed_from: int | None) -> dict[str, Any]:
        return {
            **super().system_info(resumed_from),
            "train.global_batch": self.config.optim.batch_size * self.session.world_size,
            "train.total_steps": self.total_steps,
        }


def run_dir(config: Any) -> Path:
    return Path(config.out_dir) / RUN_FOLDER


def make_session(config: Any) -> Session:
    if config.backend == "ray":
        return RaySession()
    return LocalSession(run_dir(config) / CHECKPOINTS, config.keep_checkpoints)


def launch(
    config: Any, section: str, worker: Callable[[dict[str, Any]], None], mlflow_run_id: str | None
) -> dict[str, Any]:
    """Run (or resume) a fine-tuning run on Ray workers or in this process; returns the metrics file's content."""
    world_size = config.num_workers if config.backend == "ray" else 1
    signature = state.run_signature(config, world_size, RESUME_NEUTRAL_KEYS)
    folder = state.prepare_run_dir(run_dir(config), signature, config.resume, section)
    return run_training(worker, {section: to_dict(config), "mlflow_run_id": mlflow_run_id}, config, folder)


def load_weights(path: str | Path, task: str) -> dict[str, Any]:
    """A fine-tuned weights file (`model.pt`) of `task`, checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the {task} stage first (`python -m stages.{task}`)")
    record = state.load(path)
    if record.get("format") != WEIGHTS_FORMAT or record.get("task") != task:
        raise ValueError(
            f"{path} is not a {task} weights file (format {record.get('format')!r}, task {record.get('task')!r})"
        )
    return record
