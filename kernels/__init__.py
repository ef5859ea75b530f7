"""Kernels for ViG: the BiGLA operator and the token mixer's fused epilogue (Triton on CUDA, PyTorch elsewhere)."""
from kernels.bigla import bigla
from kernels.norm_mix import norm_mix

__all__ = ["bigla", "norm_mix"]
