"""What the plain (vig.py) and hierarchical (vig_h.py) ViG families share: timm's intermediate-feature loop,
the hustvl/ViG release's pretrained configs, and the model builder."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices

from vig.checkpoint import checkpoint_filter_fn

ModelT = TypeVar("ModelT", bound=nn.Module)


def take_intermediates(
    x: torch.Tensor,
    num_stages: int,
    run_stage: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    indices: int | Sequence[int] | None,
    stop_early: bool,
    output_fmt: str,
    feature_norm: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loop of timm's `forward_intermediates` over channels-last stages (a ViG block or a ViG-H stage).

    Args:
        x: input of stage 0 (the embedded tokens, [B, H, W, C]).
        run_stage: `(i, x) -> (feature map of stage i [B, H, W, C], input of stage i + 1)`.
        indices: stage indices (negative from the end), or an int n for the last n stages; None for all.
        stop_early: skip the stages after the last chosen one.
        output_fmt: "NCHW" (a permuted view of channels-last memory) or "NHWC".
        feature_norm: `(i, feature map) -> normed feature map`, applied to the chosen stages only.

    Returns:
        The output of the last stage run and the chosen feature maps in `output_fmt`.
    """
    if output_fmt not in ("NCHW", "NHWC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
    take_indices, max_index = feature_take_indices(num_stages, indices)
    intermediates = []
    for i in range(max_index + 1 if stop_early else num_stages):
        features, x = run_stage(i, x)
        if i in take_indices:
            if feature_norm is not None:
                features = feature_norm(i, features)
            intermediates.append(features.permute(0, 3, 1, 2) if output_fmt == "NCHW" else features)
    return x, intermediates


def release_cfg(release_file: str, **kwargs: Any) -> dict[str, Any]:
    """Pretrained config naming the official release file (huggingface.co/hustvl/ViG, unverified here)."""
    return {
        "url": f"https://huggingface.co/hustvl/ViG/resolve/main/{release_file}",
        "hf_hub_id": "hustvl/ViG",
        "hf_hub_filename": release_file,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "license": "apache-2.0",
        **kwargs,
    }


def create_model(
    model_cls: type[ModelT], variant: str, pretrained: bool, default_out_indices: int | tuple[int, ...], **kwargs: Any
) -> ModelT:
    """timm's build_model_with_cfg with release checkpoints mapped by `checkpoint_filter_fn` and getter features."""
    out_indices = kwargs.pop("out_indices", default_out_indices)
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )
