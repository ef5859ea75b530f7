"""Hierarchical ViG (ViG-H) from "ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention",
Liao et al., AAAI 2025 (arXiv 2405.18425).

Computes what the released hustvl/ViG ViG-H models compute and uses the release's parameter names. The
release runs its classification configs channels-first (LayerNorm2d, 1x1-conv "Linear2d"); this module runs
the release's own channels-last layout (the one its detection backbone uses), which has the same parameters
and state-dict keys and feeds the token mixer without transposes.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.layers import DropPath, calculate_drop_path_rates, trunc_normal_
from timm.models import checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torchvision.ops.misc import Permute

from vig.layers import GatedLinearAttention, round_up, swiglu_mlp
from vig.models.common import create_model, release_cfg, take_intermediates

__all__ = ["ViGH"]

NHWC_TO_NCHW = [0, 3, 1, 2]
NCHW_TO_NHWC = [0, 2, 3, 1]


def conv_stem(in_chans: int, dim: int) -> nn.Sequential:
    """Stride-4 stem: conv3x3/2 -> LN -> GELU -> conv3x3/2 -> LN, NCHW in, NHWC out (release indices 0..7)."""
    return nn.Sequential(
        nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1),
        Permute(NCHW_TO_NHWC),
        nn.LayerNorm(dim // 2),
        Permute(NHWC_TO_NCHW),
        nn.GELU(),
        nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1),
        Permute(NCHW_TO_NHWC),
        nn.LayerNorm(dim),
    )


def conv_downsample(dim: int, out_dim: int) -> nn.Sequential:
    """conv3x3/2 -> LN between stages, NHWC in and out (release indices 1 and 3)."""
    return nn.Sequential(
        Permute(NHWC_TO_NCHW),
        nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1),
        Permute(NCHW_TO_NHWC),
        nn.LayerNorm(out_dim),
    )


class GatedMlp(nn.Module):
    """SwiGLU MLP; hidden width int(8·dim/3) rounded up to a multiple of 32, as in the release."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden_dim = round_up(int(dim * 8 / 3), 32)
        self.fc1 = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu_mlp(x, self.fc1, self.fc2)


class ViGHBlock(nn.Module):
    """Pre-norm residual block on [B, H, W, C]: x + DropPath(mixer(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, expand_k: float, drop_path: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = GatedLinearAttention(dim, num_heads, expand_k=expand_k)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = GatedMlp(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViGHStage(nn.Module):
    """Blocks at one resolution, then the optional downsample to the next stage."""

    def __init__(
        self, dim: int, out_dim: int | None, depth: int, num_heads: int, expand_k: float, drop_path: Sequence[float]
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*(ViGHBlock(dim, num_heads, expand_k, drop_path[i]) for i in range(depth)))
        self.downsample = conv_downsample(dim, out_dim) if out_dim is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (the stage's features before downsampling, the next stage's input)."""
        for block in self.blocks:
            x = checkpoint(block, x) if self.grad_checkpointing and not torch.jit.is_scripting() else block(x)
        return x, self.downsample(x)


