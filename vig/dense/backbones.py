"""ViG backbones for dense prediction: multi-scale NCHW features keyed "0".."n-1" as torchvision expects.

- Plain ViG has one single-scale token map; `PlainViGFeatures` turns it into a pyramid with ViTDet's
  simple feature pyramid (Li et al., "Exploring Plain Vision Transformer Backbones for Object
  Detection", 2022): transposed convs to go finer, identity at the native stride, max-pooling to go
  coarser, LayerNorm2d + GELU between stacked transposed convs.
- ViG-H already has four stages (strides 4/8/16/32); `HierViGFeatures` returns the chosen stage
  outputs, each through its LayerNorm `outnorm{i}` (built by the model with `feature_norms=True`, as in
  the official `Backbone_HierViG`, so released detection checkpoints keep their key names).

Both read the trunk through timm's `forward_intermediates` and describe their outputs with
`out_channels` (one entry per key) and `strides`, which is what the FPN / UperNet heads consume.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import timm
import torch
from timm.layers import LayerNorm2d
from torch import nn

# ViTDet's simple feature pyramid uses LayerNorm with eps 1e-6.
PYRAMID_NORM_EPS = 1e-6


def _log2_exact(ratio: int, what: str) -> int:
    steps = int(round(math.log2(ratio))) if ratio > 0 else -1
    if steps < 0 or 2**steps != ratio:
        raise ValueError(f"{what} must be a power-of-two ratio, got {ratio}")
    return steps


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one map at `in_stride` -> maps at each of `out_strides`.

    Finer levels halve the channels per transposed conv (ViTDet: dim -> dim/2 -> dim/4 for 4x up);
    the native level is the input itself; coarser levels are max-pooled.
    """

    def __init__(self, in_channels: int, in_stride: int, out_strides: Sequence[int] = (4, 8, 16, 32)) -> None:
        super().__init__()
        if list(out_strides) != sorted(set(out_strides)):
            raise ValueError(f"out_strides must be strictly increasing, got {list(out_strides)}")
        self.in_stride = in_stride
        self.strides = list(out_strides)
        self.out_channels: list[int] = []
        self.levels = nn.ModuleList()
        for stride in out_strides:
            if stride < in_stride:
                steps = _log2_exact(in_stride // stride if in_stride % stride == 0 else 0,
                                    f"backbone stride {in_stride} / pyramid stride {stride}")
                if in_channels % 2**steps:
                    raise ValueError(f"{in_channels} channels cannot be halved {steps} times for stride {stride}")
                layers: list[nn.Module] = []
                channels = in_channels
                for step in range(steps):
                    if step:
                        layers += [LayerNorm2d(channels, eps=PYRAMID_NORM_EPS), nn.GELU()]
                    layers.append(nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2))
                    channels //= 2
                self.levels.append(nn.Sequential(*layers))
                self.out_channels.append(channels)
            elif stride == in_stride:
                self.levels.append(nn.Identity())
                self.out_channels.append(in_channels)
            else:
                ratio = stride // in_stride if stride % in_stride == 0 else 0
                _log2_exact(ratio, f"pyramid stride {stride} / backbone stride {in_stride}")
                self.levels.append(nn.MaxPool2d(kernel_size=ratio, stride=ratio))
                self.out_channels.append(in_channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [level(x) for level in self.levels]


def _as_dict(features: Sequence[torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((str(i), f) for i, f in enumerate(features))


class PlainViGFeatures(nn.Module):
    """Plain (single-scale) ViG -> simple feature pyramid at `out_strides`."""

    def __init__(self, trunk: nn.Module, out_strides: Sequence[int] = (4, 8, 16, 32)) -> None:
        super().__init__()
        last = trunk.feature_info[-1]
        self.trunk = trunk
        self.pyramid = SimpleFeaturePyramid(last["num_chs"], last["reduction"], out_strides)
        self.out_channels = self.pyramid.out_channels
        self.strides = self.pyramid.strides

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        # The final norm is applied: it is the map the classifier was trained on ("feat" mode).
        (feature,) = self.trunk.forward_intermediates(
            x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
        )
        return _as_dict(self.pyramid(feature))


class HierViGFeatures(nn.Module):
    """ViG-H (built with `feature_norms=True`) -> its stage outputs `out_indices`, each through `outnorm{i}`."""

    def __init__(self, trunk: nn.Module, out_indices: Sequence[int] = (0, 1, 2, 3)) -> None:
        super().__init__()
        stages = len(trunk.feature_info)
        if not out_indices or any(not 0 <= i < stages for i in out_indices):
            raise ValueError(f"out_indices {list(out_indices)} must index the trunk's {stages} stages")
        if not getattr(trunk, "feature_norms", False):
            raise ValueError(
                "HierViGFeatures needs the trunk's per-stage output norms: create it with feature_norms=True"
            )
        self.trunk = trunk
        self.out_indices = list(out_indices)
        info = [trunk.feature_info[i] for i in self.out_indices]
        self.out_channels = [f["num_chs"] for f in info]
        self.strides = [f["reduction"] for f in info]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.trunk.forward_intermediates(
            x, indices=self.out_indices, norm=True, output_fmt="NCHW", intermediates_only=True
        )
        return _as_dict(features)


def create_dense_features(
    model_name: str,
    model_kwargs: dict[str, Any] | None = None,
    out_strides: Sequence[int] = (4, 8, 16, 32),
    out_indices: Sequence[int] = (0, 1, 2, 3),
    trunk_state_dict: dict[str, torch.Tensor] | None = None,
) -> PlainViGFeatures | HierViGFeatures:
    """The dense adapter for the timm model `model_name`: plain ViG -> pyramid at `out_strides`,
    ViG-H -> stages `out_indices`. `trunk_state_dict` holds classifier weights (pretrain or release)."""
    import vig.models  # noqa: F401  (registers the vig_* models with timm)

    kwargs = {**(model_kwargs or {}), "num_classes": 0}
    hierarchical = model_name.startswith("vig_h")
    if hierarchical:
        kwargs.setdefault("feature_norms", True)
    trunk = timm.create_model(model_name, pretrained=False, **kwargs)
    if trunk_state_dict is not None:
        load_trunk_state_dict(trunk, trunk_state_dict)
    if hierarchical:
        trunk.prune_intermediate_layers(out_indices, prune_norm=True, prune_head=True)
        return HierViGFeatures(trunk, out_indices)
    # Keeps the final norm (applied to the pyramid's input); nothing after the last block exists.
    trunk.prune_intermediate_layers(1, prune_norm=False, prune_head=True)
    return PlainViGFeatures(trunk, out_strides)


def load_trunk_state_dict(trunk: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load classifier weights into a head-less trunk. Only the dense-only output norms may be missing
    (they start from identity) and only classifier-head tensors may be left over."""
    result = trunk.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("outnorm")]
    if missing:
        raise ValueError(
            f"initial weights lack {len(missing)} trunk tensors (e.g. {missing[:3]}): the checkpoint was made "
            "for a different architecture than the model settings (model / model_kwargs) in params"
        )
    foreign = [k for k in result.unexpected_keys if not k.startswith(("head.", "classifier.head."))]
    if foreign:
        raise ValueError(f"initial weights hold tensors the trunk does not have: {foreign[:5]}")


def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Fully-qualified names of parameters that any submodule exempts via timm's `no_weight_decay()`."""
    names: set[str] = set()
    for prefix, sub in module.named_modules():
        hook = getattr(sub, "no_weight_decay", None)
        if callable(hook):
            names |= {f"{prefix}.{n}" if prefix else n for n in hook()}
    return names
