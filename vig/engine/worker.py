"""What one worker of every training loop (pretraining, dense fine-tuning) shares: seeding, the optimizer step
with gradient scaling and clipping, per-step logging and the system tags of the MLflow run."""
from __future__ import annotations

import hashlib
import platform
import random
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from vig.engine import state
from vig.engine.run_log import RunLog
from vig.engine.session import Session


def derived_seed(*parts: int) -> int:
    """A 32-bit seed from the run seed and e.g. rank, epoch and position, so that resumed runs draw the same."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class LossWindow:
    """Loss sum, micro-batch count and wall time since the last log; `drain` averages the loss over all workers."""

    def __init__(self, device: torch.device) -> None:
        self.totals = torch.zeros(2, dtype=torch.float64, device=device)
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.totals[0] += loss.double()
        self.totals[1] += 1

    def drain(self) -> tuple[float, float, int]:
        """(mean loss over workers, seconds elapsed, micro-batches per worker) and reset."""
        totals = self.totals.clone()
        if dist.is_initialized():
            dist.all_reduce(totals)
        seconds = time.perf_counter() - self.started
        batches = int(self.totals[1].item())
        self.totals.zero_()
        self.started = time.perf_counter()
        return (totals[0] / totals[1]).item(), seconds, batches


class TrainingWorker:
    """Base of one worker's share of a training run; subclasses set these attributes in their __init__."""

    config: Any  # has optim.batch_size and optim.clip_grad
    session: Session
    is_main: bool
    run_log: RunLog
    device: torch.device
    dtype: torch.dtype | None
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int
    steps_per_epoch: int
    total_steps: int
    history: dict[str, Any]

    # ------------------------------------------------ what each training loop defines
    def restore(self) -> int | None:
        """Load the latest checkpoint of this run if there is one; returns its step (None: a fresh start)."""
        raise NotImplementedError

    def train_epoch(self, epoch: int, fail_armed: bool) -> float:
        """Train the rest of `epoch`; returns its mean training loss."""
        raise NotImplementedError

    def epoch_end(self, epoch: int) -> dict[str, float]:
        """Metrics measured after an epoch besides its training loss (e.g. validation when it is due)."""
        return {}

    def training_state(self) -> dict[str, Any]:
        """Everything a resumed run needs, saved with each checkpoint."""
        raise NotImplementedError

    def write_outputs(self) -> None:
        """Rank 0, after the last epoch: the stage's weights, metrics file and pictures."""
        raise NotImplementedError

    # ------------------------------------------------ the loop
    def run(self) -> None:
        resumed_from = self.restore()
        if self.is_main:
            self.run_log.tags(self.system_info(resumed_from))
        fail_armed = self.config.fail_at_step is not None and resumed_from is None
        while self.step < self.total_steps:
            epoch = self.step // self.steps_per_epoch
            metrics = {"train_loss": self.train_epoch(epoch, fail_armed), **self.epoch_end(epoch)}
            self.history["epochs"].append({"epoch": epoch + 1, **metrics})
            self.checkpoint(metrics)
        if self.is_main:
            self.write_outputs()

    def checkpoint(self, metrics: dict[str, float]) -> None:
        """Every rank reports; rank 0's report carries the training state as a Ray Train checkpoint."""
        with self.session.staging_dir() as folder:
            if self.is_main:
                state.save(self.training_state(), folder / state.STATE_FILE)
            self.session.report({"step": self.step, **metrics}, folder if self.is_main else None, self.step)

    def optimizer_step(self) -> float | None:
        """Unscale, clip (when `optim.clip_grad`), step and zero the gradients; returns the norm before clipping."""
        grad_norm = None
        if self.config.optim.clip_grad:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.clip_grad).item()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def step_metrics(self, batches: int) -> dict[str, float]:
        """Loop-specific metrics of rank 0 logged with each step; `batches`: micro-batches since the last log."""
        return {}

    def log_step(self, window: LossWindow, lr: float, grad_norm: float | None, progress: tqdm) -> None:
        """Loss averaged over all workers and the steps since the last log; every rank must call this."""
        loss, seconds, batches = window.drain()
        if not self.is_main:
            return
        images = batches * self.config.optim.batch_size * self.session.world_size
        metrics = {
            "train/loss": loss,
            "train/lr": lr,
            "train/throughput_img_s": images / seconds,
            "train/epoch": self.step / self.steps_per_epoch,
            **self.step_metrics(batches),
        }
        if grad_norm is not None:
            metrics["train/grad_norm"] = grad_norm
        self.run_log.metrics(metrics, self.step)
        self.run_log.flush()
        self.history["step"].append(self.step)
        self.history["loss"].append(loss)
        self.history["lr"].append(lr)
        self.history.setdefault("throughput", []).append(images / seconds)  # absent from older checkpoints
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)

    def median_throughput(self) -> float | None:
        """Median training img/s over the logged windows: the first window's compile and autotuning hardly move
        it. None when nothing was logged."""
        values = self.history.get("throughput")
        return float(np.median(values)) if values else None

    def system_info(self, resumed_from: int | None) -> dict[str, Any]:
        """Tags of the MLflow run: the machine, the precision, the step plan and where the run resumed."""
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return {
            "system.world_size": self.session.world_size,
            "system.device": self.device.type,
            "system.gpus": ", ".join(gpus) if gpus else "none",
            "system.host": platform.node(),
            "system.torch": torch.__version__,
            "system.precision": str(self.dtype or torch.float32).removeprefix("torch."),
            "train.steps_per_epoch": self.steps_per_epoch,
            "train.resumed_from_step": resumed_from if resumed_from is not None else "none",
        }
