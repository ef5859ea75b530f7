"""Bidirectional gated linear attention (BiGLA).

`bigla(q, k, v, g_fwd, g_bwd, scale=None) -> o` with token-major inputs
q, k, g_fwd, g_bwd: [B, T, H, K]; v: [B, T, H, V]; gates are log-space forget gates (<= 0):

    S_t = diag(exp(g_fwd[t])) S_{t-1} + k_tᵀ v_t      (left to right, S_0 = 0)
    R_t = diag(exp(g_bwd[t])) R_{t+1} + k_tᵀ v_t      (right to left, R_{T+1} = 0)
    o_t = ½ · scale · q_t (S_t + R_t)                  (scale defaults to K^-0.5)
"""
from __future__ import annotations

import torch

from kernels.bigla.naive import naive_recurrent_bigla
from kernels.bigla.reference import chunked_bigla


def bigla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_fwd: torch.Tensor,
    g_bwd: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """BiGLA on any device: the PyTorch chunked implementation (see module docstring for semantics)."""
    _check_shapes(q, k, v, g_fwd, g_bwd)
    return chunked_bigla(q, k, v, g_fwd, g_bwd, scale)


def _check_shapes(q, k, v, g_fwd, g_bwd) -> None:
    if q.dim() != 4:
        raise ValueError(f"bigla expects token-major [B, T, H, K] inputs, got q of shape {tuple(q.shape)}")
    for name, x in (("k", k), ("g_fwd", g_fwd), ("g_bwd", g_bwd)):
        if x.shape != q.shape:
            raise ValueError(f"bigla: {name} has shape {tuple(x.shape)}, expected q's shape {tuple(q.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"bigla: v has shape {tuple(v.shape)}; its [B, T, H] must equal q's {tuple(q.shape[:3])}")


__all__ = ["bigla", "chunked_bigla", "naive_recurrent_bigla"]
