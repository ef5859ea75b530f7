"""Kernels for ViG: the BiGLA operator (Triton on CUDA, PyTorch elsewhere)."""
from kernels.bigla import bigla

__all__ = ["bigla"]
