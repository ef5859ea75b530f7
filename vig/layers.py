"""Layers shared by plain ViG and ViG-H: RMSNorm, the SwiGLU product, the stem's patchify conv and the
ViG token mixer.

On CUDA tensors the mixer runs our Triton kernels (BiGLA and its fused epilogue) and, in eager mode,
flash-linear-attention's fused RMSNorm and SwiGLU; under torch.compile those two are plain PyTorch, which
the compiler fuses itself. Elsewhere everything is plain PyTorch. The choice is made per call, so one
model moves freely between CPU and GPU.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels.norm_mix import norm_mix

GATE_LOGIT_NORMALIZER = 16
GATE_LOW_RANK_DIM = 16
XAVIER_GAIN = 2**-2.5


@functools.cache
def _fla_ops():
    """flash-linear-attention's fused rms_norm and swiglu, or None when fla is not installed.

    Imported on first CUDA use only: importing fla on a machine without a GPU prints a warning.
    """
    try:
        from fla.modules.activations import swiglu
        from fla.modules.norm.layernorm import rms_norm
    except ImportError:
        return None
    return rms_norm, swiglu


def _eager_fla_ops(x: torch.Tensor):
    """fla's fused ops for eager CUDA calls; None under torch.compile (fla's launchers break the graph)."""
    return _fla_ops() if x.is_cuda and not torch.compiler.is_compiling() else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x², last dim) + eps) * weight."""
    fla_ops = _eager_fla_ops(x)
    if fla_ops is not None:
        return fla_ops[0](x, weight, None, eps=eps)
    return F.rms_norm(x, weight.shape, weight, eps)


