"""Bidirectional gated linear attention (BiGLA).

`bigla(q, k, v, g_fwd, g_bwd, scale=None) -> o` with token-major inputs
q, k, g_fwd, g_bwd: [B, T, H, K]; v: [B, T, H, V]; gates are log-space forget gates (<= 0):

    S_t = diag(exp(g_fwd[t])) S_{t-1} + k_tᵀ v_t      (left to right, S_0 = 0)
    R_t = diag(exp(g_bwd[t])) R_{t+1} + k_tᵀ v_t      (right to left, R_{T+1} = 0)
    o_t = ½ · scale · q_t (S_t + R_t)                  (scale defaults to K^-0.5)

On CUDA tensors it runs the Triton kernels (kernels/bigla/chunk.py; under torch.compile as the custom op
`torch.ops.vig_kernels.bigla`, so the graph stays whole); elsewhere, and for heads wider than the
kernels hold (K > 128), the PyTorch chunked implementation.
"""
from __future__ import annotations

import importlib.util
import warnings

import torch

from kernels.bigla.naive import naive_recurrent_bigla
from kernels.bigla.op import bigla_triton
from kernels.bigla.reference import chunked_bigla

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
MAX_TRITON_KEY_DIM = 128
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def bigla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_fwd: torch.Tensor,
    g_bwd: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """BiGLA (see module docstring): Triton on CUDA, PyTorch elsewhere; o has q's dtype (after autocast).

    q, k, v are brought to one dtype: the autocast dtype when autocast is on for their device, else
    their promoted dtype. The gates keep theirs (the kernels read them as fp32).
    """
    _check_inputs(q, k, v, g_fwd, g_bwd)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    if q.is_cuda and TRITON_AVAILABLE and dtype in TRITON_DTYPES:
        if q.shape[-1] <= MAX_TRITON_KEY_DIM:
            return bigla_triton(q, k, v, g_fwd, g_bwd, scale)
        warnings.warn(
            f"bigla: key head dim {q.shape[-1]} > {MAX_TRITON_KEY_DIM}; using the (slower) PyTorch implementation",
            stacklevel=2,
        )
    with torch.autocast(device_type, enabled=False):  # it computes in fp32; autocast would undo that
        return chunked_bigla(q, k, v, g_fwd, g_bwd, scale)


def _check_inputs(q, k, v, g_fwd, g_bwd) -> None:
    if q.dim() != 4:
        raise ValueError(f"bigla expects token-major [B, T, H, K] inputs, got q of shape {tuple(q.shape)}")
    for name, x in (("k", k), ("g_fwd", g_fwd), ("g_bwd", g_bwd)):
        if x.shape != q.shape:
            raise ValueError(f"bigla: {name} has shape {tuple(x.shape)}, expected q's shape {tuple(q.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"bigla: v has shape {tuple(v.shape)}; its [B, T, H] must equal q's {tuple(q.shape[:3])}")
    for name, x in (("q", q), ("k", k), ("v", v), ("g_fwd", g_fwd), ("g_bwd", g_bwd)):
        if not x.is_floating_point():
            raise TypeError(f"bigla: {name} has dtype {x.dtype}; pass floating-point tensors")
        if x.device != q.device:
            raise ValueError(f"bigla: {name} is on {x.device} but q is on {q.device}; move them to one device")


__all__ = ["bigla", "chunked_bigla", "naive_recurrent_bigla"]
