"""Parameters and FLOPs of the ViG models.

FLOPs here follow the convention of the ViG paper and of fvcore: one multiply-accumulate counts as one
FLOP, and only matmul-like ops (linear, conv, BiGLA) are counted, not element-wise ones.

`python -m vig.flops` prints parameters and GFLOPs at 224x224 for the six released architectures.
"""
from __future__ import annotations

import argparse

import timm
import torch
import torch.nn as nn
from timm.layers import to_2tuple
from torch.utils.flop_counter import FlopCounterMode

import vig.models  # noqa: F401  (registers the models)
from vig.layers import GatedLinearAttention

MODEL_NAMES = ("vig_tiny", "vig_small", "vig_base", "vig_h_tiny", "vig_h_small", "vig_h_base")


def bigla_flops(tokens: int, heads: int, key_dim: int, value_dim: int) -> int:
    """FLOPs of one BiGLA call per image: 2 directions x tokens x heads x 2 * dk * dv.

    Per token, head and direction the recurrent form costs dk * dv multiply-accumulates for the state
    update k_tᵀ v_t and dk * dv for the read-out q_t S_t (dk = key_dim / heads, dv = value_dim / heads).
    The element-wise decay of the state is not counted, like every element-wise op.
    """
    return 2 * tokens * heads * 2 * (key_dim // heads) * (value_dim // heads)


def gflops(model: nn.Module | str, img_size: int | tuple[int, int] = 224, in_chans: int = 3) -> float:
    """GFLOPs of one forward pass of one image (see module docstring for the convention).

    Linear and conv layers are counted by torch.utils.flop_counter (which counts 2 FLOPs per
    multiply-accumulate; halved here). BiGLA is counted with `bigla_flops` in place of whatever the
    implementation that happens to run (the chunked PyTorch one on CPU) computes.
    """
    if isinstance(model, str):
        model = timm.create_model(model)
    mixers = {name: m for name, m in model.named_modules() if isinstance(m, GatedLinearAttention)}
    token_grids: dict[str, tuple[int, int]] = {}
    handles = [
        m.register_forward_hook(lambda m, args, out, name=name: token_grids.__setitem__(name, args[0].shape[1:3]))
        for name, m in mixers.items()
    ]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_chans, *to_2tuple(img_size), device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    total = counts.get("Global", 0) // 2
    for name, mixer in mixers.items():
        children = sum(counts.get(f"{root}.{name}.{child}", 0) for child, _ in mixer.named_children())
        counted_bigla = (counts.get(f"{root}.{name}", 0) - children) // 2
        h, w = token_grids[name]
        total += bigla_flops(h * w, mixer.num_heads, mixer.key_dim, mixer.o_proj.in_features) - counted_bigla
    return total / 1e9


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Parameters and GFLOPs of the ViG models.")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), metavar="NAME")
    args = parser.parse_args(argv)
    print(f"{'model':<12} {'params':>12} {'GFLOPs@' + str(args.img_size):>12}")
    for name in args.models:
        model = timm.create_model(name)
        print(f"{name:<12} {num_params(model):>12,} {gflops(model, args.img_size):>12.2f}")


if __name__ == "__main__":
    main()
