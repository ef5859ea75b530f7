"""Exact top-1 / top-5 / loss over a validation set split across workers.

Each worker runs its own share of the val shards (every sample exactly once over all workers, no padding,
so the counts may differ between workers) on the unwrapped model; only the final sums cross workers.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Scores:
    loss: float
    top1: float  # percent
    top5: float  # percent
    samples: int

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}loss": self.loss, f"{prefix}top1": self.top1, f"{prefix}top5": self.top5}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting; None means full fp32. `auto`: bf16 on GPU, fp32 elsewhere."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    models: dict[str, nn.Module],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype | None,
) -> dict[str, Scores]:
    """Scores of each model (left in eval mode) over this worker's batches, summed over all workers, in one pass."""
    for model in models.values():
        model.eval()
    # Per model: loss sum, top-1 hits, top-5 hits, samples.
    totals = torch.zeros(len(models), 4, dtype=torch.float64, device=device)
    for images, targets in batches:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        for row, model in enumerate(models.values()):
            with autocast(device, dtype):
                logits = model(images)
            logits = logits.float()
            ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
            totals[row, 0] += F.cross_entropy(logits, targets, reduction="sum").double()
            totals[row, 1] += ranked[:, 0].sum()
            totals[row, 2] += ranked.any(dim=1).sum()
            totals[row, 3] += len(targets)
    if dist.is_initialized():
        dist.all_reduce(totals)
    scores = {}
    for name, (loss, top1, top5, samples) in zip(models, totals.tolist()):
        if samples == 0:
            raise ValueError("evaluation saw no samples: the validation shards are empty or missing")
        scores[name] = Scores(loss / samples, 100 * top1 / samples, 100 * top5 / samples, int(samples))
    return scores
