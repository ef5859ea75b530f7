"""Loading the official hustvl/ViG checkpoints into our models.

Our parameter names are the release's, so loading needs no key mapping; what it does handle:
the release's wrapping (a bare state dict, or a training checkpoint holding `model` and `model_ema`),
the position embedding of plain ViG when the model's `img_size` differs from 224, and a classifier of
another size (fine-tuning). Anything else that does not match is an error that names the keys.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping

import timm
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

_logger = logging.getLogger(__name__)

# Modules the released classification checkpoints cannot contain: ViG-H's optional per-stage
# output norms (built with feature_norms=True) start from their fresh init.
_NEW_MODULE_KEYS = re.compile(r"^outnorm\d+\.")


def unwrap_state_dict(checkpoint: Mapping[str, object], use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The model weights of a release file: a bare state dict, or a training checkpoint with `model`
    (and, with EMA on, `model_ema`) entries."""
    key = "model_ema" if use_ema else "model"
    if key in checkpoint:
        return dict(checkpoint[key])
    if use_ema:
        raise KeyError(f"use_ema=True but the checkpoint has no 'model_ema' entry (it has {sorted(checkpoint)[:8]})")
    not_tensors = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"not a ViG checkpoint: expected a state dict or a dict with a 'model' entry, found non-tensor "
            f"entries {not_tensors[:8]}"
        )
    return dict(checkpoint)


def checkpoint_filter_fn(state_dict: Mapping[str, object], model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapt a release state dict to `model` (timm's pretrained_filter_fn): unwrap it and resize the
    position embedding to the model's grid (bicubic in float32, as the release does at run time)."""
    state_dict = unwrap_state_dict(state_dict)
    pos_embed = state_dict.get("pos_embed")
    if pos_embed is not None and hasattr(model, "pos_embed") and pos_embed.shape != model.pos_embed.shape:
        state_dict["pos_embed"] = resample_abs_pos_embed(
            pos_embed, new_size=model.pos_embed_grid, num_prefix_tokens=0, antialias=False
        )
    return state_dict


def load_official(
    path_or_state_dict: str | os.PathLike | Mapping[str, object],
    model_name: str,
    *,
    use_ema: bool = False,
    **model_kwargs: object,
) -> nn.Module:
    """Build `model_name` (a registered ViG name, e.g. "vig_tiny") with `model_kwargs` and load official weights.

    Args:
        path_or_state_dict: a release file (e.g. vig_t_77p2acc.pth), a training checkpoint of the official
            code, or an already loaded state dict / checkpoint dict.
        model_name: timm model name.
        use_ema: load the `model_ema` weights of a training checkpoint instead of `model`.
        model_kwargs: passed to timm.create_model (num_classes, img_size, drop_path_rate, ...). A
            `num_classes` other than the checkpoint's keeps the model's freshly initialised classifier.

    Raises:
        ValueError: keys missing from or unexpected in the checkpoint, or shapes that do not match,
            listing every offending key.
    """
    if isinstance(path_or_state_dict, Mapping):
        checkpoint = path_or_state_dict
    else:
        try:
            checkpoint = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"{path_or_state_dict} holds more than tensors (e.g. a training checkpoint with its config), so it "
                "is not loaded with weights_only=True. If you trust the file, load it yourself with "
                "torch.load(path, weights_only=False) and pass the result."
            ) from error
    model = timm.create_model(model_name, **model_kwargs)
    state_dict = checkpoint_filter_fn(unwrap_state_dict(checkpoint, use_ema), model)
    expected = model.state_dict()

    fresh = {k for k in expected if _NEW_MODULE_KEYS.match(k)}
    classifier = model.pretrained_cfg["classifier"]
    head_weight = state_dict.get(f"{classifier}.weight")
    if head_weight is not None and head_weight.shape[0] != model.num_classes:
        _logger.info(
            "checkpoint classifier has %d classes, model has %d: keeping the model's new classifier",
            head_weight.shape[0],
            model.num_classes,
        )
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(f"{classifier}.")}
        fresh |= {k for k in expected if k.startswith(f"{classifier}.")}

    missing = sorted(set(expected) - set(state_dict) - fresh)
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            f"checkpoint does not fit {model_name}:\n"
            f"  missing keys ({len(missing)}): {missing}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected}\n"
            f"  shape mismatches ({len(mismatched)}): {mismatched}\n"
            "Check that model_name matches the checkpoint (e.g. vig_t_77p2acc.pth is vig_tiny)."
        )
    model.load_state_dict(state_dict, strict=False)
    return model
