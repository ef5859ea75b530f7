"""The Triton BiGLA kernels for autograd and torch.compile.

`bigla_triton` runs them through a torch.autograd.Function in eager mode and through the custom op
`torch.ops.vig_kernels.bigla` (fake impl + registered autograd) under torch.compile, which keeps the
graph whole. Eager calls avoid the custom op because its host-side dispatch costs more than the kernels
at ViG's sizes. Registering needs only torch; Triton is imported on first use, so CPU-only installs
without a working Triton can still import kernels.
"""
from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("vig_kernels::bigla", mutates_args=())
def bigla_op(q: Tensor, k: Tensor, v: Tensor, g_fwd: Tensor, g_bwd: Tensor, scale: float) -> Tensor:
    """BiGLA forward on the Triton kernels; q, k, v share a dtype; o is contiguous, in q's dtype."""
    from kernels.bigla.chunk import chunk_bigla_fwd

    return chunk_bigla_fwd(q, k, v, g_fwd, g_bwd, scale)


@bigla_op.register_fake
def _bigla_triton_fake(q: Tensor, k: Tensor, v: Tensor, g_fwd: Tensor, g_bwd: Tensor, scale: float) -> Tensor:
    return q.new_empty((*q.shape[:3], v.shape[-1]))


@torch.library.custom_op("vig_kernels::bigla_backward", mutates_args=())
def bigla_backward_op(
    q: Tensor, k: Tensor, v: Tensor, g_fwd: Tensor, g_bwd: Tensor, do: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dg_fwd, dg_bwd) of bigla_op, recomputing the chunk states; contiguous, input dtypes."""
    from kernels.bigla.chunk import chunk_bigla_bwd

    return chunk_bigla_bwd(q, k, v, g_fwd, g_bwd, do, scale)


@bigla_backward_op.register_fake
def _bigla_triton_backward_fake(
    q: Tensor, k: Tensor, v: Tensor, g_fwd: Tensor, g_bwd: Tensor, do: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(x.new_empty(x.shape) for x in (q, k, v, g_fwd, g_bwd))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, g_fwd, g_bwd, scale = inputs
    ctx.save_for_backward(q, k, v, g_fwd, g_bwd)
    ctx.scale = scale


def _backward(ctx, do: Tensor):
    q, k, v, g_fwd, g_bwd = ctx.saved_tensors
    return (*bigla_backward_op(q, k, v, g_fwd, g_bwd, do, ctx.scale), None)


bigla_op.register_autograd(_backward, setup_context=_setup_context)


class BiGLAFunction(torch.autograd.Function):
    """The eager-mode twin of bigla_op: same kernels, plain autograd."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, g_fwd: Tensor, g_bwd: Tensor, scale: float) -> Tensor:
        from kernels.bigla.chunk import chunk_bigla_fwd

        ctx.save_for_backward(q, k, v, g_fwd, g_bwd)
        ctx.scale = scale
        return chunk_bigla_fwd(q, k, v, g_fwd, g_bwd, scale)

    @staticmethod
    def backward(ctx, do: Tensor):
        from kernels.bigla.chunk import chunk_bigla_bwd

        return (*chunk_bigla_bwd(*ctx.saved_tensors, do, ctx.scale), None)


def bigla_triton(q: Tensor, k: Tensor, v: Tensor, g_fwd: Tensor, g_bwd: Tensor, scale: float) -> Tensor:
    """BiGLA on the Triton kernels (q, k, v of one dtype): the custom op under torch.compile, else the
    autograd.Function."""
    if torch.compiler.is_compiling():
        return torch.ops.vig_kernels.bigla(q, k, v, g_fwd, g_bwd, scale)
    return BiGLAFunction.apply(q, k, v, g_fwd, g_bwd, scale)
