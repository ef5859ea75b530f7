"""Fused epilogue of a gated-linear-attention token mixer: two per-head RMSNorms and a sigmoid-gate mix.

    norm_mix(o, local, gate, o_weight, local_weight) =
        act(rmsnorm(o) * o_weight * sigmoid(gate) + rmsnorm(local) * local_weight * (1 - sigmoid(gate)))

over the last dim (a head's channels); rmsnorm(x) = x / sqrt(mean(x^2) + eps); act is swish (x * sigmoid(x))
or the identity. On CUDA one Triton kernel reads o, local and gate once and writes the result once (and
one more for the backward): eager calls go through a torch.autograd.Function, torch.compile sees the
custom op `torch.ops.vig_kernels.norm_mix`. Elsewhere the PyTorch composition below, which is also the
tests' reference.
"""
from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def norm_mix_reference(o: Tensor, local: Tensor, gate: Tensor, o_weight: Tensor, local_weight: Tensor,
                       eps: float = 1e-6, swish: bool = False) -> Tensor:
    """The epilogue in PyTorch ops, computed in fp32, returned in o's dtype."""
    def rmsnorm(x: Tensor, w: Tensor) -> Tensor:
        x = x.float()
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w.float()

    g = torch.sigmoid(gate.float())
    y = rmsnorm(o, o_weight) * g + rmsnorm(local, local_weight) * (1 - g)
    if swish:
        y = y * torch.sigmoid(y)
    return y.to(o.dtype)


def norm_mix(o: Tensor, local: Tensor, gate: Tensor, o_weight: Tensor, local_weight: Tensor,
             eps: float = 1e-6, swish: bool = False) -> Tensor:
    """Fused epilogue (module docstring) on [..., D] inputs with [D] weights; the result has o's dtype."""
    if not (o.shape == local.shape == gate.shape):
        raise ValueError(f"norm_mix: o {tuple(o.shape)}, local {tuple(local.shape)} and gate {tuple(gate.shape)} "
                         "must have one shape")
    for name, w in (("o_weight", o_weight), ("local_weight", local_weight)):
        if w.shape != o.shape[-1:]:
            raise ValueError(f"norm_mix: {name} has shape {tuple(w.shape)}, expected ({o.shape[-1]},)")
    if o.is_cuda and TRITON_AVAILABLE:
        if torch.compiler.is_compiling():
            return torch.ops.vig_kernels.norm_mix(o, local, gate, o_weight, local_weight, float(eps), bool(swish))
        return NormMixFunction.apply(o, local, gate, o_weight, local_weight, float(eps), bool(swish))
    return norm_mix_reference(o, local, gate, o_weight, local_weight, eps, swish)


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]) if x.stride(-1) == 1 else x.contiguous().reshape(-1, x.shape[-1])


@torch.library.custom_op("vig_kernels::norm_mix", mutates_args=())
def norm_mix_triton(o: Tensor, local: Tensor, gate: Tensor, o_weight: Tensor, local_weight: Tensor,
                    eps: float, swish: bool) -> Tensor:
    from kernels._norm_mix_triton import norm_mix_fwd

    y = norm_mix_fwd(_rows(o), _rows(local), _rows(gate), o_weight, local_weight, eps, swish)
    return y.view(o.shape)


@norm_mix_triton.register_fake
def _norm_mix_fake(o, local, gate, o_weight, local_weight, eps, swish):
    return o.new_empty(o.shape)


@torch.library.custom_op("vig_kernels::norm_mix_backward", mutates_args=())
def norm_mix_triton_backward(dy: Tensor, o: Tensor, local: Tensor, gate: Tensor, o_weight: Tensor,
                             local_weight: Tensor, eps: float, swish: bool
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from kernels._norm_mix_triton import norm_mix_bwd

    grads = norm_mix_bwd(_rows(dy), _rows(o), _rows(local), _rows(gate), o_weight, local_weight, eps, swish)
    return tuple(g.view(x.shape) for g, x in zip(grads, (o, local, gate, o_weight, local_weight)))


@norm_mix_triton_backward.register_fake
def _norm_mix_backward_fake(dy, o, local, gate, o_weight, local_weight, eps, swish):
    return tuple(x.new_empty(x.shape) for x in (o, local, gate, o_weight, local_weight))


def _setup_context(ctx, inputs, output) -> None:
    o, local, gate, o_weight, local_weight, eps, swish = inputs
    ctx.save_for_backward(o, local, gate, o_weight, local_weight)
    ctx.eps, ctx.swish = eps, swish


def _backward(ctx, dy: Tensor):
    grads = norm_mix_triton_backward(dy, *ctx.saved_tensors, ctx.eps, ctx.swish)
    return (*grads, None, None)


norm_mix_triton.register_autograd(_backward, setup_context=_setup_context)


class NormMixFunction(torch.autograd.Function):
    """The eager-mode twin of the custom op (whose host-side dispatch costs more than the kernel)."""

    @staticmethod
    def forward(ctx, o, local, gate, o_weight, local_weight, eps: float, swish: bool) -> Tensor:
        from kernels._norm_mix_triton import norm_mix_fwd

        ctx.save_for_backward(o, local, gate, o_weight, local_weight)
        ctx.eps, ctx.swish = eps, swish
        return norm_mix_fwd(_rows(o), _rows(local), _rows(gate), o_weight, local_weight, eps, swish).view(o.shape)

    @staticmethod
    def backward(ctx, dy: Tensor):
        from kernels._norm_mix_triton import norm_mix_bwd

        saved = ctx.saved_tensors
        grads = norm_mix_bwd(_rows(dy), *(_rows(x) for x in saved[:3]), *saved[3:], ctx.eps, ctx.swish)
        return (*(g.view(x.shape) for g, x in zip(grads, saved)), None, None)

__all__ = ["norm_mix", "norm_mix_reference"]