class NormPoolHead(nn.Module):
    """LayerNorm, global average pool, linear classifier (the release's `classifier`)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x).mean(dim=(1, 2))
        return x if pre_logits else self.head(x)


class ViGH(nn.Module):
    """ViG-H: stride-4 conv stem and four stages of ViG blocks at strides 4/8/16/32 (widths C, 2C, 4C, 8C).

    `forward_features` returns the last stage's grid [B, H/32, W/32, 8C]; any input size works.
    With `feature_norms=True` the model also holds the release detection backbone's per-stage output norms
    (`outnorm{i}`), applied by `forward_intermediates(norm=True)`.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        dims: int | Sequence[int] = 96,
        depths: Sequence[int] = (2, 2, 5, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        expand_k: float = 0.5,
        drop_path_rate: float = 0.0,
        feature_norms: bool = False,
    ) -> None:
        super().__init__()
        num_stages = len(depths)
        dims = [dims * 2**i for i in range(num_stages)] if isinstance(dims, int) else list(dims)
        if not len(dims) == len(num_heads) == num_stages:
            raise ValueError(
                f"ViGH: dims {dims}, depths {list(depths)} and num_heads {list(num_heads)} differ in length"
            )
        self.num_classes = num_classes
        self.dims = dims
        self.num_features = self.head_hidden_size = dims[-1]
        self.feature_norms = feature_norms

        self.patch_embed = conv_stem(in_chans, dims[0])
        drop_path_rates = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.layers = nn.ModuleList(
            ViGHStage(
                dims[i],
                dims[i + 1] if i + 1 < num_stages else None,
                depths[i],
                num_heads[i],
                expand_k,
                drop_path_rates[i],
            )
            for i in range(num_stages)
        )
        if feature_norms:
            for i, dim in enumerate(dims):
                self.add_module(f"outnorm{i}", nn.LayerNorm(dim))
        self.classifier = NormPoolHead(dims[-1], num_classes)
        self.feature_info = [
            dict(num_chs=dim, reduction=4 * 2**i, module=f"layers.{i}") for i, dim in enumerate(dims)
        ]
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Runs after the mixers' own xavier init and overwrites it for every Linear, as the release does;
        # only the depth-wise convs keep their xavier init.
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Norm weights and biases."""
        return {name for name, p in self.named_parameters() if p.ndim <= 1}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        fine = [(r"^layers\.(\d+)\.blocks\.(\d+)", None), (r"^layers\.(\d+)\.downsample", (99999,))]
        return dict(stem=r"^patch_embed", blocks=r"^layers\.(\d+)" if coarse else fine)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"ViGH supports only average pooling, got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.classifier.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for stage in self.layers:
            _, x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.classifier(x, pre_logits=pre_logits)

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
        """Stage outputs before each downsample (strides 4, 8, 16, 32) for dense heads.

        Args:
            indices: stage indices (negative from the end), or an int n for the last n stages; None for all.
            norm: apply the per-stage output norms `outnorm{i}` (needs `feature_norms=True`).
            stop_early: skip the stages after the last chosen one.
            output_fmt: "NCHW" (a permuted view of channels-last memory) or "NHWC".
            intermediates_only: return only the list, not (final features, list).
        """
        if norm and not self.feature_norms:
            raise ValueError(
                "forward_intermediates(norm=True) needs the per-stage norms: build with feature_norms=True"
            )
        x, intermediates = take_intermediates(
            self.patch_embed(x),
            len(self.layers),
            lambda i, x: self.layers[i](x),
            indices,
            stop_early,
            output_fmt,
            feature_norm=(lambda i, features: getattr(self, f"outnorm{i}")(features)) if norm else None,
        )
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last index (and the head's norm / classifier) for feature extraction."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        self.layers[-1].downsample = nn.Identity()
        if prune_norm:
            self.classifier.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices


def _cfg(release_file: str) -> dict[str, Any]:
    return release_cfg(release_file, pool_size=(7, 7), first_conv="patch_embed.0", classifier="classifier.head")


default_cfgs = generate_default_cfgs(
    {
        "vig_h_tiny.in1k": _cfg("vig_h_t_82p8acc.pth"),
        "vig_h_small.in1k": _cfg("vig_h_s_83p8acc.pth"),
        "vig_h_base.in1k": _cfg("vig_h_b_84p2acc.pth"),
    }
)


def _create_vig_h(variant: str, pretrained: bool = False, **kwargs: Any) -> ViGH:
    return create_model(ViGH, variant, pretrained, default_out_indices=(0, 1, 2, 3), **kwargs)


@register_model
def vig_h_tiny(pretrained: bool = False, **kwargs: Any) -> ViGH:
    """ViG-H-T: 28.60M params, 82.8% ImageNet top-1."""
    args = dict(dims=96, depths=(2, 2, 5, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2)
    return _create_vig_h("vig_h_tiny", pretrained, **{**args, **kwargs})


@register_model
def vig_h_small(pretrained: bool = False, **kwargs: Any) -> ViGH:
    """ViG-H-S: 50.05M params, 83.8% ImageNet top-1."""
    args = dict(dims=96, depths=(2, 2, 17, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3)
    return _create_vig_h("vig_h_small", pretrained, **{**args, **kwargs})


@register_model
def vig_h_base(pretrained: bool = False, **kwargs: Any) -> ViGH:
    """ViG-H-B: 88.90M params, 84.2% ImageNet top-1."""
    args = dict(dims=128, depths=(2, 2, 17, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.6)
    return _create_vig_h("vig_h_base", pretrained, **{**args, **kwargs})
