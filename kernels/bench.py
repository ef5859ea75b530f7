"""Benchmark of the BiGLA operator on an NVIDIA GPU, with flash-linear-attention's GLA kernels as baselines.

    python -m kernels.bench --out bench.json

For each (B, T) in (256, 196), (64, 1024), (16, 4096), each ViG head shape (T/S/B: H = 3/6/12 heads,
K = 32, V = 64 per head) and dtype (fp32, bf16, and "tf32": fp32 inputs with tf32 products allowed), it
times (median ms per call, triton.testing.do_bench) the forward alone and forward + backward of
- ours: kernels.bigla (Triton, both directions in one op);
- fla chunk_gla on stacked directions: q/k/v and their flipped copies as a 2B batch, as the released ViG
  code does (the concatenations and flips are part of the call);
- fla fused_recurrent_gla, once forward and once reverse.
Beside them it prints our speed-up and the memory-traffic floor: the bytes the operator must move (each
input read once, each output written once) over the device-to-device copy bandwidth measured here.
Outputs of ours and of fla's chunk kernel are compared, as a sanity check of equal semantics. do_bench
times calls from the host, so launch work that the GPU outruns counts; the device columns add up the GPU
time of the kernels each call launches (torch.profiler), what a CUDA graph or a compiled model would pay.

For kernel work, `--against old.py [...]` also times other versions of kernels/bigla/chunk.py (e.g.
`git show REV:kernels/bigla/chunk.py > old.py`) beside this checkout's, on the same inputs in the same
process: chunk_bigla_fwd and chunk_bigla_bwd from the host and their kernels' device time, and how far
their outputs and gradients are from ours. A version whose forward keeps the segment-edge states for its
backward gets them; compare such versions with older ones by forward + backward.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import ModuleType

import torch
import torch.nn.functional as F

from kernels.bigla import bigla, chunk
from kernels.norm_mix import norm_mix, norm_mix_reference
from kernels.triton_utils import float32_matmul_precision

SHAPES = ((256, 196), (64, 1024), (16, 4096))
MODEL_HEADS = {"ViG-T": 3, "ViG-S": 6, "ViG-B": 12}
KEY_DIM, VALUE_DIM = 32, 64
# --dtypes: the inputs' dtype and torch's float32 matmul precision while timing. "tf32" is fp32 inputs with tf32
# allowed (torch.set_float32_matmul_precision("high")): our fp32 products then run tf32, the precision fla's
# kernels run fp32 at under any setting; under "fp32" (torch's default, "highest") ours run tf32x3.
DTYPES = {"fp32": (torch.float32, "highest"), "tf32": (torch.float32, "high"), "bf16": (torch.bfloat16, "highest")}


@dataclass
class Row:
    B: int
    T: int
    model: str
    H: int
    dtype: str
    ours_fwd_ms: float
    ours_fwdbwd_ms: float
    fla_chunk_fwd_ms: float | None
    fla_chunk_fwdbwd_ms: float | None
    ours_device_fwd_ms: float  # GPU time of the kernels per call (no host launch work)
    ours_device_fwdbwd_ms: float
    fla_chunk_device_fwd_ms: float | None
    fla_chunk_device_fwdbwd_ms: float | None
    fla_recurrent_fwd_ms: float | None
    fla_recurrent_fwdbwd_ms: float | None
    floor_fwd_ms: float
    floor_fwdbwd_ms: float
    rel_diff_vs_fla_chunk: float | None
    ours_first_call_s: float
    ours_kernel_ms: dict[str, float]
    ours_configs: dict[str, str]
    versions: dict[str, dict] = field(default_factory=dict)  # --against: VersionTiming per chunk.py


@dataclass
class VersionTiming:
    """One version of kernels/bigla/chunk.py on the row's inputs: its raw forward and backward (no autograd)."""

    source: str
    fwd_ms: float  # chunk_bigla_fwd timed from the host (launches and allocations included)
    bwd_ms: float  # chunk_bigla_bwd, the same way
    fwd_kernels_ms: float  # device time of the kernels chunk_bigla_fwd launches
    bwd_kernels_ms: float
    rel_diff: float  # largest ||this - first version|| / ||first version|| over o and the five gradients


