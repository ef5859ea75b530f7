"""ImageNet-style pretraining (DeiT/Swin recipe, VIG-SPEC section 2) on the classification shards.

`pretrain(config)` is the driver: it prepares the run folder (resume or start over), runs `train_worker`
on a Ray Train worker group (`backend: ray`) or in this process (`backend: local`, no Ray needed), and
removes the resumable state once the final outputs are written. Outputs of a run:

- `<out_dir>/last.pt`, `<out_dir>/best.pt`: model + EMA weights and the model config (vig.engine.state);
- the metrics JSON and the training-curve PNG named in the config;
- in the stage's MLflow run: per-step train loss / lr / grad norm / throughput, per-epoch val top-1/top-5/loss
  of the model and its EMA, system tags, and the checkpoints and plot as artifacts.

While a run is unfinished, `<out_dir>/run/` holds its checkpoints (full training state every
`checkpoint_every_steps` steps and at every epoch end) and its best weights so far. A crashed worker
restarts from the newest checkpoint within the same call (`max_failures`); calling again with
`resume: true` continues an interrupted run, provided its training params are unchanged.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vig.atomic import write_json
from vig.data.transforms import batch_mixer, train_criterion
from vig.engine import state
from vig.engine.config import PretrainConfig, from_dict, to_dict
from vig.engine.data import ClassificationShards
from vig.engine.evaluation import autocast, autocast_dtype, evaluate
from vig.engine.launch import CHECKPOINTS, run_training
from vig.engine.optim import build_optimizer, build_scheduler, global_batch, scaled_lrs
from vig.engine.run_log import RunLog, plot_training_curves
from vig.engine.session import LocalSession, RaySession, Session
from vig.engine.worker import LossWindow, TrainingWorker, derived_seed, seed_everything

RUN_FOLDER = "run"
BEST_SO_FAR = "best.pt"


class InjectedFailure(RuntimeError):
    """Raised by the `fail_at_step` test hook."""


def run_dir(config: PretrainConfig) -> Path:
    return Path(config.out_dir) / RUN_FOLDER


def world_size(config: PretrainConfig) -> int:
    return config.num_workers if config.backend == "ray" else 1


class Pretraining(TrainingWorker):
    """One worker's share of a pretraining run (all workers run the same steps in lockstep)."""

    def __init__(self, config: PretrainConfig, session: Session, run_log: RunLog) -> None:
        self.config = config
        self.session = session
        self.is_main = session.rank == 0
        self.run_log = run_log
        self.device = session.device
        self.signature = state.run_signature(config, session.world_size)
        seed_everything(derived_seed(config.seed, session.rank))

        self.data = ClassificationShards(config.data, config.augment, session.world_size)
        optim = config.optim
        self.batches_per_epoch = self.data.batches_per_epoch(optim.batch_size)
        self.steps_per_epoch = self.batches_per_epoch // optim.accumulation_steps
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"pretrain.optim.accumulation_steps ({optim.accumulation_steps}) exceeds the "
                f"{self.batches_per_epoch} batches per epoch on each worker"
            )
        self.total_steps = optim.epochs * self.steps_per_epoch
        self.images_per_step = global_batch(optim, session.world_size)

        self.model_config = state.model_record(config, self.data.num_classes)
        self.model = state.create_model(self.model_config).to(self.device)
        self.ema = (
            ModelEmaV3(self.model, decay=config.ema.decay, use_warmup=config.ema.warmup) if config.ema.enabled else None
        )
        self.lrs = scaled_lrs(optim, session.world_size)
        self.optimizer = build_optimizer(self.model, optim, self.lrs)
        self.scheduler = build_scheduler(self.optimizer, optim, self.lrs, self.steps_per_epoch)
        self.dtype = autocast_dtype(config.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.mixer = batch_mixer(config.augment, self.data.num_classes)
        self.criterion = train_criterion(config.augment)

        self.ddp: nn.Module = self.model
        if dist.is_initialized() and dist.get_world_size() > 1:
            device_ids = [self.device] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids, broadcast_buffers=False)
        self.train_forward = torch.compile(self.ddp) if config.compile else self.ddp

        self.step = 0
        self.history: dict[str, Any] = {"step": [], "loss": [], "lr": [], "epochs": []}
        self.best: dict[str, Any] | None = None

    # ----------------------------------------------------------------- resume
    def restore(self) -> int | None:
        """Load the newest checkpoint if the session has one; returns its step (None: fresh start)."""
        with self.session.restored_checkpoint() as folder:
            if folder is None:
                return None
            saved = state.load_state(folder, self.signature)
        self.model.load_state_dict(saved["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(saved["model_ema"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.step = saved["step"]
        self.scheduler.step_update(self.step)
        self.history = saved["history"]
        self.best = saved["best"]
        return self.step

    def training_state(self) -> dict[str, Any]:
        return {
            "format": state.STATE_FORMAT,
            "signature": self.signature,
            "model": self.model.state_dict(),
            "model_ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            # Data position: the training stream is resampled, so a resumed epoch continues with a fresh
            # deterministic draw (seeded by epoch and position) for the batches it still owes.
            "position": {"epoch": self.step // self.steps_per_epoch, "step_in_epoch": self.step % self.steps_per_epoch},
            "history": self.history,
            "best": self.best,
        }

    # --------------------------------------------------------------- training
    def epoch_end(self, epoch: int) -> dict[str, float]:
        last_epoch = epoch + 1 == self.config.optim.epochs
        if last_epoch or (epoch + 1) % self.config.eval_every_epochs == 0:
            return self.validate(epoch)
        return {}

    def train_epoch(self, epoch: int, fail_armed: bool) -> float:
        accumulation = self.config.optim.accumulation_steps
        start = self.step % self.steps_per_epoch
        seed_everything(derived_seed(self.config.seed, self.session.rank, epoch, start))
        batches = self.data.train_batches(
            self.config.optim.batch_size,
            (self.steps_per_epoch - start) * accumulation,
            seed=derived_seed(self.config.seed, self.session.rank, epoch, start, 1),
        )
        self.ddp.train()
        epoch_loss = torch.zeros(2, dtype=torch.float64, device=self.device)  # sum, batches
        window = LossWindow(self.device)
        progress = tqdm(
            total=self.steps_per_epoch,
            initial=start,
            desc=f"epoch {epoch + 1}/{self.config.optim.epochs}",
            disable=not (self.is_main and self.config.progress_bar),
            mininterval=2.0,
        )
        for index, (images, targets) in enumerate(batches):
            if fail_armed and index % accumulation == 0 and self.step + 1 == self.config.fail_at_step:
                raise InjectedFailure(f"fail_at_step={self.config.fail_at_step}: injected failure (test hook)")
            update = (index + 1) % accumulation == 0
            loss = self.forward_backward(images, targets, sync=update)
            epoch_loss += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=self.device)])
            window.add(loss)
            if not update:
                continue
            lr = self.optimizer.param_groups[0]["lr"]
            grad_norm = self.optimizer_step()
            self.step += 1
            self.scheduler.step_update(self.step)
            if self.ema is not None:
                self.ema.update(self.model, step=self.step)
            progress.update()
            if self.step % self.config.log_every_steps == 0:
                self.log_step(window, lr, grad_norm, progress)
            every = self.config.checkpoint_every_steps
            if every and self.step % every == 0 and self.step % self.steps_per_epoch:
                self.checkpoint({})
        progress.close()
        if self.step % self.steps_per_epoch:
            raise RuntimeError(
                f"the training stream of epoch {epoch + 1} ended after {self.step % self.steps_per_epoch} of "
                f"{self.steps_per_epoch} steps on rank {self.session.rank}: the training shards are short"
            )
        if dist.is_initialized():
            dist.all_reduce(epoch_loss)
        return (epoch_loss[0] / epoch_loss[1]).item()

    def forward_backward(self, images: torch.Tensor, targets: torch.Tensor, sync: bool) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.mixer is not None:
            images, targets = self.mixer(images, targets)
        # Gradients are all-reduced only on the micro-batch that completes an optimizer step.
        accumulating = isinstance(self.ddp, DistributedDataParallel) and not sync
        with self.ddp.no_sync() if accumulating else contextlib.nullcontext():
            with autocast(self.device, self.dtype):
                logits = self.train_forward(images)
            loss = self.criterion(logits.float(), targets)
            self.scaler.scale(loss / self.config.optim.accumulation_steps).backward()
        return loss.detach()

    def step_metrics(self, batches: int) -> dict[str, float]:
        """The fp16 loss scale (a falling scale means overflowing gradients)."""
        return {"train/loss_scale": self.scaler.get_scale()} if self.scaler.is_enabled() else {}

    # ------------------------------------------------------------- validation
    def validate(self, epoch: int) -> dict[str, float]:
        models = {"": self.model, **({"ema_": self.ema.module} if self.ema is not None else {})}
        scores = evaluate(models, self.data.val_batches(self.config.optim.batch_size), self.device, self.dtype)
        metrics = {key: value for prefix, s in scores.items() for key, value in s.as_metrics(prefix).items()}
        if self.is_main:
            self.run_log.metrics({f"val/{k}": v for k, v in metrics.items()}, self.step)
            self.run_log.flush()
            source, top1 = max(
                (("model", metrics["top1"]), ("ema", metrics.get("ema_top1", float("-inf")))), key=lambda s: s[1]
            )
            if self.best is None or top1 > self.best["top1"]:
                self.best = {"top1": top1, "source": source, "epoch": epoch + 1, "step": self.step}
                state.save(self.weights(metrics), run_dir(self.config) / BEST_SO_FAR)
        return metrics

    # ---------------------------------------------------------------- outputs
    def weights(self, metrics: dict[str, float]) -> dict[str, Any]:
        ema = self.ema.module if self.ema is not None else None
        epoch = self.step // self.steps_per_epoch
        return state.weights(self.model_config, self.model, ema, epoch=epoch, step=self.step, metrics=metrics)

    def write_outputs(self) -> None:
        """Rank 0: last.pt, best.pt, the curve plot and the metrics file, also logged to MLflow."""
        out_dir = Path(self.config.out_dir)
        final = self.history["epochs"][-1]
        last, best = out_dir / "last.pt", out_dir / "best.pt"
        state.save(self.weights(final), last)
        best_record = state.load(run_dir(self.config) / BEST_SO_FAR)
        state.save(best_record, best)
        plot = plot_training_curves(self.history, self.config.plot)
        summary = {
            **{f"final_{k}": v for k, v in final.items()},
            "best_top1": self.best["top1"],
            "best_source": self.best["source"],
            "best_epoch": self.best["epoch"],
            "steps": self.step,
            "epochs": self.config.optim.epochs,
            "global_batch": self.images_per_step,
            "train_images_per_s": self.median_throughput(),
        }
        write_json(self.config.metrics, summary)
        self.run_log.metrics({f"summary/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}, self.step)
        self.run_log.flush()
        for path in (last, best):
            self.run_log.artifact(path, "checkpoints")
        self.run_log.artifact(plot, "plots")
        self.run_log.artifact(self.config.metrics, "metrics")

    def system_info(self, resumed_from: int | None) -> dict[str, Any]:
        return {
            **super().system_info(resumed_from),
            "train.global_batch": self.images_per_step,
            "train.peak_lr": self.lrs.peak,
        }


def train_worker(loop_config: dict[str, Any]) -> None:
    """Per-worker entry point: Ray Train's train_loop_per_worker, or called directly with backend local."""
    config = from_dict(PretrainConfig, loop_config["pretrain"], "pretrain")
    if config.backend == "ray":
        session: Session = RaySession()
    else:
        session = LocalSession(run_dir(config) / CHECKPOINTS, config.keep_checkpoints)
    run_log = RunLog(loop_config.get("mlflow_run_id") if session.rank == 0 else None)
    Pretraining(config, session, run_log).run()


def pretrain(config: PretrainConfig, mlflow_run_id: str | None = None) -> dict[str, Any]:
    """Run (or resume) pretraining; returns the summary metrics also written to `config.metrics`."""
    folder = state.prepare_run_dir(run_dir(config), state.run_signature(config, world_size(config)), config.resume,
                                   "pretrain")
    return run_training(train_worker, {"pretrain": to_dict(config), "mlflow_run_id": mlflow_run_id}, config, folder)
