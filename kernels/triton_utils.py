"""Helpers shared by the Triton kernels of this package (import only where Triton is used)."""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def output_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor for a kernel to write, then `.to(dtype)`.

    Triton's interpreter truncates fp32 -> 16-bit casts where the GPU rounds to nearest, so under it the
    kernels write fp32 and torch does the rounding.
    """
    return torch.empty(shape, dtype=torch.float32 if INTERPRET else dtype, device=device)
