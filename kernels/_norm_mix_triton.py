"""Triton kernels behind kernels.norm_mix (see there for the function); rows are a head's D channels."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import output_buffer

ROW_BLOCK_ELEMENTS = 1024  # rows per program = this / padded D (4096 spilled registers in the backward)


@triton.jit
def _load(ptr, rows, stride, cols, mask):
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _normalized(x, D: tl.constexpr, eps):
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
    return x * rstd[:, None], rstd


@triton.jit
def norm_mix_fwd_kernel(o, local, gate, o_weight, local_weight, y, n_rows, o_stride, local_stride, gate_stride,
                        eps, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, SWISH: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BD)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    o_hat, _ = _normalized(_load(o, rows, o_stride, cols, mask), D, eps)
    l_hat, _ = _normalized(_load(local, rows, local_stride, cols, mask), D, eps)
    w_o = tl.load(o_weight + cols, mask=cols < D, other=0.0).to(tl.float32)
    w_l = tl.load(local_weight + cols, mask=cols < D, other=0.0).to(tl.float32)
    g = tl.sigmoid(_load(gate, rows, gate_stride, cols, mask))
    out = o_hat * w_o[None, :] * g + l_hat * w_l[None, :] * (1.0 - g)
    if SWISH:
        out = out * tl.sigmoid(out)
    tl.store(y + rows[:, None].to(tl.int64) * D + cols[None, :], out.to(y.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_input_grad(d_hat, x_hat, rstd, D: tl.constexpr):
    """Gradient through x_hat = x * rstd(x), given the gradient d_hat of x_hat."""
    return rstd[:, None] * (d_hat - x_hat * (tl.sum(d_hat * x_hat, 1) / D)[:, None])


@triton.jit
def norm_mix_bwd_kernel(dy, o, local, gate, o_weight, local_weight, do, dlocal, dgate, dw_o_part, dw_l_part,
                        n_rows, dy_stride, o_stride, local_stride, gate_stride, eps,
                        D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, SWISH: tl.constexpr):
    """Input gradients per row; weight gradients as one partial sum per program (summed by the caller)."""
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    cols = tl.arange(0, BD)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    o_hat, o_rstd = _normalized(_load(o, rows, o_stride, cols, mask), D, eps)
    l_hat, l_rstd = _normalized(_load(local, rows, local_stride, cols, mask), D, eps)
    w_o = tl.load(o_weight + cols, mask=cols < D, other=0.0).to(tl.float32)
    w_l = tl.load(local_weight + cols, mask=cols < D, other=0.0).to(tl.float32)
    g = tl.sigmoid(_load(gate, rows, gate_stride, cols, mask))
    a = o_hat * w_o[None, :]
    b = l_hat * w_l[None, :]
    d_mix = _load(dy, rows, dy_stride, cols, mask)
    if SWISH:
        mix = a * g + b * (1.0 - g)
        s = tl.sigmoid(mix)
        d_mix = d_mix * (s + mix * s * (1.0 - s))
    da = d_mix * g
    db = d_mix * (1.0 - g)
    out = rows[:, None].to(tl.int64) * D + cols[None, :]
    tl.store(dgate + out, (d_mix * (a - b) * g * (1.0 - g)).to(dgate.dtype.element_ty), mask=mask)
    tl.store(do + out, _rmsnorm_input_grad(da * w_o[None, :], o_hat, o_rstd, D).to(do.dtype.element_ty), mask=mask)
    tl.store(dlocal + out, _rmsnorm_input_grad(db * w_l[None, :], l_hat, l_rstd, D).to(dlocal.dtype.element_ty),
             mask=mask)
    tl.store(dw_o_part + pid * D + cols, tl.sum(da * o_hat, 0), mask=cols < D)
    tl.store(dw_l_part + pid * D + cols, tl.sum(db * l_hat, 0), mask=cols < D)


def _blocks(D: int) -> tuple[int, int]:
    BD = triton.next_power_of_2(D)
    return BD, max(1, ROW_BLOCK_ELEMENTS // BD)


def norm_mix_fwd(o: torch.Tensor, local: torch.Tensor, gate: torch.Tensor, o_weight: torch.Tensor,
                 local_weight: torch.Tensor, eps: float, swish: bool) -> torch.Tensor:
    """[N, D] row views in (last dim contiguous), contiguous [N, D] out in o's dtype."""
    n_rows, D = o.shape
    BD, BR = _blocks(D)
    y = output_buffer((n_rows, D), o.dtype, o.device)
    norm_mix_fwd_kernel[(triton.cdiv(n_rows, BR),)](
        o, local, gate, o_weight, local_weight, y, n_rows, o.stride(0), local.stride(0), gate.stride(0), eps,
        D=D, BD=BD, BR=BR, SWISH=swish)
    return y.to(o.dtype)


def norm_mix_bwd(dy: torch.Tensor, o: torch.Tensor, local: torch.Tensor, gate: torch.Tensor, o_weight: torch.Tensor,
                 local_weight: torch.Tensor, eps: float, swish: bool) -> tuple[torch.Tensor, ...]:
    """Gradients for (o, local, gate, o_weight, local_weight), each in its input's dtype."""
    n_rows, D = o.shape
    BD, BR = _blocks(D)
    grid = triton.cdiv(n_rows, BR)
    do, dlocal, dgate = (output_buffer((n_rows, D), x.dtype, x.device) for x in (o, local, gate))
    dw_o_part, dw_l_part = (torch.empty(grid, D, dtype=torch.float32, device=o.device) for _ in range(2))
    norm_mix_bwd_kernel[(grid,)](
        dy, o, local, gate, o_weight, local_weight, do, dlocal, dgate, dw_o_part, dw_l_part, n_rows,
        dy.stride(0), o.stride(0), local.stride(0), gate.stride(0), eps, D=D, BD=BD, BR=BR, SWISH=swish)
    return (do.to(o.dtype), dlocal.to(local.dtype), dgate.to(gate.dtype),
            dw_o_part.sum(0).to(o_weight.dtype), dw_l_part.sum(0).to(local_weight.dtype))
