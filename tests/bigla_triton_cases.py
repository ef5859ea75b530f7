"""Cases for the Triton BiGLA kernels, checked against the naive recurrence (output and all five gradients).

Used by tests/test_bigla_triton.py: in-process on a CUDA GPU (compiled Triton), and on CPU as a script in
subprocesses with TRITON_INTERPRET=1 (the interpreter must be switched on before Triton kernels are
defined, so those checks cannot run in the pytest process itself):

    TRITON_INTERPRET=1 python tests/bigla_triton_cases.py --out results.json CASE [CASE ...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.bigla import naive_recurrent_bigla  # noqa: E402
from kernels.bigla.op import bigla_triton  # noqa: E402
from kernels.norm_mix import NormMixFunction, norm_mix_reference  # noqa: E402
from kernels.triton_utils import float32_matmul_precision  # noqa: E402

GRAD_NAMES = ("dq", "dk", "dv", "dg_fwd", "dg_bwd")
# Relative RMS error bound per input dtype; fp32 runs tf32x3 matmuls on the GPU (fp32-accurate) at torch's
# default float32 matmul precision, tf32 ones (10 mantissa bits, more than 16-bit inputs carry) when that allows
# tf32, which gets the 16-bit bound.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 5e-3, torch.float16: 5e-3}
TF32_TOLERANCE = 5e-3
ABS_FLOOR = 1e-6  # for gradients that are (nearly) zero, e.g. gate gradients at T = 1 or under steep gates


@dataclass(frozen=True)
class Case:
    B: int
    T: int
    H: int
    K: int
    V: int
    dtype: torch.dtype
    # "vig": logsigmoid(z)/16; "flat": log-gates near 0; "decaying": about -0.6 per token, the most the chunk
    # paths take (a chunk decays by about 20 forward, 10 backward); "steep": near -inf; "steep_fwd": g_fwd steep,
    # g_bwd as ViG's (one gate alone must send a segment to the sweeps); "mixed": steep, then flat
    gates: str
    strided: bool = False  # q, k, v, gates as slices of one fused projection (non-contiguous)
    fp32_matmul: str = "highest"  # torch.set_float32_matmul_precision while the kernels run
    cost: float = 1.0  # seconds under the interpreter, roughly; balances the subprocesses


# T in {1, 15, 64, 100, 196, 300}; K, V not only powers of two; several value blocks (V = 160);
# states recomputed in the chunk programs (T <= 256) and read from the state scan (T = 300, whose states
# are split into 16 x 16 tiles off a GPU: two key blocks, the second masked; T = 700: three segments, so
# the scan over segments carries a state through a middle one in both directions). The forward and backward
# take their chunk paths (FWD_CHUNK / BWD_CHUNK tokens) under the "vig", "flat" and "decaying" gates and their
# exact 16-token sweeps under "steep" and "steep_fwd" ones (a chunk decays by far more than CHUNK_DECAY_LIMIT);
# under "mixed" gates (T = 300) the first segment takes the sweeps and the second the chunk path in the same
# launch, so all are checked.
CASES = {
    "t1_fp32": Case(1, 1, 1, 16, 32, torch.float32, "vig", cost=0.5),
    "t15_bf16_k20_v40": Case(2, 15, 1, 20, 40, torch.bfloat16, "vig", cost=1.0),
    "t64_fp16_k24_v48_steep": Case(1, 64, 2, 24, 48, torch.float16, "steep", cost=3.0),
    "t64_bf16_strided": Case(1, 64, 2, 16, 32, torch.bfloat16, "vig", strided=True, cost=1.5),
    "t100_fp32_flat": Case(1, 100, 1, 16, 32, torch.float32, "flat", cost=2.0),
    "t100_fp32_steep_fwd": Case(1, 100, 1, 16, 32, torch.float32, "steep_fwd", cost=2.5),
    "t100_fp32_k48_v160": Case(1, 100, 1, 48, 160, torch.float32, "vig", cost=4.0),
    "t196_bf16_vig_shape": Case(1, 196, 2, 32, 64, torch.bfloat16, "vig", cost=6.5),
    "t196_bf16_decaying": Case(1, 196, 2, 32, 64, torch.bfloat16, "decaying", cost=6.5),
    "t196_fp32_tf32_decaying": Case(1, 196, 2, 32, 64, torch.float32, "decaying", fp32_matmul="high", cost=6.5),
    "t300_fp32_k24_mixed": Case(1, 300, 1, 24, 32, torch.float32, "mixed", cost=10.0),
    "t700_bf16_three_segments": Case(1, 700, 1, 16, 32, torch.bfloat16, "vig", cost=6.0),
}


# Checks beyond the BiGLA cases: the custom op's registration, torch.compile, the fused epilogue, and the
# benchmark's timing of another chunk.py beside ours.
EXTRA_CHECKS = ("opcheck", "compile", "norm_mix_fp32", "norm_mix_swish_bf16", "bench_against_copy")


def make_inputs(case: Case, device: str, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """q, k, v, g_fwd, g_bwd (leaf tensors requiring grad, in the case's dtype) and an output gradient."""
    gen = torch.Generator().manual_seed(seed)
    B, T, H, K, V = case.B, case.T, case.H, case.K, case.V

    def gates(kind: str) -> torch.Tensor:
        z = torch.randn(B, T, H, K, generator=gen)
        if kind == "vig":
            return F.logsigmoid(z) / 16
        if kind == "flat":
            return F.logsigmoid(z + 12.0) / 16  # about -4e-7: decay ~1, memory spans the whole sequence
        if kind == "decaying":
            return F.logsigmoid(z) * 0.75
        steep = F.logsigmoid(z - 4.0) * 12.0  # about -50 per token: everything beyond a neighbour vanishes
        if kind == "steep":
            return steep
        return torch.where(torch.arange(T)[None, :, None, None] < T // 2, steep, F.logsigmoid(z) / 16)

    q, k = (torch.randn(B, T, H, K, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    steep_fwd = case.gates == "steep_fwd"
    g_fwd, g_bwd = gates("steep" if steep_fwd else case.gates), gates("vig" if steep_fwd else case.gates)
    do = torch.randn(B, T, H, V, generator=gen).to(device=device, dtype=case.dtype)
    tensors = [q, k, v, g_fwd, g_bwd]
    if not case.strided:
        return [x.to(device=device, dtype=case.dtype).requires_grad_() for x in tensors], do
    # One [B, T, H * (4K + V)] buffer sliced like a fused projection's output: non-contiguous views.
    fused = torch.cat([x.reshape(B, T, -1) for x in tensors], dim=-1).to(device=device, dtype=case.dtype)
    views = torch.split(fused.requires_grad_(), [H * x.shape[-1] for x in tensors], dim=-1)
    return [view.unflatten(-1, (H, x.shape[-1])) for view, x in zip(views, tensors)], do


def _gradients(outputs: torch.Tensor, inputs: list[torch.Tensor], do: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(outputs, inputs, do))


def tolerance(case: Case) -> float:
    return TF32_TOLERANCE if case.dtype == torch.float32 and case.fp32_matmul != "highest" else TOLERANCE[case.dtype]


def relative_errors(case: Case, device: str) -> dict[str, float]:
    """Error of o and of each gradient, as ||ours - naive|| / (||naive|| + ABS_FLOOR / tol) in RMS terms."""
    inputs, do = make_inputs(case, device)
    with float32_matmul_precision(case.fp32_matmul):
        o = bigla_triton(*inputs, case.K**-0.5)  # eager: the autograd.Function (opcheck/compile cover the op)
        ours = [o, *_gradients(o, inputs, do)]
    ref_out = naive_recurrent_bigla(*inputs)
    refs = [ref_out, *_gradients(ref_out, inputs, do)]
    tol = tolerance(case)
    errors = {}
    for name, a, b in zip(("o", *GRAD_NAMES), ours, refs):
        if a.dtype != b.dtype or a.shape != b.shape:
            raise AssertionError(f"{name}: got {a.dtype} {tuple(a.shape)}, expected {b.dtype} {tuple(b.shape)}")
        if not torch.isfinite(a).all():
            raise AssertionError(f"{name} has non-finite values")
        err = (a.float() - b.float()).pow(2).mean().sqrt().item()
        base = b.float().pow(2).mean().sqrt().item()
        errors[name] = err / (base + ABS_FLOOR / tol)
    return errors


def check_opcheck(device: str) -> None:
    """torch.library.opcheck: fake impl, autograd registration, AOT dispatch all agree with the kernels, for one
    segment (no edge states: an empty second output) and for two."""
    for T in (8, 260):
        inputs, _ = make_inputs(Case(1, T, 1, 16, 32, torch.float32, "vig"), device)
        torch.library.opcheck(torch.ops.vig_kernels.bigla.default, (*inputs, 0.25))


def check_compile(device: str) -> float:
    """A function around the op compiles as one graph; forward and gradients equal eager. Returns the error."""
    case = Case(1, 20, 2, 16, 32, torch.float32, "vig")
    inputs, do = make_inputs(case, device)

    def block(q, k, v, g_fwd, g_bwd):  # compiled: the custom op; eager: the autograd.Function
        return bigla_triton(q * 2.0, k, v.relu(), g_fwd, g_bwd, 0.25).tanh()

    backend = "inductor" if device == "cuda" else "aot_eager"  # no C++ toolchain needed on CPU
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    eager = [block(*inputs), *_gradients(block(*inputs), inputs, do)]
    out = compiled(*inputs)
    got = [out, *_gradients(out, inputs, do)]
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(got, eager))


def check_norm_mix(device: str, dtype: torch.dtype, swish: bool) -> dict[str, float]:
    """The fused epilogue op against its PyTorch composition: output and the five gradients."""
    gen = torch.Generator().manual_seed(1)
    shape = (2, 7, 3, 48)  # a head width that is not a power of two; local as a transposed (strided) view
    o, gate = (torch.randn(shape, generator=gen) for _ in range(2))
    local = torch.randn(shape[0], shape[2] * shape[3], shape[1], generator=gen).transpose(1, 2).unflatten(-1, shape[2:])
    weights = [1 + 0.1 * torch.randn(shape[-1], generator=gen) for _ in range(2)]
    dy = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    inputs = [x.to(device=device, dtype=dtype).requires_grad_() for x in (o, local, gate)]
    inputs += [w.to(device).requires_grad_() for w in weights]
    tol = TOLERANCE[dtype]
    errors = {}
    y = NormMixFunction.apply(*inputs, 1e-6, swish)
    y_op = torch.ops.vig_kernels.norm_mix(*inputs, 1e-6, swish)
    assert torch.equal(y, y_op), "the custom op and the autograd.Function differ"
    ref = norm_mix_reference(*inputs, 1e-6, swish)
    outs = [y, *_gradients(y, inputs, dy)]
    refs = [ref, *_gradients(ref, inputs, dy)]
    for name, a, b in zip(("y", "do", "dlocal", "dgate", "do_weight", "dlocal_weight"), outs, refs):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {a.dtype} {a.shape} vs {b.dtype} {b.shape}"
        errors[name] = ((a.float() - b.float()).norm() / (b.float().norm() + ABS_FLOOR / tol)).item()
    return errors


def check_bench_against_copy(device: str) -> float:
    """`kernels.bench --against`: a copy of chunk.py, imported from its file, runs beside ours on the same
    inputs, each function once for its output and once per timer. Returns the copy's difference from ours."""
    from kernels import bench
    from kernels.bigla import chunk

    inputs, do = make_inputs(Case(1, 40, 2, 16, 32, torch.float32, "vig"), device)
    calls = []

    def fake_timer(fn) -> float:
        fn()
        calls.append(fn)
        return 1.0

    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "old_chunk.py")
        shutil.copyfile(chunk.__file__, copy)
        versions = {"ours": chunk, "copy": bench.load_chunk_version(copy)}
        timings = bench.time_versions(versions, [x.detach() for x in inputs], do, fake_timer, fake_timer)
    assert versions["copy"] is not chunk and versions["copy"].chunk_bigla_fwd is not chunk.chunk_bigla_fwd
    assert list(timings) == ["ours", "copy"] and len(calls) == 8, (list(timings), len(calls))
    assert timings["ours"].rel_diff == 0.0 and timings["copy"].bwd_kernels_ms == 1.0
    return timings["copy"].rel_diff


def run(names: list[str], device: str) -> dict[str, dict]:
    results = {}
    for name in names:
        start = time.perf_counter()
        try:
            if name == "opcheck":
                check_opcheck(device)
                results[name] = {"errors": {}}
            elif name.startswith("norm_mix"):
                dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
                errors = check_norm_mix(device, dtype, swish="swish" in name)
                results[name] = {"errors": errors, "tolerance": TOLERANCE[dtype]}
            elif name == "compile":
                results[name] = {"errors": {"max": check_compile(device)}, "tolerance": 1e-5}
            elif name == "bench_against_copy":  # the same code: equal up to the configs autotuning picks
                results[name] = {"errors": {"rel_diff": check_bench_against_copy(device)}, "tolerance": 1e-6}
            else:
                case = CASES[name]
                results[name] = {"errors": relative_errors(case, device), "tolerance": tolerance(case)}
        except Exception:  # reported per case by the pytest driver
            results[name] = {"failure": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - start
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the results (written atomically)")
    parser.add_argument("names", nargs="+", help=f"case names: {', '.join(CASES)}, {', '.join(EXTRA_CHECKS)}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = run(args.names, "cpu")
    directory = os.path.dirname(os.path.abspath(args.out))
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as f:
        json.dump(results, f)
    os.replace(f.name, args.out)


if __name__ == "__main__":
    main()
