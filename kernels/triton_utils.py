"""Helpers shared by the Triton kernels of this package (import only where Triton is used)."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def output_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor for a kernel to write, then `.to(dtype)`.

    Triton's interpreter truncates fp32 -> 16-bit casts where the GPU rounds to nearest, so under it the
    kernels write fp32 and torch does the rounding.
    """
    return torch.empty(shape, dtype=torch.float32 if INTERPRET else dtype, device=device)


@contextlib.contextmanager
def float32_matmul_precision(precision: str) -> Iterator[None]:
    """torch.set_float32_matmul_precision(precision) inside the block, the previous setting restored after."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
