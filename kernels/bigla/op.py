"""The Triton BiGLA kernels as torch.library custom ops, so autograd and torch.compile see one opaque op.

Registering needs only torch; Triton is imported when an op first runs, so CPU-only installs without a
working Triton can still import kernels.
"""
from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("vig_kernels::bigla", mutates_args=())
def bigla_triton(q: Tensor, k: Tensor, v: Tensor, g_fwd: Tensor, g_bwd: Tensor, scale: float) -> Tensor:
    """BiGLA forward on the Triton kernels; q, k, v share a dtype; o is contiguous, in q's dtype."""
    from kernels.bigla.chunk import chunk_bigla_fwd

    return chunk_bigla_fwd(q, k, v, g_fwd, g_bwd, scale)


@bigla_triton.register_fake
def _bigla_triton_fake(q: Tensor, k: Tensor, v: Tensor, g_fwd: Tensor, g_bwd: Tensor, scale: float) -> Tensor:
    return q.new_empty((*q.shape[:3], v.shape[-1]))


@torch.library.custom_op("vig_kernels::bigla_backward", mutates_args=())
def bigla_triton_backward(
    q: Tensor, k: Tensor, v: Tensor, g_fwd: Tensor, g_bwd: Tensor, do: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dg_fwd, dg_bwd) of bigla_triton, recomputing the chunk states; contiguous, input dtypes."""
    from kernels.bigla.chunk import chunk_bigla_bwd

    return chunk_bigla_bwd(q, k, v, g_fwd, g_bwd, do, scale)


@bigla_triton_backward.register_fake
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
    return (*bigla_triton_backward(q, k, v, g_fwd, g_bwd, do, ctx.scale), None)


bigla_triton.register_autograd(_backward, setup_context=_setup_context)
