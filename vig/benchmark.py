"""Speed and memory benchmark of ViG against timm's DeiT, following the paper's throughput protocol.

Protocol (docs: BENCHMARK.md): eval mode, no gradients, one random batch on the device, `warmup`
untimed passes, then `iters` passes timed between synchronisations (CUDA events on GPU);
images/s = iters·batch / seconds. Each cell (model, mode, dtype, resolution, batch) is measured in
fp32 or under autocast (fp16 / bf16), with the peak allocated memory of the timed passes (weights and
input included, warm-up transients such as autotuning left out). Training cells time a bf16-autocast
forward + backward + AdamW step. Baselines (DeiT-T/S/B with PyTorch's fused attention and with plain
attention) run in the same process, so every ratio compares numbers of one run on one device. Each model can
also run compiled (`torch.compile`, label suffix '_compiled'); a compiled model of ours is compared with the
baselines both compiled and eager. A cell that runs out of device memory is recorded as skipped.

This module needs only torch and timm (plus matplotlib for plots): it is the `vig-bench` CLI and
runs on machines without the pipeline's tracking stack. `stages.benchmark` adds params.yaml and MLflow.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import importlib.metadata
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import timm
import timm.layers
import torch
import torch.nn as nn

from vig.atomic import atomic_path, write_bytes, write_json

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
ATTENTION_MODES = ("fused", "plain")
EXECUTIONS = ("eager", "compiled")
COMPILED_SUFFIX = "_compiled"
CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
GRAPH_POOL_NOTE = "not measured: CUDA graphs take their memory pool at capture, during the warm-up passes"
OUT_OF_MEMORY = "out of memory"
# The paper's protocol and the sweep of BENCHMARK.md (resolution -> batch).
PROTOCOL_EVAL_CASES = ((224, 256), (512, 64), (1024, 16), (2048, 4))
PROTOCOL_TRAIN_CASES = ((224, 128), (1024, 8))
DEIT_BASELINES = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")
# The reduced sweep `vig-bench` falls back to on a CPU (the stage takes its own from params.yaml).
CPU_EVAL_CASES = ((224, 2), (384, 1))
CPU_TRAIN_CASES = ((224, 2),)
FULL_JSON = "benchmark_full.json"
METRICS_JSON = "benchmark.json"
PLOT_CSV = "benchmark_plot.csv"
PLOT_COLUMNS = ("label", "role", "attention", "mode", "dtype", "resolution", "batch", "images_per_s",
                "peak_memory_gib", "status")  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    """One model to measure: ours (a timm name registered by `import vig`, or a checkpoint) or a baseline."""

    name: str
    label: str
    role: str = "ours"  # "ours" | "baseline"
    attention: str | None = None  # baselines: "fused" (torch SDPA) or "plain" (softmax(QK^T)V)
    execution: str = "eager"  # "eager" or "compiled" (torch.compile)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class BenchmarkConfig:
    models: tuple[ModelSpec, ...]
    dtypes: tuple[str, ...] = ("fp32", "fp16", "bf16")
    eval_cases: tuple[tuple[int, int], ...] = PROTOCOL_EVAL_CASES
    warmup: int = 50
    iters: int = 30
    train_cases: tuple[tuple[int, int], ...] = PROTOCOL_TRAIN_CASES
    train_dtype: str = "bf16"
    train_warmup: int = 10
    train_iters: int = 20
    max_seconds: float | None = None  # per-cell time cap; passes actually run are recorded per cell
    device: str = "cuda"
    threads: int | None = None  # torch CPU threads (None: torch's default)
    compile_mode: str = "default"  # torch.compile mode of the compiled models


    def __post_init__(self) -> None:
        for dtype in (*self.dtypes, self.train_dtype):
            if dtype not in DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(DTYPES)}")
        labels = [spec.label for spec in self.models]
        if len(set(labels)) != len(labels):
            raise ValueError(f"model labels must be unique, got {labels}")
        for spec in self.models:
            if spec.role == "baseline" and spec.attention not in ATTENTION_MODES:
                raise ValueError(f"baseline {spec.label}: attention must be one of {ATTENTION_MODES}")
            if spec.execution not in EXECUTIONS:
                raise ValueError(f"{spec.label}: execution must be one of {EXECUTIONS}, got {spec.execution!r}")
        if min(self.warmup, self.train_warmup) < 1 or min(self.iters, self.train_iters) < 1:
            raise ValueError("warmup and iters must be >= 1 (the first pass compiles and autotunes kernels)")


def baseline_specs(names: Sequence[str], attention: Sequence[str] = ATTENTION_MODES) -> list[ModelSpec]:
    """Each baseline once per attention mode, labelled e.g. 'deit_tiny_fused'."""
    for mode in attention:
        if mode not in ATTENTION_MODES:
            raise ValueError(f"unknown attention mode {mode!r}: use {ATTENTION_MODES}")
    return [
        ModelSpec(name=name, label=f"{short_name(name)}_{mode}", role="baseline", attention=mode)
        for name in names
        for mode in attention
    ]


def with_executions(specs: Sequence[ModelSpec], executions: Sequence[str]) -> list[ModelSpec]:
    """Each model once per execution; compiled ones labelled e.g. 'vig_tiny_compiled'."""
    for execution in executions:
        if execution not in EXECUTIONS:
            raise ValueError(f"unknown execution {execution!r}: use {EXECUTIONS}")
    return [
        replace(spec, execution=execution, label=spec.label + (COMPILED_SUFFIX if execution == "compiled" else ""))
        for spec in specs
        for execution in executions
    ]


def short_name(timm_name: str) -> str:
    """'deit_tiny_patch16_224' -> 'deit_tiny' (the patch/resolution suffix says nothing at other resolutions)."""
    return re.sub(r"_patch\d+_\d+$", "", timm_name)


@contextlib.contextmanager
def fused_attention(enabled: bool) -> Iterator[None]:
    """timm attention layers read the fused-attention flag when built: build models inside this block."""
    previous, experimental = timm.layers.use_fused_attn(), timm.layers.use_fused_attn(experimental=True)
    timm.layers.set_fused_attn(enabled)
    try:
        yield
    finally:
        timm.layers.set_fused_attn(previous, experimental=experimental)


def build_model(spec: ModelSpec, resolution: int) -> nn.Module:
    """The model at `resolution` (position embeddings sized for it), random weights unless the spec has some."""
    import vig  # noqa: F401  (registers the ViG models with timm)
    from vig.checkpoint import checkpoint_filter_fn

    with fused_attention(spec.attention != "plain"):
        model = timm.create_model(spec.name, img_size=resolution, **spec.kwargs)
    if spec.state_dict is not None:
        # Trained at another resolution: the position embedding is resampled to this grid.
        model.load_state_dict(checkpoint_filter_fn(dict(spec.state_dict), model), strict=True)
    return model


def checkpoint_spec(path: str | os.PathLike) -> ModelSpec:
    """Our model from a pretraining weights file (its own config and trained weights), labelled 'trained_<name>'."""
    from vig.engine import state

    record = state.load(path)
    if record.get("format") != state.WEIGHTS_FORMAT:
        raise ValueError(
            f"{path} is not a pretraining weights file (format {record.get('format')!r}, expected "
            f"{state.WEIGHTS_FORMAT!r}): point benchmark.checkpoint at the pretrain stage's best.pt"
        )
    config = record["model_config"]
    kwargs = {k: v for k, v in config["kwargs"].items() if k != "img_size"}  # set per benchmarked resolution
    kwargs.update(num_classes=config["num_classes"], drop_path_rate=config["drop_path_rate"])
    return ModelSpec(name=config["name"], label=f"trained_{config['name']}", kwargs=kwargs, state_dict=record["model"])


def config_from_params(params: dict[str, Any], device: str, root: Path | None = None) -> BenchmarkConfig:
    """The stage's BenchmarkConfig from params.yaml's `benchmark` section; on a CPU its `cpu` keys replace the rest."""
    section = {k: v for k, v in params.items() if k != "cpu"}
    if device == "cpu":
        section.update(params.get("cpu") or {})
    unknown = set(section) - PARAM_KEYS
    if unknown:
        raise ValueError(f"benchmark params: unknown key(s) {sorted(unknown)}; known: {sorted(PARAM_KEYS)}")
    models = [ModelSpec(name=name, label=name) for name in section.get("models") or []]
    if section.get("checkpoint"):
        path = Path(root or ".") / section["checkpoint"]
        if not path.exists():
            raise FileNotFoundError(
                f"benchmark.checkpoint: {path} not found: run the pretrain stage first, or set it to null"
            )
        models.append(checkpoint_spec(path))
    models += baseline_specs(section.get("baselines") or [], section.get("attention") or ATTENTION_MODES)
    evals, train = section["eval"], section.get("train") or {}
    return BenchmarkConfig(
        models=tuple(with_executions(models, section.get("executions") or ["eager"])),
        dtypes=tuple(section["dtypes"]),
        eval_cases=_paired(evals["resolutions"], evals["batch_sizes"], "eval"),
        warmup=evals["warmup"],
        iters=evals["iters"],
        train_cases=_paired(train.get("resolutions", []), train.get("batch_sizes", []), "train"),
        train_dtype=train.get("dtype", "bf16"),
        train_warmup=train.get("warmup", 10),
        train_iters=train.get("iters", 20),
        max_seconds=section.get("max_seconds"),
        device=device,
        threads=section.get("threads"),
        compile_mode=section.get("compile_mode") or "default",
    )


PARAM_KEYS = {
    "models", "checkpoint", "baselines", "attention", "dtypes", "eval", "train", "max_seconds", "profile", "threads",
    "executions", "compile_mode",
}


def _paired(resolutions: Sequence[int], batch_sizes: Sequence[int], where: str) -> tuple[tuple[int, int], ...]:
    if len(resolutions) != len(batch_sizes):
        raise ValueError(
            f"benchmark.{where}: {len(resolutions)} resolutions but {len(batch_sizes)} batch_sizes; "
            "give one batch per resolution"
        )
    return tuple(zip(resolutions, batch_sizes))


def device_info(device: torch.device) -> dict[str, Any]:
    """What ran the numbers: device name, library versions, git commit."""
    from vig.tracking import git_commit

    info: dict[str, Any] = {
        "device_type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "triton": _version_of("triton"),
        "fla_core": _version_of("fla-core"),
        "git_commit": git_commit(Path(__file__).resolve().parent.parent),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device=torch.cuda.get_device_name(device),
            device_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,  # False: fp32 cells are true fp32 GEMMs
        )
    else:
        info["device"] = f"CPU ({_cpu_name()}, {os.cpu_count()} cores)"
    return info


def _version_of(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


class _Timer:
    """Wall time of a region: CUDA events on GPU (the device's own clock), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def measure(self) -> Iterator[list[float]]:
        elapsed: list[float] = []
        self.sync()
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield elapsed
            end.record()
            end.synchronize()
            elapsed.append(start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            yield elapsed
            elapsed.append(time.perf_counter() - begin)


def _run_passes(
    step: Callable[[], None], device: torch.device, warmup: int, iters: int, max_seconds: float | None
) -> dict[str, Any]:
    """Warm up, then time `iters` passes; under `max_seconds`, both phases shrink to fit (counts recorded)."""
    timer = _Timer(device)
    warmup_done, warmup_seconds, began = 0, 0.0, time.perf_counter()
    while warmup_done < warmup:
        # Pass 1 compiles/autotunes; the pass-time estimate for the cap comes from the later passes.
        with timer.measure() as elapsed:
            step()
        warmup_done += 1
        if warmup_done > 1:
            warmup_seconds = elapsed[0]
        if max_seconds is not None and warmup_done >= 3 and time.perf_counter() - began > max_seconds / 2:
            break
    timed = iters
    if max_seconds is not None and warmup_seconds > 0:
        timed = max(1, min(iters, int(max_seconds / 2 / warmup_seconds)))
    if device.type == "cuda":
        # Peak memory of the steady state: Triton's autotuning allocates scratch copies during warm-up.
        torch.cuda.reset_peak_memory_stats(device)
    with timer.measure() as elapsed:
        for _ in range(timed):
            step()
    return {"warmup_passes": warmup_done, "timed_passes": timed, "seconds": elapsed[0]}


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def _reset_memory(device: torch.device, collect: bool = False) -> None:
    """Give cached device memory back and restart the peak count; `collect` also breaks reference cycles
    (slow, ~0.4 s with timm loaded: only after a failure or a model is dropped)."""
    if device.type == "cuda":
        if collect:
            gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated device memory since the last reset; None on CPU (no allocator statistics there)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def measure_eval(
    model: nn.Module, batch: int, resolution: int, dtype: str, config: BenchmarkConfig, device: torch.device
) -> dict[str, Any]:
    """Eval throughput and peak memory of one cell, the paper's way (model.eval(), no_grad)."""
    model.eval()
    _reset_memory(device)
    images = torch.randn(batch, 3, resolution, resolution, device=device)

    def step() -> None:
        with torch.no_grad(), _autocast(device, dtype):
            model(images)

    run = _run_passes(step, device, config.warmup, config.iters, config.max_seconds)
    return _throughput(run, batch, device)


def measure_train(
    model: nn.Module, batch: int, resolution: int, dtype: str, config: BenchmarkConfig, device: torch.device
) -> dict[str, Any]:
    """Training throughput of one cell: autocast forward + cross-entropy + backward + AdamW step."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _reset_memory(device)
    images = torch.randn(batch, 3, resolution, resolution, device=device)
    labels = torch.randint(0, model.num_classes, (batch,), device=device)

    def step() -> None:
        with _autocast(device, dtype):
            loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    run = _run_passes(step, device, config.train_warmup, config.train_iters, config.max_seconds)
    return _throughput(run, batch, device)


def _throughput(run: dict[str, Any], batch: int, device: torch.device) -> dict[str, Any]:
    peak = _peak_memory_gib(device)
    return {
        "status": "ok",
        "images_per_s": run["timed_passes"] * batch / run["seconds"],
        "ms_per_pass": 1000 * run["seconds"] / run["timed_passes"],
        "peak_memory_gib": peak,
        "warmup_passes": run["warmup_passes"],
        "timed_passes": run["timed_passes"],
    }


def _measure_or_skip(measure: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Run one cell; out of device memory becomes a recorded skip and the memory is given back."""
    try:
        result = measure()
    except torch.cuda.OutOfMemoryError as error:
        # Leaving the except block drops the traceback (and the frames holding the cell's tensors).
        result = {"status": OUT_OF_MEMORY, "error": str(error).splitlines()[0] if str(error) else OUT_OF_MEMORY}
    _reset_memory(device, collect=result.get("status") == OUT_OF_MEMORY)
    return result


def run_benchmark(
    config: BenchmarkConfig, on_result: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Measure every model in every cell of `config`; returns the full record (environment, cells, ratios).

    `on_result` sees the record after each cell (e.g. to save partial results of a long GPU run).
    """
    device = torch.device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    with _cudnn_autotuning():
        return _run_cells(config, device, on_result)


@contextlib.contextmanager
def _cudnn_autotuning() -> Iterator[None]:
    """cuDNN picks its fastest convolution per fixed shape (as timm's benchmark does); the flag is restored."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def _run_cells(
    config: BenchmarkConfig, device: torch.device, on_result: Callable[[dict[str, Any]], None] | None
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "environment": device_info(device),
        "on_cpu": device.type == "cpu",
        "protocol": protocol_summary(config),
        "models": {},
        "results": [],
        "ratios": [],
    }
    cells = [("eval", dtype, res, batch) for res, batch in config.eval_cases for dtype in config.dtypes]
    cells += [("train", config.train_dtype, res, batch) for res, batch in config.train_cases]
    for spec in config.models:
        for resolution in sorted({res for _, _, res, _ in cells}):
            model = build_model(spec, resolution).to(device)
            record["models"].setdefault(spec.label, _model_summary(spec, model, resolution))
            runnable = _executable(model, spec, config)
            for mode, dtype, res, batch in cells:
                if res != resolution:
                    continue
                measure = measure_eval if mode == "eval" else measure_train
                result = _measure_or_skip(lambda: measure(runnable, batch, res, dtype, config, device), device)
                if result["status"] == "ok" and runs_cuda_graphs(spec, config):
                    # The timed replays allocate nothing: their peak would be the weights and input alone.
                    result.update(peak_memory_gib=None, peak_memory_note=GRAPH_POOL_NOTE)
                record["results"].append(
                    {"label": spec.label, "model": spec.name, "role": spec.role, "attention": spec.attention,
                     "execution": spec.execution, "mode": mode, "dtype": dtype, "resolution": res, "batch": batch,
                     **result}
                )  # fmt: skip
                record["ratios"] = compute_ratios(record["results"])
                if on_result is not None:
                    on_result(record)
            del model, runnable
            _reset_memory(device, collect=True)
    return record


def runs_cuda_graphs(spec: ModelSpec, config: BenchmarkConfig) -> bool:
    """Whether the spec's model replays CUDA graphs (compiled in a mode that captures them, on a GPU)."""
    return spec.execution == "compiled" and config.compile_mode in CUDA_GRAPH_COMPILE_MODES and config.device != "cpu"


def _executable(model: nn.Module, spec: ModelSpec, config: BenchmarkConfig) -> nn.Module:
    """The model as the spec runs it: itself, or compiled for the cell's fixed shapes (compilation happens in the
    first warm-up pass; static shapes also keep later resolutions from turning on dynamic-shape tracing)."""
    if spec.execution == "compiled":
        return torch.compile(model, mode=config.compile_mode, dynamic=False)
    return model


def _model_summary(spec: ModelSpec, model: nn.Module, resolution: int) -> dict[str, Any]:
    return {
        "model": spec.name,
        "role": spec.role,
        "attention": spec.attention,
        "execution": spec.execution,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "params_counted_at_resolution": resolution,  # the position embedding grows with the resolution
        "trained_weights": spec.state_dict is not None,
        "kwargs": spec.kwargs,
    }


def protocol_summary(config: BenchmarkConfig) -> dict[str, Any]:
    summary = asdict(replace(config, models=()))
    del summary["models"]
    return summary


def compute_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each of our cells against each baseline's cell of the same mode, dtype, resolution and batch, run the
    same way (eager or compiled) or eager (so a compiled model of ours meets the baselines as users run them).

    speedup = ours / baseline images/s; memory_ratio = ours / baseline peak memory (< 1: ours uses less).
    """
    ratios = []
    baselines = [r for r in results if r["role"] == "baseline"]
    for ours in (r for r in results if r["role"] == "ours"):
        for base in baselines:
            if any(ours[key] != base[key] for key in ("mode", "dtype", "resolution", "batch")):
                continue
            if base.get("execution", "eager") not in ("eager", ours.get("execution", "eager")):
                continue
            ratio = {key: ours[key] for key in ("mode", "dtype", "resolution", "batch")}
            ratio.update(model=ours["label"], baseline=base["label"], speedup=None, memory_ratio=None)
            both_ok = ours["status"] == base["status"] == "ok"
            ratio["status"] = (
                "ok" if both_ok else f"{ours['label']}: {ours['status']}, {base['label']}: {base['status']}"
            )
            if both_ok:
                ratio["speedup"] = ours["images_per_s"] / base["images_per_s"]
                if ours["peak_memory_gib"] is not None and base["peak_memory_gib"]:
                    ratio["memory_ratio"] = ours["peak_memory_gib"] / base["peak_memory_gib"]
            ratios.append(ratio)
    return ratios


def cell_key(result: dict[str, Any]) -> str:
    """'eval/fp32/224' — one cell of the sweep, also a valid MLflow metric name part."""
    return f"{result['mode']}/{result['dtype']}/{result['resolution']}"


def flat_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers, grouped two levels deep so `dvc metrics show` stays readable."""
    throughput, memory, speedup, memory_ratio = {}, {}, {}, {}
    for result in record["results"]:
        key = f"{result['label']}/{cell_key(result)}"
        throughput[key] = _rounded(result.get("images_per_s"))
        if result.get("peak_memory_gib") is not None:
            memory[key] = _rounded(result["peak_memory_gib"])
    for ratio in record["ratios"]:
        key = f"{ratio['model']}_vs_{ratio['baseline']}/{cell_key(ratio)}"
        speedup[key] = _rounded(ratio["speedup"])
        if ratio["memory_ratio"] is not None:
            memory_ratio[key] = _rounded(ratio["memory_ratio"])
    return {
        "device": record["environment"]["device"],
        "on_cpu": record["on_cpu"],
        "images_per_s": throughput,  # None: out of memory
        "peak_memory_gib": memory,
        "speedup": speedup,
        "memory_ratio": memory_ratio,
    }


def mlflow_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The flat metrics as MLflow metric names ('speedup/vig_tiny_vs_deit_tiny_fused/eval/fp32/224'), skips left out."""
    flat = flat_metrics(record)
    return {
        f"{group}/{key}": value
        for group in ("images_per_s", "peak_memory_gib", "speedup", "memory_ratio")
        for key, value in flat[group].items()
        if value is not None
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def write_plot_csv(record: dict[str, Any], path: Path) -> None:
    """One row per cell (long format), the DVC plots file."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PLOT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for result in record["results"]:
            writer.writerow({**result, "attention": result["attention"] or ""})


def plot_benchmark(record: dict[str, Any], out_dir: Path) -> list[Path]:
    """Eval throughput and peak memory against resolution (log-log), one panel per dtype; returns the PNGs."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in record["results"] if r["mode"] == "eval"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in evals))
    device = record["environment"]["device"]
    plots = [
        ("benchmark_throughput.png", "images_per_s", "images / s"),
        ("benchmark_memory.png", "peak_memory_gib", "peak allocated memory (GiB)"),
    ]
    paths = []
    for filename, metric, ylabel in plots:
        fig, axes = plt.subplots(1, max(1, len(dtypes)), figsize=(5 * max(1, len(dtypes)), 4.2), squeeze=False)
        for ax, dtype in zip(axes[0], dtypes):
            for label in dict.fromkeys(r["label"] for r in evals):
                cells = sorted((r for r in evals if r["label"] == label and r["dtype"] == dtype),
                               key=lambda r: r["resolution"])  # fmt: skip
                points = [(r["resolution"], r[metric]) for r in cells if r["status"] == "ok" and r[metric]]
                oom = [r["resolution"] for r in cells if r["status"] == OUT_OF_MEMORY]
                if not (points or oom):
                    continue
                suffix = f" (OOM at {', '.join(map(str, oom))})" if oom else ""
                xs, ys = zip(*points) if points else ((), ())
                ax.plot(xs, ys, "-" if cells[0]["role"] == "ours" else "--", marker="o", label=label + suffix)
            ax.set(xscale="log", yscale="log", xlabel="resolution (px, square)", ylabel=ylabel, title=dtype)
            resolutions = sorted({r["resolution"] for r in evals})
            ax.set_xticks(resolutions, [str(r) for r in resolutions])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        if metric == "peak_memory_gib" and record["on_cpu"]:
            fig.text(0.5, 0.5, "peak memory is measured on CUDA only", ha="center", fontsize=12)
        fig.suptitle(f"{ylabel} vs resolution, eval, {device}", fontsize=10)
        fig.tight_layout()
        path = out_dir / filename
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_outputs(
    record: dict[str, Any], out_dir: Path, plots: bool = True, metrics_path: Path | None = None
) -> dict[str, Path]:
    """The full record, the flat metrics (default: in `out_dir` too), the plots CSV and the PNG plots."""
    outputs = {
        "full": out_dir / FULL_JSON,
        "metrics": metrics_path or out_dir / METRICS_JSON,
        "plot_csv": out_dir / PLOT_CSV,
    }
    write_json(outputs["full"], record)
    write_json(outputs["metrics"], flat_metrics(record))
    write_plot_csv(record, outputs["plot_csv"])
    if plots:
        for path in plot_benchmark(record, out_dir):
            outputs[path.stem] = path
    return outputs


# ---------------------------------------------------------------------------------------------------------------
# Profile: device (or CPU) time per op class per block, for the kernel work that follows the benchmark.

OP_CLASSES = (  # first match wins; matched against the op name, then the kernel name
    ("bigla", r"bigla|gla|chunk_|recurrent|scan"),
    ("attention", r"scaled_dot_product|flash|fmha|efficient_attention|softmax"),
    ("matmul", r"\b(aten::)?(mm|addmm|bmm|baddbmm|matmul|linear)\b|gemm|cublas|cutlass|sm\d+_xmma|nvjet"),
    ("conv", r"conv|cudnn"),
    ("norm", r"norm"),
    ("copy/layout", r"copy|contiguous|clone|\bcat\b|flip|pad|transpose|permute|index|stack|_to_copy|cat_"),
    ("elementwise", r"add|mul|sub|div|exp|log|sigmoid|silu|gelu|tanh|pow|sqrt|mean|sum|where|clamp|neg|fill|"
                    r"elementwise|reduce|dropout"),
)  # fmt: skip


def op_class(*names: str) -> str:
    for name in names:
        for cls, pattern in OP_CLASSES:
            if re.search(pattern, name, flags=re.IGNORECASE):
                return cls
    return "other"


def _block_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated blocks (timm's `blocks`, or `stages`/`layers` of hierarchical models)."""
    for attr in ("blocks", "stages", "layers"):
        container = getattr(model, attr, None)
        if isinstance(container, (nn.ModuleList, nn.Sequential)) and len(container):
            return [(f"{attr}.{i}", module) for i, module in enumerate(container)]
    return []


BLOCK_TAG = "block:"
TOP_KERNELS = 25  # the longest-running kernels (ops on CPU) listed by a profile
OUTSIDE_BLOCKS = "stem/head"


@contextlib.contextmanager
def _annotate_blocks(model: nn.Module) -> Iterator[None]:
    """Each block's forward inside a profiler range named 'block:<name>'."""
    open_ranges: list[Any] = []
    handles = []
    for name, module in _block_modules(model):

        def enter(_module: nn.Module, _args: Any, name: str = name) -> None:
            open_ranges.append(torch.profiler.record_function(BLOCK_TAG + name).__enter__())

        def leave(_module: nn.Module, _args: Any, _output: Any) -> None:
            open_ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def profile_model(
    model: nn.Module, batch: int, resolution: int, dtype: str, device: torch.device, passes: int = 3,
    per_block: bool = True,
) -> dict[str, Any]:
    """Time per (block, op class) of eval forwards under torch.profiler; device time on GPU, CPU time on CPU.

    On GPU each kernel is charged to the op that launched it (Triton kernels launched outside an aten op
    are classed by kernel name); on CPU each op's self time is used, so nothing is counted twice. Ops
    under a profiler range or custom op whose name says BiGLA count as "bigla". `per_block=False` charges
    everything to one row (compiled models: hooks on their blocks would change what is compiled).
    """
    from torch.profiler import ProfilerActivity, profile

    model.eval()
    images = torch.randn(batch, 3, resolution, resolution, device=device)
    on_cuda = device.type == "cuda"
    timer = _Timer(device)

    def forward() -> None:
        with torch.no_grad(), _autocast(device, dtype):
            model(images)

    forward()  # compile / autotune outside the profile
    timer.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    annotate = _annotate_blocks(model) if per_block else contextlib.nullcontext()
    with annotate, profile(activities=activities) as prof:
        for _ in range(passes):
            forward()
        timer.sync()
    table: dict[tuple[str, str], float] = {}
    by_name: dict[str, float] = {}  # kernel (GPU) or op (CPU) name -> time, across blocks
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        block, inside_bigla = _enclosing_scope(event)
        if on_cuda:
            for kernel in event.kernels:
                names = (kernel.name,) if event.is_user_annotation else (event.name, kernel.name)
                key = (block, "bigla" if inside_bigla else op_class(*names))
                table[key] = table.get(key, 0.0) + kernel.duration
                by_name[kernel.name] = by_name.get(kernel.name, 0.0) + kernel.duration
        elif not event.is_user_annotation:
            key = (block, "bigla" if inside_bigla else op_class(event.name))
            table[key] = table.get(key, 0.0) + event.self_cpu_time_total
            by_name[event.name] = by_name.get(event.name, 0.0) + event.self_cpu_time_total
    rows = [
        {"block": block, "op_class": cls, "ms_per_pass": us / 1000 / passes}
        for (block, cls), us in sorted(table.items(), key=lambda item: _block_order(item[0][0]))
    ]
    # Compiled models run as generated kernels that no block or op class describes well: name them.
    top = sorted(by_name.items(), key=lambda item: -item[1])[:TOP_KERNELS]
    return {
        "top_kernels": [{"name": name, "ms_per_pass": us / 1000 / passes} for name, us in top],
        "resolution": resolution,
        "batch": batch,
        "dtype": dtype,
        "passes": passes,
        "clock": "device (CUDA kernels)" if on_cuda else "CPU (op self time)",
        "rows": rows,
        "total_ms_per_pass": sum(row["ms_per_pass"] for row in rows),
    }


def profile_benchmark(config: BenchmarkConfig, passes: int = 3) -> list[dict[str, Any]]:
    """Profiles of each of our models in every eval cell of `config` (cells out of memory are left out)."""
    device = torch.device(config.device)
    profiles = []
    with _cudnn_autotuning():
        for spec in (s for s in config.models if s.role == "ours"):
            for resolution, batch in config.eval_cases:
                model = build_model(spec, resolution).to(device)
                runnable = _executable(model, spec, config)
                per_block = spec.execution == "eager"
                for dtype in config.dtypes:
                    profile = _measure_or_skip(
                        lambda: profile_model(runnable, batch, resolution, dtype, device, passes, per_block), device
                    )
                    if profile.get("status") != OUT_OF_MEMORY:
                        profiles.append({"label": spec.label, **profile})
                del model, runnable
                _reset_memory(device, collect=True)
    return profiles


def _enclosing_scope(event: Any) -> tuple[str, bool]:
    """The block an event ran in, and whether it ran inside the BiGLA operator (a custom op or a range
    named like it), whose inner ops (einsum, cumsum... in the PyTorch implementation) all count as BiGLA."""
    inside_bigla = False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(BLOCK_TAG):
            return parent.name[len(BLOCK_TAG) :], inside_bigla
        inside_bigla = inside_bigla or op_class(parent.name) == "bigla"
        parent = parent.cpu_parent
    return OUTSIDE_BLOCKS, inside_bigla


def _block_order(block: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", block)) or (-1,)


def profile_table(profile: dict[str, Any]) -> str:
    """Blocks as rows, op classes as columns, ms per forward pass."""
    classes = [cls for cls, _ in OP_CLASSES if any(r["op_class"] == cls for r in profile["rows"])]
    classes += ["other"] if any(r["op_class"] == "other" for r in profile["rows"]) else []
    blocks = list(dict.fromkeys(r["block"] for r in profile["rows"]))
    cell = {(r["block"], r["op_class"]): r["ms_per_pass"] for r in profile["rows"]}
    header = ["block", *classes, "total"]
    lines = [
        f"# {profile['label']}: {profile['dtype']}, {profile['resolution']}px, batch {profile['batch']}, "
        f"ms per forward pass ({profile['clock']}, mean of {profile['passes']})",
        "  ".join(f"{h:>12}" for h in header),
    ]
    for block in [*blocks, "total"]:
        values = [sum(v for (b, c), v in cell.items() if c == cls and block in (b, "total")) for cls in classes]
        lines.append("  ".join(f"{x:>12}" for x in [block, *(f"{v:.3f}" for v in values), f"{sum(values):.3f}"]))
    lines.append(f"longest-running {'kernels' if profile['clock'].startswith('device') else 'ops'}, ms per pass:")
    lines += [f"  {k['ms_per_pass']:>9.3f}  {k['name'][:110]}" for k in profile.get("top_kernels", [])]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# CLI: vig-bench


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vig-bench",
        description="Throughput / memory of ViG models against timm DeiT baselines measured in the same process "
        "(the paper's protocol: eval, no_grad, 50 warm-up + 30 timed passes).",
    )
    parser.add_argument("--model", nargs="+", default=["vig_tiny"],
                        help="our models: timm names (after `import vig`) or pretraining weights files (best.pt)")
    parser.add_argument("--baselines", nargs="*", default=list(DEIT_BASELINES),
                        help="timm baseline names; give none to skip")
    parser.add_argument("--attention", nargs="+", default=list(ATTENTION_MODES), choices=ATTENTION_MODES,
                        help="baseline attention: fused (torch SDPA) and/or plain")
    parser.add_argument("--res", nargs="+", type=int, help="resolutions (default: 224 512 1024 2048; CPU: 224 384)")
    parser.add_argument("--batch", nargs="+", type=int,
                        help="batch per resolution, or one for all (default: the protocol's 256/64/16/4)")
    parser.add_argument("--dtype", nargs="+", default=None, choices=sorted(DTYPES),
                        help="eval precisions (default: fp32 fp16 bf16; CPU: fp32 bf16)")
    parser.add_argument("--train", action="store_true", help="also time bf16 training steps")
    parser.add_argument("--train-cases", nargs="+", metavar="RES:BATCH",
                        help="training cells (default: 224:128 1024:8; CPU: 224:2)")
    parser.add_argument("--warmup", type=int, help="warm-up passes (default: eval 50, train 10; CPU 2 and 1)")
    parser.add_argument("--iters", type=int, help="timed passes (default: eval 30, train 20; CPU 3 and 2)")
    parser.add_argument("--max-seconds", type=float, help="cap per cell; fewer passes are run and recorded")
    parser.add_argument("--execution", nargs="+", default=["eager"], choices=EXECUTIONS,
                        help="run every model eager and/or compiled with torch.compile")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode, e.g. default, reduce-overhead (CUDA graphs), max-autotune")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true",
                        help="also profile each of our models: time per op class per block and the "
                        "longest-running kernels (text + JSON)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--out", type=Path, default=Path("reports/bench"), help="output folder")
    return parser.parse_args(argv)


def _cases(resolutions: list[int], batches: list[int] | None, defaults: dict[int, int]) -> tuple[tuple[int, int], ...]:
    if batches is None:
        missing = [r for r in resolutions if r not in defaults]
        if missing:
            raise SystemExit(f"vig-bench: no default batch for resolution(s) {missing}: pass --batch")
        batches = [defaults[r] for r in resolutions]
    elif len(batches) == 1:
        batches = batches * len(resolutions)
    elif len(batches) != len(resolutions):
        raise SystemExit(f"vig-bench: --batch takes one value or one per --res ({len(resolutions)}), got {batches}")
    return tuple(zip(resolutions, batches))


def _train_cases(values: list[str]) -> tuple[tuple[int, int], ...]:
    try:
        return tuple((int(res), int(batch)) for res, batch in (v.split(":") for v in values))
    except ValueError:
        raise SystemExit(f"vig-bench: --train-cases takes RES:BATCH pairs such as 224:128, got {values}") from None


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    on_cpu = args.device == "cpu"
    eval_defaults = dict(CPU_EVAL_CASES if on_cpu else PROTOCOL_EVAL_CASES)
    resolutions = args.res or list(eval_defaults)
    train_cases = CPU_TRAIN_CASES if on_cpu else PROTOCOL_TRAIN_CASES
    if args.train_cases:
        train_cases = _train_cases(args.train_cases)
    models = [checkpoint_spec(m) if Path(m).is_file() else ModelSpec(name=m, label=m) for m in args.model]
    models += baseline_specs(args.baselines, args.attention)
    return BenchmarkConfig(
        models=tuple(with_executions(models, args.execution)),
        dtypes=tuple(args.dtype or (["fp32", "bf16"] if on_cpu else DTYPES)),
        eval_cases=_cases(resolutions, args.batch, eval_defaults),
        warmup=args.warmup or (2 if on_cpu else 50),
        iters=args.iters or (3 if on_cpu else 30),
        train_cases=train_cases if args.train else (),
        train_warmup=args.warmup or (1 if on_cpu else 10),
        train_iters=args.iters or (2 if on_cpu else 20),
        max_seconds=args.max_seconds,
        device=args.device,
        compile_mode=args.compile_mode,
    )


def summary_table(record: dict[str, Any]) -> str:
    """Plain-text table of every cell and of the speedups against fused baselines."""
    lines = [f"device: {record['environment']['device']}  torch {record['environment']['torch']}  "
             f"triton {record['environment']['triton']}"]  # fmt: skip
    width = max([len(r["label"]) + 2 for r in record["results"]] + [22])
    header = f"{'mode':<6}{'dtype':<6}{'res':>6}{'batch':>6}{'img/s':>12}{'peak GiB':>10}  passes"
    lines.append(f"{'model':<{width}}{header}")
    for r in record["results"]:
        if r["status"] == "ok":
            mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
            numbers = f"{r['images_per_s']:>12.1f}{mem:>10}  {r['warmup_passes']}+{r['timed_passes']}"
        else:
            numbers = f"{r['status']:>22}"
        lines.append(f"{r['label']:<{width}}{r['mode']:<6}{r['dtype']:<6}{r['resolution']:>6}{r['batch']:>6}{numbers}")
    lines.append("ratios (ours / baseline, same run): speedup, memory")
    for q in record["ratios"]:
        speed = "-" if q["speedup"] is None else f"{q['speedup']:.2f}x"
        mem = "-" if q["memory_ratio"] is None else f"{q['memory_ratio']:.2f}"
        lines.append(f"  {q['model'] + ' vs ' + q['baseline']:<{2 * width}} {cell_key(q):<16} {speed:>8} {mem:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """`vig-bench`: measure, write the JSON/CSV/plots (and profiles) under --out, print a table."""
    args = _parse_args(argv)
    config = config_from_args(args)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    record = run_benchmark(config, on_result=lambda rec: write_json(out_dir / FULL_JSON, rec))
    if args.profile:
        record["profiles"] = profile_benchmark(config)
        for label in dict.fromkeys(profile["label"] for profile in record["profiles"]):
            tables = [profile_table(p) for p in record["profiles"] if p["label"] == label]
            write_bytes(out_dir / f"profile_{label}.txt", "\n".join(tables).encode())
    outputs = write_outputs(record, out_dir, plots=not args.no_plots)
    print(summary_table(record))
    for profile in record.get("profiles", []):
        print(profile_table(profile))
    print("wrote " + ", ".join(str(p) for p in outputs.values()), file=sys.stderr)


if __name__ == "__main__":
    main()
