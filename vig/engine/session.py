"""Where a worker runs: inside a Ray Train worker group, or as one plain process. The training and evaluation
loops see only this interface, so they run unchanged on a machine without Ray (e.g. the GPU benchmark box).

Checkpoints are folders. Under Ray they go through `ray.train.report` (Ray persists them in the run's
storage and hands the newest back through `ray.train.get_checkpoint()` after a worker failure, or when
the same run folder is started again). Without Ray they are renamed into `<run_dir>/step_NNNNNNNNN`, and the
newest complete one is found by step number (never by file time).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

CHECKPOINT_DIR = re.compile(r"^step_(\d{9})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:09d}"


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def restored_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """The newest checkpoint folder to resume from (None: start fresh), valid inside the `with`."""

    def staging_dir(self) -> contextlib.AbstractContextManager[Path]:
        """An empty folder to write a checkpoint into before `report` publishes it."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        """Publish metrics and (rank 0 only) a checkpoint. Every rank calls it at the same points."""


class RaySession:
    """A Ray Train worker (TorchTrainer has already initialised torch.distributed)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    @contextlib.contextmanager
    def staging_dir(self) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="vig-checkpoint-") as folder:
            yield Path(folder)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name(step))


class LocalSession:
    """One process without Ray: world size 1, the first GPU if there is one."""

    rank = 0
    world_size = 1

    def __init__(self, run_dir: str | os.PathLike | None = None, keep: int = 1) -> None:
        """`run_dir`: where checkpoints go (None for work that never checkpoints, e.g. evaluation)."""
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.keep = keep
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (a folder only gets its final name once fully written)."""
        if self.run_dir is None or not self.run_dir.is_dir():
            return []
        found = [p for p in self.run_dir.iterdir() if p.is_dir() and CHECKPOINT_DIR.match(p.name)]
        return sorted(found, key=lambda p: int(CHECKPOINT_DIR.match(p.name).group(1)))

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Path | None]:
        found = self.checkpoints()
        yield found[-1] if found else None

    @contextlib.contextmanager
    def staging_dir(self) -> Iterator[Path]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.run_dir))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        if checkpoint_dir is not None:
            target = self.run_dir / checkpoint_name(step)
            if target.exists():
                shutil.rmtree(target)
            os.replace(checkpoint_dir, target)
            for old in self.checkpoints()[: -self.keep]:
                shutil.rmtree(old)
