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
def bigla_op(q: Tensor, k: Tensor, v: Tensor, g_fwd: Tensor, g_bwd: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """BiGLA forward on the Triton kernels; q, k, v share a dtype; o is contiguous, in q's dtype. The second
    output, not differentiable, holds the states at the segments' edges for the backward (chunk_bigla_fwd),
    empty for sequences of one segment: a custom op cannot return None."""
    from kernels.bigla.chunk import chunk_bigla_fwd

    o, edge_states = chunk_bigla_fwd(q, k, v, g_fwd, g_bwd, scale)
    return o, (q.new_empty(0, dtype=torch.float32) if edge_states is None else edge_states)


@bigla_op.register_fake
def _bigla_triton_fake(q: Tensor, k: Tensor, v: Tensor, g_fwd: Tensor, g_bwd: Tensor,
                       scale: float) -> tuple[Tensor, Tensor]:
    from kernels.bigla.chunk import edge_states_shape

    shape = edge_states_shape(q, v)
    return q.new_empty((*q.shape[:3], v.shape[-1])), q.new_empty(shape or (0,), dtype=torch.float32)


@torch.library.custom_op("vig_kernels::bigla_backward", mutates_args=())
def bigla_backward_op(
    q: Tensor, k: Tensor, v: Tensor, g_fwd: Tensor, g_bwd: Tensor, do: Tensor, scale: float, edge_states: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dg_fwd, dg_bwd) of bigla_op, given its edge states; contiguous, input dtypes."""
    from kernels.bigla.chunk import chunk_bigla_bwd

    return chunk_bigla_bwd(q, k, v, g_fwd, g_bwd, do, scale, edge_states if edge_states.numel() else None)


@bigla_backward_op.register_fake
def _bigla_triton_backward_fake(
    q: Tensor, k: Tensor, v: Tensor, g_fwd: Tensor, g_bwd: Tensor, do: Tensor, scale: float, edge_states: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(x.new_empty(x.shape) for x in (q, k, v, g_fwd, g_bwd))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, g_fwd, g_bwd, scale = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(q, k, v, g_fwd, g_bwd, output[1])
    ctx.scale = scale


def _backward(ctx, do: Tensor, _d_edge_states: Tensor | None):
    *inputs, edge_states = ctx.saved_tensors
    return (*bigla_backward_op(*inputs, do, ctx.scale, edge_states), None)


bigla_op.register_autograd(_backward, setup_context=_setup_context)


class BiGLAFunction(torch.autograd.Function):
    """The eager-mode twin of bigla_op: same kernels, plain autograd."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, g_fwd: Tensor, g_bwd: Tensor, scale: float) -> Tensor:
        from kernels.bigla.chunk import chunk_bigla_fwd

        o, edge_states = chunk_bigla_fwd(q, k, v, g_fwd, g_bwd, scale)
        ctx.save_for_backward(q, k, v, g_fwd, g_bwd, edge_states)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do: Tensor):
        from kernels.bigla.chunk import chunk_bigla_bwd

        *inputs, edge_states = ctx.saved_tensors
        return (*chunk_bigla_bwd(*inputs, do, ctx.scale, edge_states), None)


def bigla_triton(q: Tensor, k: Tensor, v: Tensor, g_fwd: Tensor, g_bwd: Tensor, scale: float) -> Tensor:
    """BiGLA on the Triton kernels (q, k, v of one dtype): the custom op under torch.compile, else the
    autograd.Function."""
    if torch.compiler.is_compiling():
        return torch.ops.vig_kernels.bigla(q, k, v, g_fwd, g_bwd, scale)[0]
    return BiGLAFunction.apply(q, k, v, g_fwd, g_bwd, scale)
