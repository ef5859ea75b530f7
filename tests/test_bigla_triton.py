"""Triton BiGLA kernels against the naive recurrence: output and all five gradients.

On a CUDA GPU the cases run in this process on compiled Triton. Without one they run under Triton's
interpreter, which must be switched on (TRITON_INTERPRET=1) before any kernel is defined, so they run in
two concurrent subprocesses (tests/bigla_triton_cases.py) and each case reports here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import triton

import bigla_triton_cases as cases
from kernels.bigla import bigla, chunked_bigla
from kernels.norm_mix import norm_mix, norm_mix_reference

ON_GPU = torch.cuda.is_available()
CHECKS = [*cases.CASES, *cases.EXTRA_CHECKS]
CHECK_COST = {**{name: case.cost for name, case in cases.CASES.items()}, "opcheck": 8.0, "compile": 2.0,
              "norm_mix_fp32": 0.5, "norm_mix_swish_bf16": 0.5, "bench_against_copy": 2.0}
INTERPRETER_WORKERS = 2
INTERPRETER_TIMEOUT_S = 600


def _split_by_cost(names: list[str], workers: int) -> list[list[str]]:
    groups: list[list[str]] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for name in sorted(names, key=CHECK_COST.__getitem__, reverse=True):
        lightest = loads.index(min(loads))
        groups[lightest].append(name)
        loads[lightest] += CHECK_COST[name]
    return [g for g in groups if g]


@pytest.fixture(scope="module")
def interpreted_results(tmp_path_factory) -> dict[str, dict]:
    """Every check run once under the Triton interpreter, the work shared by concurrent subprocesses."""
    if ON_GPU:
        return {}
    out_dir = tmp_path_factory.mktemp("bigla_interpreter")
    script = os.path.join(os.path.dirname(__file__), "bigla_triton_cases.py")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    jobs = []
    for i, group in enumerate(_split_by_cost(CHECKS, INTERPRETER_WORKERS)):
        out = out_dir / f"worker{i}.json"
        cmd = [sys.executable, script, "--out", str(out), *group]
        jobs.append((out, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    results: dict[str, dict] = {}
    for out, proc in jobs:
        log, _ = proc.communicate(timeout=INTERPRETER_TIMEOUT_S)
        if proc.returncode != 0:
            pytest.fail(f"interpreter worker failed ({proc.returncode}):\n{log}")
        results.update(json.loads(out.read_text()))
    return results


@pytest.mark.parametrize("check", CHECKS)
def test_triton_matches_naive_recurrence(check: str, interpreted_results: dict[str, dict]) -> None:
    result = cases.run([check], "cuda")[check] if ON_GPU else interpreted_results[check]
    assert "failure" not in result, result.get("failure")
    tolerance = result.get("tolerance")
    too_large = {name: err for name, err in result["errors"].items() if not err <= tolerance}
    assert not too_large, f"{check}: relative errors {too_large} exceed {tolerance} (all: {result['errors']})"


def _chunk_path_taken(case: cases.Case, chunk: int) -> torch.Tensor:
    """Per (batch, head, segment): whether a pass in `chunk`-token steps takes its chunk path for the case's
    gates (no chunk of the segment decays by more than CHUNK_DECAY_LIMIT in any key channel, either gate)
    rather than the 16-token sweeps."""
    from kernels.bigla.chunk import CHUNK_DECAY_LIMIT, SEGMENT

    _, _, _, g_fwd, g_bwd = cases.make_inputs(case, "cpu")[0]
    gates = torch.stack([g_fwd.detach().float(), g_bwd.detach().float()])  # [2, B, T, H, K]
    padded = torch.nn.functional.pad(gates, (0, 0, 0, 0, 0, -case.T % SEGMENT))
    chunk_decay = padded.unflatten(2, (-1, SEGMENT // chunk, chunk)).sum(4)  # [2, B, segments, chunks, H, K]
    return chunk_decay.amin(dim=(0, 3, 5)) >= -CHUNK_DECAY_LIMIT


def test_cases_cover_both_kernel_paths() -> None:
    """Mild gates run the chunk path in every program of both passes, steep and mixed ones the 16-token
    sweeps somewhere in each pass (the forward and the backward step over chunks of different lengths)."""
    from kernels.bigla.chunk import BWD_CHUNK, FWD_CHUNK

    for chunk, pass_name in ((FWD_CHUNK, "forward"), (BWD_CHUNK, "backward")):
        for name, case in cases.CASES.items():
            taken = _chunk_path_taken(case, chunk)
            if case.gates in ("vig", "flat", "decaying"):
                assert taken.all(), f"{name}: some {pass_name} programs fall back to the 16-token sweeps"
            else:
                assert not taken.all(), (f"{name}: every {pass_name} program takes the chunk path; "
                                         "its sweeps go untested")


def _inputs(device: str, dtype: torch.dtype = torch.float32, T: int = 37) -> list[torch.Tensor]:
    case = cases.Case(2, T, 3, 32, 64, dtype, "vig")
    return cases.make_inputs(case, device)[0]


def test_cpu_dispatch_is_the_pytorch_implementation() -> None:
    inputs = [x.detach() for x in _inputs("cpu")]
    torch.testing.assert_close(bigla(*inputs), chunked_bigla(*inputs))


def test_autocast_casts_q_k_v_and_keeps_gates() -> None:
    q, k, v, g_fwd, g_bwd = (x.detach() for x in _inputs("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = bigla(q, k, v, g_fwd, g_bwd)
    assert o.dtype == torch.bfloat16
    expected = chunked_bigla(q.bfloat16(), k.bfloat16(), v.bfloat16(), g_fwd, g_bwd)
    torch.testing.assert_close(o, expected)


def test_bad_inputs_are_named() -> None:
    q, k, v, g_fwd, g_bwd = (x.detach() for x in _inputs("cpu"))
    with pytest.raises(ValueError, match="g_bwd has shape"):
        bigla(q, k, v, g_fwd, g_bwd[:, :-1])
    with pytest.raises(ValueError, match="v has shape"):
        bigla(q, k, v[:, :-1], g_fwd, g_bwd)
    with pytest.raises(TypeError, match="k has dtype"):
        bigla(q, k.long(), v, g_fwd, g_bwd)


def test_autotune_search_space_and_its_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernels.bigla import chunk

    monkeypatch.setattr(chunk, "INTERPRET", False)
    monkeypatch.delenv("VIG_BIGLA_CONFIGS", raising=False)
    monkeypatch.setenv("VIG_BIGLA_AUTOTUNE", "1")

    def searched(**kwargs) -> list[tuple[int, int, int | None]]:
        return [(c.num_warps, c.num_stages, c.maxnreg) for c in chunk._autotune_configs(**kwargs)]

    assert searched(stages=(1, 3), warps=(2, 4), register_caps=(168, None)) == [
        (2, 1, 168), (2, 1, None), (2, 3, 168), (2, 3, None), (4, 1, 168), (4, 1, None), (4, 3, 168), (4, 3, None)]
    monkeypatch.setenv("VIG_BIGLA_AUTOTUNE", "0")  # the tests' setting: the first config, no search
    assert searched(stages=(1, 3)) == [(4, 1, None)]
    monkeypatch.setenv("VIG_BIGLA_AUTOTUNE", "1")
    monkeypatch.setenv("VIG_BIGLA_CONFIGS", "2:1:168,8:3")
    assert searched(stages=(2,)) == [(2, 1, 168), (8, 3, None)]
    monkeypatch.setenv("VIG_BIGLA_CONFIGS", "2:1,4")
    with pytest.raises(ValueError, match="entry '4': expected warps:stages"):
        chunk._autotune_configs(stages=(1,))


def test_autotuning_keys_tell_batch_sizes_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """A config tuned on a small launch must not serve a large one (the disk cache keeps it across processes):
    every autotuned kernel's key includes the launch's program count, which its other keys (T, head sizes,
    dtypes) do not see. The launches are recorded, not run."""
    from kernels.bigla import chunk

    launched = ("bigla_fwd_chunks_kernel", "bigla_fwd_sweeps_kernel", "bigla_bwd_chunks_kernel",
                "bigla_bwd_sweeps_kernel", "bigla_segment_states_kernel", "bigla_combine_states_kernel")
    tuning_keys: dict[tuple[str, int], set[tuple]] = {}  # (kernel, batch) -> its keys at that batch

    class RecordedLaunch:
        def __init__(self, name: str) -> None:
            self.name, self.kernel = name, getattr(chunk, name)

        def __getitem__(self, grid):
            def launch(*args, **kwargs) -> None:
                if isinstance(self.kernel, triton.runtime.Autotuner):
                    named = {**dict(zip(self.kernel.arg_names, args)), **kwargs}
                    keys = tuning_keys.setdefault((self.name, batch), set())
                    keys.add(tuple(named[key] for key in self.kernel.keys))
            return launch

    for name in launched:
        monkeypatch.setattr(chunk, name, RecordedLaunch(name))
    for batch in (1, 256):
        inputs = [x.detach() for x in cases.make_inputs(cases.Case(batch, 300, 3, 32, 64, torch.bfloat16, "vig"),
                                                        "cpu")[0]]
        _, edge_states = chunk.chunk_bigla_fwd(*inputs, 0.25)
        chunk.chunk_bigla_bwd(*inputs, torch.ones_like(inputs[2]), 0.25, edge_states)
    assert sorted(tuning_keys) == sorted((name, b) for name in launched[:5] for b in (1, 256))
    for name in launched[:5]:
        assert not tuning_keys[name, 1] & tuning_keys[name, 256], (name, tuning_keys[name, 1])


@pytest.mark.parametrize("T", [196, 300])
def test_backward_rejects_edge_states_of_other_inputs(T: int) -> None:
    """The backward takes the forward's segment-edge states (T > 256) and names the shape it expected when
    given others; the check comes before any launch, so it runs on the CPU."""
    from kernels.bigla import chunk

    inputs = [x.detach() for x in cases.make_inputs(cases.Case(2, T, 3, 32, 64, torch.float32, "vig"), "cpu")[0]]
    do = torch.ones_like(inputs[2])
    expected = chunk.edge_states_shape(inputs[0], inputs[2])
    assert expected == (None if T <= chunk.SEGMENT else (2, 6, 2, 32, 64))
    wrong = [torch.zeros(2, 6, 1, 32, 64), torch.zeros(2, 6, 2, 32, 64, dtype=torch.bfloat16)]
    for edge_states in ([None] if expected else []) + wrong:
        with pytest.raises(ValueError, match=r"expected (None|contiguous torch.float32 \(2, 6, 2, 32, 64\))"):
            chunk.chunk_bigla_bwd(*inputs, do, 0.25, edge_states)


def test_fp32_products_follow_torch_float32_matmul_precision() -> None:
    from kernels.bigla.chunk import matmul_precision
    from kernels.triton_utils import float32_matmul_precision

    before = torch.get_float32_matmul_precision()
    with float32_matmul_precision("highest"):
        assert [matmul_precision(d) for d in cases.TOLERANCE] == ["tf32x3", "tf32", "tf32"]
    for allowing_tf32 in ("high", "medium"):
        with float32_matmul_precision(allowing_tf32):
            assert matmul_precision(torch.float32) == "tf32"
    assert torch.get_float32_matmul_precision() == before


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_dispatch_runs_triton_under_autocast(dtype: torch.dtype) -> None:
    inputs = _inputs("cuda", torch.float32, T=196)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype != torch.float32), warnings.catch_warnings():
        warnings.filterwarnings("error", message="bigla:")  # no fallback warning: the Triton path runs
        o = bigla(*inputs)
    assert o.dtype == dtype
    expected = cases.naive_recurrent_bigla(*[x.to(dtype) for x in inputs[:3]], *inputs[3:])
    err = (o.float() - expected.float()).norm() / expected.float().norm()
    assert err <= cases.TOLERANCE[dtype], err
    o.float().square().sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in inputs)


def test_norm_mix_checks_shapes() -> None:
    x = torch.randn(2, 5, 3, 8)
    w = torch.ones(8)
    with pytest.raises(ValueError, match="must have one shape"):
        norm_mix(x, x[:, :4], x, w, w)
    with pytest.raises(ValueError, match="local_weight has shape"):
        norm_mix(x, x, x, w, torch.ones(4))
    torch.testing.assert_close(norm_mix(x, x, x, w, w, swish=True), norm_mix_reference(x, x, x, w, w, swish=True))