def _time_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(2**28, dtype=torch.float32, device=device).uniform_()  # 1 GiB
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / (_time_ms(lambda: dst.copy_(src)) * 1e-3)


def fla_chunk_stacked(q, k, v, g_fwd, g_bwd):
    """The released ViG training path: both directions as one causal GLA over a 2B batch of flipped copies."""
    from fla.ops.gla import chunk_gla

    o, _ = chunk_gla(torch.cat([q, q.flip(1)]), torch.cat([k, k.flip(1)]), torch.cat([v, v.flip(1)]),
                     torch.cat([g_fwd, g_bwd.flip(1)]), scale=q.shape[-1] ** -0.5)
    o_fwd, o_bwd = o.chunk(2)
    return (o_fwd + o_bwd.flip(1)) / 2


def fla_recurrent(q, k, v, g_fwd, g_bwd):
    from fla.ops.gla import fused_recurrent_gla

    o_fwd, _ = fused_recurrent_gla(q, k, v, g_fwd, scale=q.shape[-1] ** -0.5)
    o_bwd, _ = fused_recurrent_gla(q, k, v, g_bwd, scale=q.shape[-1] ** -0.5, reverse=True)
    return (o_fwd + o_bwd) / 2


def _inputs(B: int, T: int, H: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    q, k = (torch.randn(B, T, H, KEY_DIM, device=device, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, VALUE_DIM, device=device, dtype=dtype)
    g_fwd, g_bwd = (F.logsigmoid(torch.randn(B, T, H, KEY_DIM, device=device)).div(16).to(dtype) for _ in range(2))
    return [q, k, v, g_fwd, g_bwd]


def kernel_times(fn, calls: int = 5) -> dict[str, float]:
    """Device time per call of each GPU kernel fn launches (ms), from the PyTorch profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = {e.key: e.device_time_total / calls / 1e3 for e in prof.key_averages() if e.device_time_total > 0}
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def load_chunk_version(path: str) -> ModuleType:
    """A copy of kernels/bigla/chunk.py from another revision, imported from its file."""
    module_name = "bigla_chunk_version_" + "".join(c if c.isalnum() else "_" for c in os.path.abspath(path))
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None or not os.path.isfile(path):
        raise SystemExit(f"--against {path}: no such Python file; write one with "
                         "`git show REV:kernels/bigla/chunk.py > old.py`")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = [name for name in ("chunk_bigla_fwd", "chunk_bigla_bwd") if not hasattr(module, name)]
    if missing:
        raise SystemExit(f"--against {path}: defines no {' or '.join(missing)}; pass a copy of "
                         "kernels/bigla/chunk.py")
    return module


def _device_ms(fn: Callable[[], object]) -> float:
    return sum(kernel_times(fn).values())


def time_versions(versions: dict[str, ModuleType], inputs: list[torch.Tensor], do: torch.Tensor,
                  host_ms: Callable[[Callable[[], object]], float] = _time_ms,
                  device_ms: Callable[[Callable[[], object]], float] = _device_ms) -> dict[str, VersionTiming]:
    """Each version's chunk_bigla_fwd and chunk_bigla_bwd on the same inputs; differences are taken against
    the first version."""
    scale = inputs[0].shape[-1] ** -0.5
    timings, first = {}, None
    for source, module in versions.items():
        def fwd(module=module):
            return module.chunk_bigla_fwd(*inputs, scale)

        out = fwd()
        # Versions since v16 return (o, edge_states) and take the edge states back; older ones recompute them.
        o, *saved = out if isinstance(out, tuple) else (out,)

        def bwd(module=module, saved=saved):
            return module.chunk_bigla_bwd(*inputs, do, scale, *saved)

        outputs = [x.float() for x in (o, *bwd())]
        first = outputs if first is None else first
        rel_diff = max(((a - b).norm() / b.norm()).item() for a, b in zip(outputs, first))
        timings[source] = VersionTiming(source, host_ms(fwd), host_ms(bwd), device_ms(fwd), device_ms(bwd),
                                        rel_diff)
    return timings


def print_versions(timings: dict[str, VersionTiming]) -> None:
    """One line per version; the times over the first version's (above 1: the first is faster)."""
    first = next(iter(timings.values()))
    for t in timings.values():
        print(f"    {t.source}: fwd {t.fwd_ms:.4f} ms ({t.fwd_ms / first.fwd_ms:.2f}x), "
              f"bwd {t.bwd_ms:.4f} ms ({t.bwd_ms / first.bwd_ms:.2f}x); kernels fwd {t.fwd_kernels_ms:.4f} "
              f"({t.fwd_kernels_ms / first.fwd_kernels_ms:.2f}x), bwd {t.bwd_kernels_ms:.4f} "
              f"({t.bwd_kernels_ms / first.bwd_kernels_ms:.2f}x); rel diff {t.rel_diff:.1e}", flush=True)


def _fwd_and_fwdbwd(fn, inputs: list[torch.Tensor], do: torch.Tensor,
                    timer: Callable[[Callable[[], object]], float] = _time_ms) -> tuple[float, float]:
    start = time.perf_counter()
    with torch.no_grad():
        fwd = timer(lambda: fn(*inputs))
    leaves = [x.detach().requires_grad_() for x in inputs]
    fwdbwd = timer(lambda: torch.autograd.grad(fn(*leaves), leaves, do))
    kind = "host-timed" if timer is _time_ms else "device"
    print(f"    {fn.__name__} ({kind}): fwd {fwd:.4f} ms, fwd+bwd {fwdbwd:.4f} ms "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    return fwd, fwdbwd


def bench_row(B: int, T: int, model: str, dtype_name: str, bandwidth: float, baselines: bool, recurrent: bool,
              device: torch.device, against: dict[str, ModuleType] | None = None) -> Row:
    H, dtype = MODEL_HEADS[model], DTYPES[dtype_name][0]
    inputs = _inputs(B, T, H, dtype, device)
    do = torch.randn(B, T, H, VALUE_DIM, device=device, dtype=dtype)
    start = time.perf_counter()  # the first calls compile (and autotune) the kernels
    leaves = [x.detach().requires_grad_() for x in inputs]
    torch.autograd.grad(bigla(*leaves), leaves, do)
    with torch.no_grad():
        ours = bigla(*inputs).float()
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - start
    rel_diff = None
    if baselines:
        with torch.no_grad():
            ref = fla_chunk_stacked(*inputs).float()
        rel_diff = ((ours - ref).norm() / ref.norm()).item()
    leaves = [x.detach().requires_grad_() for x in inputs]
    kernels_ms = kernel_times(lambda: torch.autograd.grad(bigla(*leaves), leaves, do))
    ours_fwd, ours_fwdbwd = _fwd_and_fwdbwd(bigla, inputs, do)
    ours_device = _fwd_and_fwdbwd(bigla, inputs, do, _device_ms)
    chunk_fwd, chunk_fwdbwd = _fwd_and_fwdbwd(fla_chunk_stacked, inputs, do) if baselines else (None, None)
    chunk_device = _fwd_and_fwdbwd(fla_chunk_stacked, inputs, do, _device_ms) if baselines else (None, None)
    rec_fwd, rec_fwdbwd = _fwd_and_fwdbwd(fla_recurrent, inputs, do) if baselines and recurrent else (None, None)
    n, size = B * T * H, dtype.itemsize
    fwd_bytes = n * (4 * KEY_DIM + 2 * VALUE_DIM) * size  # q, k, g_fwd, g_bwd, v in; o out
    bwd_bytes = n * (4 * KEY_DIM + 2 * VALUE_DIM) * size + n * (4 * KEY_DIM + VALUE_DIM) * size  # + do in; grads out
    versions = {}
    if against:
        timings = time_versions({"this checkout": chunk, **against}, inputs, do)
        print_versions(timings)
        versions = {source: asdict(t) for source, t in timings.items()}
    return Row(B, T, model, H, dtype_name, ours_fwd, ours_fwdbwd, chunk_fwd, chunk_fwdbwd, *ours_device,
               *chunk_device, rec_fwd, rec_fwdbwd,
               fwd_bytes / bandwidth * 1e3, (fwd_bytes + bwd_bytes) / bandwidth * 1e3, rel_diff, first_call_s,
               kernels_ms, _chosen_configs(), versions)


def _chosen_configs() -> dict[str, str]:
    """The config each of our autotuned kernels picked for its latest key."""
    kernels = (chunk.bigla_fwd_chunks_kernel, chunk.bigla_fwd_sweeps_kernel, chunk.bigla_bwd_chunks_kernel,
               chunk.bigla_bwd_sweeps_kernel, chunk.bigla_segment_states_kernel)
    return {k.fn.__name__: str(k.best_config) for k in kernels if getattr(k, "best_config", None) is not None}


def bench_norm_mix(device: torch.device) -> dict[str, float]:
    """The fused epilogue against its PyTorch composition at ViG-T, 224^2, batch 256, bf16 (ms)."""
    shape = (256, 196, 3, VALUE_DIM)
    xs = [torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(3)]
    ws = [torch.ones(VALUE_DIM, device=device) for _ in range(2)]
    dy = torch.randn(shape, device=device, dtype=torch.bfloat16)
    result = {}
    for name, fn in (("fused", norm_mix), ("pytorch", norm_mix_reference)):
        run = lambda *a, fn=fn: fn(*a, swish=True)  # noqa: E731
        result[f"{name}_fwd_ms"], result[f"{name}_fwdbwd_ms"] = _fwd_and_fwdbwd(run, xs + ws, dy)
    return result


def warm_up(dtypes: list[str], device: torch.device) -> None:
    """Compile (and autotune, on tiny shapes) every kernel the benchmark runs, one or two segments long.

    Run it with FLA_CACHE_RESULTS=0 VIG_BIGLA_AUTOTUNE_CACHE=0 (e.g. beside other GPU work): the compiled
    kernels land in Triton's cache for the timed run, which then autotunes on its own shapes quickly.
    """
    for dtype_name in dtypes:
        dtype, precision = DTYPES[dtype_name]
        for T in (196, 600):
            inputs = [x.requires_grad_() for x in _inputs(2, T, 3, dtype, device)]
            with float32_matmul_precision(precision):
                for fn in (bigla, fla_chunk_stacked, fla_recurrent):
                    torch.autograd.grad(fn(*inputs), inputs, torch.randn_like(inputs[2]))
        print(f"warm-up {dtype_name} done", flush=True)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _ratio(baseline: float | None, ours: float) -> str:
    return "-" if baseline is None else f"{baseline / ours:.2f}"


TABLE_HEADER = ("B", "T", "model", "dtype", "ours fwd", "ours f+b", "chunk fwd", "chunk f+b", "rec fwd", "rec f+b",
                "x chunk fwd", "x chunk f+b", "device: ours fwd", "ours f+b", "chunk fwd", "chunk f+b",
                "x chunk fwd", "x chunk f+b", "floor fwd", "floor f+b", "diff", "compile s")


def print_table(rows: list[Row]) -> None:
    for r in rows:
        print(" | ".join([str(r.B), str(r.T), r.model, r.dtype, _fmt(r.ours_fwd_ms), _fmt(r.ours_fwdbwd_ms),
                          _fmt(r.fla_chunk_fwd_ms), _fmt(r.fla_chunk_fwdbwd_ms), _fmt(r.fla_recurrent_fwd_ms),
                          _fmt(r.fla_recurrent_fwdbwd_ms), _ratio(r.fla_chunk_fwd_ms, r.ours_fwd_ms),
                          _ratio(r.fla_chunk_fwdbwd_ms, r.ours_fwdbwd_ms), _fmt(r.ours_device_fwd_ms),
                          _fmt(r.ours_device_fwdbwd_ms), _fmt(r.fla_chunk_device_fwd_ms),
                          _fmt(r.fla_chunk_device_fwdbwd_ms), _ratio(r.fla_chunk_device_fwd_ms, r.ours_device_fwd_ms),
                          _ratio(r.fla_chunk_device_fwdbwd_ms, r.ours_device_fwdbwd_ms), _fmt(r.floor_fwd_ms),
                          _fmt(r.floor_fwdbwd_ms), "-" if r.rel_diff_vs_fla_chunk is None else
                          f"{r.rel_diff_vs_fla_chunk:.1e}", f"{r.ours_first_call_s:.0f}"]),
              flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="BiGLA kernel benchmark (needs an NVIDIA GPU and fla).")
    parser.add_argument("--out", required=True, help="JSON file for the results (written atomically)")
    parser.add_argument("--models", nargs="+", default=list(MODEL_HEADS), choices=list(MODEL_HEADS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--shapes", nargs="+", default=[f"{b}x{t}" for b, t in SHAPES],
                        help="B x T pairs, e.g. 256x196")
    parser.add_argument("--no-baselines", action="store_true", help="time ours only (no fla needed)")
    parser.add_argument("--no-recurrent", action="store_true", help="skip the (slow) fused_recurrent baseline")
    parser.add_argument("--no-epilogue", action="store_true", help="skip the norm_mix epilogue timing")
    parser.add_argument("--warm-up", action="store_true", help="only compile every kernel (see warm_up)")
    parser.add_argument("--against", nargs="+", default=[], metavar="CHUNK_PY",
                        help="other versions of kernels/bigla/chunk.py, timed beside this checkout's")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernels.bench needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    device = torch.device("cuda")
    against = {path: load_chunk_version(path) for path in args.against}
    if args.warm_up:
        return warm_up(args.dtypes, device)
    bandwidth = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name(device)}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    report = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "copy_bandwidth_bytes_per_s": bandwidth, "rows": []}
    rows = []
    if not args.no_epilogue:
        report["norm_mix"] = bench_norm_mix(device)
        print("norm_mix epilogue, B256 T196 H3 dv64 bf16, swish (ms):", report["norm_mix"], flush=True)
    for shape in args.shapes:
        B, T = (int(x) for x in shape.split("x"))
        for model in args.models:
            for dtype_name in args.dtypes:
                print(f"B{B} T{T} {model} {dtype_name}:", flush=True)
                with float32_matmul_precision(DTYPES[dtype_name][1]):
                    rows.append(bench_row(B, T, model, dtype_name, bandwidth, not args.no_baselines,
                                          not args.no_recurrent, device, against))
                print("    our kernels, fwd+bwd (ms/call):",
                      {k[:40]: round(v, 4) for k, v in rows[-1].ours_kernel_ms.items()}, rows[-1].ours_configs,
                      flush=True)
                report["rows"].append(asdict(rows[-1]))
                _write_json(report, args.out)  # after every row: a cut-off run keeps what it measured
                torch.cuda.empty_cache()
    print("\nall rows (ms; x chunk = fla chunk time / ours; host-timed, then device time of the kernels):")
    print(" | ".join(TABLE_HEADER))
    print_table(rows)
    _write_json(report, args.out)


def _write_json(report: dict, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as f:
        json.dump(report, f, indent=1)
    os.replace(f.name, path)


if __name__ == "__main__":
    main()
