"""Plain (isotropic) ViG: "ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention",
Liao et al., AAAI 2025 (arXiv 2405.18425).

Computes what the released hustvl/ViG models compute and uses the release's parameter names, so the
released checkpoints load unchanged (see vig.checkpoint). Tokens stay channels-last [B, H, W, C] from the
patch embedding to the head. Differences from the release, all deliberate: `no_weight_decay` covers the
position embedding (the release decayed it), and bidirectional attention is one operator
(`kernels.bigla`) in training and eval alike.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.layers import (
    DropPath,
    LayerNorm2d,
    calculate_drop_path_rates,
    resample_abs_pos_embed,
    to_2tuple,
    trunc_normal_,
)
from timm.models import checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from vig.layers import GatedLinearAttention, PatchifyConv2d, RMSNorm, round_up, swiglu_mlp
from vig.models.common import create_model, release_cfg, take_intermediates

__all__ = ["ViG"]


class ConvPatchEmbed(nn.Module):
    """The release's "v2" patch embedding: two strided convs (p/2 then 2) with LayerNorm2d, as [B, H, W, C]."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if patch_size < 2 or patch_size % 2:
            raise ValueError(f"ConvPatchEmbed: patch_size must be an even number >= 2, got {patch_size}")
        stride = patch_size // 2
        self.proj = nn.Sequential(
            PatchifyConv2d(in_chans, embed_dim // 2, kernel_size=stride + 1, stride=stride, padding=1),
            LayerNorm2d(embed_dim // 2, eps=1e-5),
            nn.SiLU(),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
            LayerNorm2d(embed_dim, eps=1e-5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class GLAMLP(nn.Module):
    """SwiGLU MLP; hidden width int(8·dim/3) rounded up to a multiple of 256, as in the release."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden_dim = round_up(int(dim * 8 / 3), 256)
        self.gate_proj = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu_mlp(x, self.gate_proj, self.down_proj)


class GLABlock(nn.Module):
    """Pre-norm residual block: x + DropPath(mixer(RMSNorm(x))), then x + DropPath(MLP(RMSNorm(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        expand_k: float,
        use_act_in_conv: bool,
        use_out_act: bool,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = GatedLinearAttention(
            dim, num_heads, expand_k=expand_k, use_act_in_conv=use_act_in_conv, use_out_act=use_out_act
        )
        self.mlp_norm = RMSNorm(dim)
        self.mlp = GLAMLP(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.attn_norm(x)))
        return x + self.drop_path(self.mlp(self.mlp_norm(x)))


class ViG(nn.Module):
    """Plain ViG: conv patch embedding, absolute position embedding, `depth` GLA blocks, RMSNorm, average pool.

    `forward_features` returns the normalised token grid [B, H/p, W/p, C]; `forward_head` pools it.
    Inputs of any size divisible by the patch size work: the position embedding (trained on
    `img_size`) is resized bicubically to the token grid.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        expand_k: float = 0.5,
        use_act_in_conv: bool = False,
        use_out_act: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.pos_embed_grid = tuple(s // patch_size for s in to_2tuple(img_size))
        self.grad_checkpointing = False

        self.patch_embed = ConvPatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_embed_grid[0] * self.pos_embed_grid[1], embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        drop_path_rates = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            GLABlock(embed_dim, num_heads, expand_k, use_act_in_conv, use_out_act, drop_path_rates[i])
            for i in range(depth)
        )
        self.norm = RMSNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)
        ]
        self.init_weights()

    def init_weights(self) -> None:
        """The release's init: N(0, 0.02) linears with zero bias, then each mixer's xavier re-init."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, GatedLinearAttention):
                module.reset_parameters()
        trunc_normal_(self.pos_embed, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position embedding, norm weights and biases."""
        return {name for name, p in self.named_parameters() if p.ndim <= 1 or name == "pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^pos_embed|^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"ViG supports only average pooling, got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        B, H, W, C = x.shape
        pos_embed = resample_abs_pos_embed(
            self.pos_embed, new_size=(H, W), old_size=self.pos_embed_grid, num_prefix_tokens=0, antialias=False
        )
        return self.pos_drop(x + pos_embed.view(1, H, W, C))

    def _run_block(self, block: GLABlock, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(block, x)
        return block(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        for block in self.blocks:
            x = self._run_block(block, x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs of the chosen blocks (stride = patch size) for dense heads.

        Args:
            indices: block indices (negative from the end), or an int n for the last n blocks; None for all.
            norm: apply the final RMSNorm to each intermediate.
            stop_early: skip the blocks after the last chosen one.
            output_fmt: "NCHW" (a permuted view of channels-last memory) or "NHWC".
            intermediates_only: return only the list, not (final features, list).
        """

        def run_block(i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = self._run_block(self.blocks[i], x)
            return x, x

        x, intermediates = take_intermediates(
            self._embed(x),
            len(self.blocks),
            run_block,
            indices,
            stop_early,
            output_fmt,
            feature_norm=(lambda i, features: self.norm(features)) if norm else None,
        )
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last index (and the final norm / head) for feature extraction."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices


def _cfg(release_file: str) -> dict[str, Any]:
    return release_cfg(release_file, pool_size=(14, 14), first_conv="patch_embed.proj.0", classifier="head")


default_cfgs = generate_default_cfgs(
    {
        "vig_tiny.in1k": _cfg("vig_t_77p2acc.pth"),
        "vig_small.in1k": _cfg("vig_s_81p7acc.pth"),
        "vig_base.in1k": _cfg("vig_b_82p6acc.pth"),
    }
)


def _create_vig(variant: str, pretrained: bool = False, **kwargs: Any) -> ViG:
    return create_model(ViG, variant, pretrained, default_out_indices=3, **kwargs)


@register_model
def vig_tiny(pretrained: bool = False, **kwargs: Any) -> ViG:
    """ViG-T: 5.83M params, 77.2% ImageNet top-1. SiLU after the depth-wise conv and before o_proj."""
    args = dict(embed_dim=192, num_heads=3, use_act_in_conv=True, use_out_act=True, drop_path_rate=0.0)
    return _create_vig("vig_tiny", pretrained, **{**args, **kwargs})


@register_model
def vig_small(pretrained: bool = False, **kwargs: Any) -> ViG:
    """ViG-S: 22.62M params, 81.7% ImageNet top-1."""
    args = dict(embed_dim=384, num_heads=6, drop_path_rate=0.2)
    return _create_vig("vig_small", pretrained, **{**args, **kwargs})


@register_model
def vig_base(pretrained: bool = False, **kwargs: Any) -> ViG:
    """ViG-B: 89.02M params, 82.6% ImageNet top-1."""
    args = dict(embed_dim=768, num_heads=12, drop_path_rate=0.5)
    return _create_vig("vig_base", pretrained, **{**args, **kwargs})