def swiglu(gate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """silu(gate) * value."""
    fla_ops = _eager_fla_ops(gate)
    if fla_ops is not None:
        return fla_ops[1](gate, value)
    return F.silu(gate) * value


def swiglu_mlp(x: torch.Tensor, gate_value_proj: nn.Linear, down_proj: nn.Linear) -> torch.Tensor:
    """down_proj(silu(gate) * value), where gate and value are the two halves of one fused projection."""
    gate, value = gate_value_proj(x).chunk(2, dim=-1)
    return down_proj(swiglu(gate, value))


def round_up(x: int, multiple: int) -> int:
    return multiple * -(-x // multiple)


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension with a learned scale (no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class PatchifyConv2d(nn.Conv2d):
    """A strided convolution whose kernel is at most twice its stride (the ViG stem's first conv: 9x9, stride 8).

    On CUDA under torch.compile or autograd it runs as space-to-depth: the padded image is cut into
    stride x stride blocks stacked on the channels (pixel_unshuffle), then a convolution of ceil(k/s) x
    ceil(k/s) blocks with stride 1 and the kernel zero-padded to whole blocks. Same sums, but a dense
    convolution over C * s^2 channels. Measured on an H200 (ViG-T's stem, 224^2, batch 256, bf16): forward
    + backward 0.97 ms against cuDNN's strided conv at 1.52 ms. Compiled ViG-T against compiled DeiT-T in
    the same run went from 1.06x to 1.13x at 1024^2 and stayed 0.60x at 224^2 (two runs on two cards). An
    eager forward alone gains nothing (0.61 vs 0.59 ms) and pays for the padded copies in peak memory (+50%
    for ViG-T at 1024^2), so eager inference, like every CPU call, stays nn.Conv2d. Parameters and their
    names are nn.Conv2d's.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int) -> None:
        if not stride < kernel_size <= 2 * stride:
            raise ValueError(f"PatchifyConv2d: kernel_size {kernel_size} must exceed stride {stride} by at most "
                             "the stride; use nn.Conv2d otherwise")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and (torch.compiler.is_compiling() or torch.is_grad_enabled()):
            return space_to_depth_conv(self, x)
        return super().forward(x)


def space_to_depth_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for a square stride-s convolution with zero padding, as pixel_unshuffle + a stride-1 convolution."""
    (k, _), (s, _), (p, _) = conv.kernel_size, conv.stride, conv.padding
    blocks = -(-k // s)
    out_h, out_w = ((n + 2 * p - k) // s + 1 for n in x.shape[-2:])
    # Pad (or crop) so that the blocks cover exactly the rows and columns the outputs read.
    span_h, span_w = (out_h + blocks - 1) * s, (out_w + blocks - 1) * s
    x = F.pad(x, (p, span_w - x.shape[-1] - p, p, span_h - x.shape[-2] - p))
    weight = F.pad(conv.weight, (0, blocks * s - k, 0, blocks * s - k))
    out_c, in_c = weight.shape[:2]
    # pixel_unshuffle puts pixel (i, j) of a block of channel c on channel c * s^2 + i * s + j.
    weight = weight.view(out_c, in_c, blocks, s, blocks, s).permute(0, 1, 3, 5, 2, 4)
    return F.conv2d(F.pixel_unshuffle(x, s), weight.reshape(out_c, in_c * s * s, blocks, blocks), conv.bias)


class GatedLinearAttention(nn.Module):
    """The ViG token mixer on a channels-last grid [B, H, W, C] -> [B, H, W, C].

    A depth-wise 3x3 conv gives the local branch; q/k/v, the forward and backward log-decays
    (logsigmoid(z) / 16, from one low-rank projection) and the injection gate are all projected from it.
    Bidirectional gated linear attention over the row-major token sequence gives the global branch;
    both branches are RMS-normalised per head and mixed by the sigmoid gate (2D gating locality
    injection) before the output projection. Parameter names follow the official release.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        expand_k: float = 0.5,
        use_act_in_conv: bool = False,
        use_out_act: bool = False,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        key_dim = int(dim * expand_k)
        if key_dim % num_heads or dim % num_heads:
            raise ValueError(
                f"GatedLinearAttention: dim {dim} and key dim {key_dim} (dim * expand_k) must both be divisible "
                f"by num_heads {num_heads}; choose num_heads dividing both"
            )
        self.num_heads = num_heads
        self.key_dim = key_dim
        # The value dim equals dim: the local branch is mixed into the attention output channel by channel.
        head_v_dim = dim // num_heads
        self.in_proj = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False),
            nn.SiLU() if use_act_in_conv else nn.Identity(),
        )
        self.qkv_proj = nn.Linear(dim, 2 * key_dim + dim, bias=False)
        self.gk_proj = nn.Sequential(
            nn.Linear(dim, GATE_LOW_RANK_DIM, bias=False),
            nn.Linear(GATE_LOW_RANK_DIM, 2 * key_dim, bias=True),
        )
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.g_norm = RMSNorm(head_v_dim, eps=norm_eps)
        self.l_norm = RMSNorm(head_v_dim, eps=norm_eps)
        self.g_proj = nn.Linear(dim, dim, bias=True)
        self.use_out_act = use_out_act  # swish on the mixed branches, fused into the epilogue
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The release's mixer init: xavier-uniform with gain 2^-2.5 on every projection and the depth-wise conv."""
        for weight in (
            self.in_proj[0].weight,
            self.qkv_proj.weight,
            self.gk_proj[0].weight,
            self.gk_proj[1].weight,
            self.g_proj.weight,
            self.o_proj.weight,
        ):
            nn.init.xavier_uniform_(weight, gain=XAVIER_GAIN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        heads = self.num_heads
        # The conv reads and writes channels-last memory, so both permutes are free.
        local = self.in_proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(B, H * W, C)
        q, k, v = self.qkv_proj(local).split([self.key_dim, self.key_dim, C], dim=-1)
        log_decay = F.logsigmoid(self.gk_proj(local)) / GATE_LOGIT_NORMALIZER
        g_fwd, g_bwd = log_decay.unflatten(-1, (2, heads, -1)).unbind(2)
        q, k, v = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))
        o = kernels.bigla(q, k, v, g_fwd, g_bwd)
        gate_logits = self.g_proj(local).unflatten(-1, (heads, -1))
        # rmsnorm(o) * sigmoid(gate) + rmsnorm(local) * (1 - sigmoid(gate)), then swish: one pass over memory.
        o = norm_mix(
            o, local.unflatten(-1, (heads, -1)), gate_logits, self.g_norm.weight, self.l_norm.weight,
            eps=self.g_norm.eps, swish=self.use_out_act,
        )
        return self.o_proj(o.flatten(-2)).view(B, H, W, C)
