"""Rank 0's side of tracking: metrics and artifacts into the stage's MLflow run, and the training-curve plot.

The driver opens the run (vig.tracking.stage_run) and passes its id; the worker writes into it through an
MlflowClient, since it runs in another process (and, under Ray, another working directory).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from vig.atomic import atomic_path
from vig.tracking import tracking_uri

_MLFLOW_BATCH = 1000  # MLflow's limit on metrics per log_batch request


class RunLog:
    """Buffered metric logging into one MLflow run; a no-op without a run id (e.g. a bare local run)."""

    def __init__(self, run_id: str | None) -> None:
        self.run_id = run_id
        self._buffer: list[Any] = []
        if run_id is None:
            self._client = None
        else:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri())

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self._client is None:
            return
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        self._buffer += [Metric(key, float(value), timestamp, step) for key, value in values.items()]

    def flush(self) -> None:
        if self._client is None:
            return
        for start in range(0, len(self._buffer), _MLFLOW_BATCH):
            self._client.log_batch(self.run_id, metrics=self._buffer[start : start + _MLFLOW_BATCH])
        self._buffer = []

    def tags(self, tags: dict[str, Any]) -> None:
        if self._client is None:
            return
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, str(value))

    def artifact(self, path: str | os.PathLike, folder: str | None = None) -> None:
        if self._client is not None:
            self._client.log_artifact(self.run_id, str(path), folder)


def plot_training_curves(history: dict[str, Any], path: str | os.PathLike) -> Path:
    """PNG with train loss and learning rate per step, and val top-1 of the model and its EMA per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, lr_axis, acc_axis) = plt.subplots(1, 3, figsize=(15, 4))
    loss_axis.plot(history["step"], history["loss"])
    loss_axis.set(xlabel="step", ylabel="train loss", title="training loss")
    lr_axis.plot(history["step"], history["lr"])
    lr_axis.set(xlabel="step", ylabel="learning rate", title="learning rate")
    epochs = history["epochs"]
    for key, label in (("top1", "model"), ("ema_top1", "EMA")):
        points = [(e["epoch"], e[key]) for e in epochs if key in e]
        if points:
            acc_axis.plot(*zip(*points), marker="o", label=label)
    acc_axis.set(xlabel="epoch", ylabel="val top-1 (%)", title="validation accuracy")
    acc_axis.legend()
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
    return path
