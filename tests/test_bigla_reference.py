"""kernels/bigla/reference.py (chunked PyTorch BiGLA) against two oracles: the per-token recurrence
kernels.bigla.naive and flash-linear-attention's causal naive_recurrent_gla run forward and on the
flipped sequence."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from kernels.bigla.naive import naive_recurrent_bigla
from kernels.bigla.reference import chunked_bigla

with warnings.catch_warnings():  # fla warns on import that this machine has no GPU
    warnings.simplefilter("ignore")
    from fla.ops.gla.naive import naive_recurrent_gla

B, H, K, V = 2, 2, 24, 40  # head dims deliberately not powers of two


def log_gates(kind: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if kind == "vig":  # the released models' decays, logsigmoid(z) / 16
        return F.logsigmoid(3 * torch.randn(shape, generator=generator)) / 16
    if kind == "zero":  # no decay at all: plain linear attention
        return torch.zeros(shape)
    if kind == "near_zero":
        return torch.full(shape, F.logsigmoid(torch.tensor(30.0)).item() / 16)
    if kind == "strong":
        return torch.full(shape, F.logsigmoid(torch.tensor(-30.0)).item() / 16)
    if kind == "extreme":
        return torch.full(shape, -50.0)
    raise ValueError(kind)


def make_inputs(T: int, gates: str, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=generator) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=generator)
    g_fwd, g_bwd = (log_gates(gates, (B, T, H, K), generator) for _ in range(2))
    return [x.requires_grad_() for x in (q, k, v, g_fwd, g_bwd)]


def output_and_grads(fn, inputs, upstream):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, upstream)
    return out.detach(), grads


def assert_close(actual, expected, name):
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale.item(), msg=name)


@pytest.mark.parametrize("gates", ["vig", "zero", "near_zero", "strong", "extreme"])
@pytest.mark.parametrize("T", [1, 7, 15, 64, 100, 196])
def test_chunked_matches_the_recurrence_with_gradients(T, gates):
    inputs = make_inputs(T, gates)
    upstream = torch.randn(B, T, H, V, generator=torch.Generator().manual_seed(1))
    out, grads = output_and_grads(chunked_bigla, inputs, upstream)
    ref_out, ref_grads = output_and_grads(naive_recurrent_bigla, inputs, upstream)
    assert out.dtype == torch.float32 and out.shape == (B, T, H, V)
    assert_close(out, ref_out, "o")
    for name, grad, ref_grad in zip(("dq", "dk", "dv", "dg_fwd", "dg_bwd"), grads, ref_grads):
        assert torch.isfinite(grad).all(), name
        assert_close(grad, ref_grad, name)


@pytest.mark.parametrize("chunk", [4, 8, 32, 64])
def test_chunk_size_does_not_change_the_result(chunk):
    inputs = make_inputs(100, "vig", seed=2)
    torch.testing.assert_close(chunked_bigla(*inputs, chunk=chunk), chunked_bigla(*inputs), rtol=1e-4, atol=1e-4)


def fla_bidirectional(q, k, v, g_fwd, g_bwd):
    """½ (forward causal GLA + flipped causal GLA on the flipped sequence with the backward gates)."""
    forward, _ = naive_recurrent_gla(q, k, v, g_fwd)
    backward, _ = naive_recurrent_gla(*(x.flip(1) for x in (q, k, v, g_bwd)))
    return (forward + backward.flip(1)) / 2


@pytest.mark.parametrize("T, gates", [(7, "vig"), (100, "vig"), (64, "strong"), (15, "extreme")])
def test_chunked_matches_fla_naive_gla_in_both_directions(T, gates):
    inputs = make_inputs(T, gates, seed=3)
    upstream = torch.randn(B, T, H, V, generator=torch.Generator().manual_seed(4))
    out, grads = output_and_grads(chunked_bigla, inputs, upstream)
    ref_out, ref_grads = output_and_grads(fla_bidirectional, inputs, upstream)
    assert_close(out, ref_out, "o")
    for name, grad, ref_grad in zip(("dq", "dk", "dv", "dg_fwd", "dg_bwd"), grads, ref_grads):
        assert_close(grad, ref_grad, name)


def test_explicit_scale_and_low_precision_inputs():
    q, k, v, g_fwd, g_bwd = (x.detach() for x in make_inputs(33, "vig", seed=5))
    torch.testing.assert_close(
        chunked_bigla(q, k, v, g_fwd, g_bwd, scale=0.3), naive_recurrent_bigla(q, k, v, g_fwd, g_bwd, scale=0.3),
        rtol=1e-4, atol=1e-4,
    )
    out = chunked_bigla(q.bfloat16(), k.bfloat16(), v.bfloat16(), g_fwd, g_bwd)
    assert out.dtype == torch.bfloat16
    expected = naive_recurrent_bigla(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), g_fwd, g_bwd)
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
