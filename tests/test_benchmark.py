import csv
import json
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import timm
import timm.layers
import torch
from PIL import Image

import kernels
from vig import benchmark
from vig.models.vig import ViG

TINY = dict(depth=1, embed_dim=32, num_heads=2, patch_size=4, num_classes=10)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: a second thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides):
    models = (
        benchmark.ModelSpec(name="vig_tiny", label="vig_micro", kwargs=TINY),
        benchmark.ModelSpec(name="deit_tiny_patch16_224", label="deit_micro_fused", role="baseline",
                            attention="fused", kwargs=TINY),
        benchmark.ModelSpec(name="deit_tiny_patch16_224", label="deit_micro_plain", role="baseline",
                            attention="plain", kwargs=TINY),
    )  # fmt: skip
    settings = dict(
        models=models, dtypes=("fp32", "bf16"), eval_cases=((16, 2), (32, 1)), warmup=1, iters=2,
        train_cases=((16, 2),), train_warmup=1, train_iters=1, device="cpu",
    )  # fmt: skip
    return benchmark.BenchmarkConfig(**{**settings, **overrides})


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG"


def test_cpu_run_writes_complete_json_with_ratios_from_the_same_run(tmp_path):
    config = tiny_config()
    seen = []
    record = benchmark.run_benchmark(config, on_result=lambda rec: seen.append(len(rec["results"])))
    outputs = benchmark.write_outputs(record, tmp_path)
    full = json.loads(outputs["full"].read_text())

    assert full["on_cpu"] is True and full["environment"]["device"].startswith("CPU")
    assert full["environment"]["torch"] == torch.__version__ and full["environment"]["timm"] == timm.__version__
    assert full["protocol"]["warmup"] == 1 and full["protocol"]["eval_cases"] == [[16, 2], [32, 1]]
    # 3 models x (2 resolutions x 2 dtypes eval + 1 train cell), each reported as it finished.
    assert seen == list(range(1, 16))
    cells = {(r["label"], r["mode"], r["dtype"], r["resolution"]) for r in full["results"]}
    assert len(cells) == len(full["results"]) == 15
    for result in full["results"]:
        assert result["status"] == "ok"
        assert result["images_per_s"] > 0 and result["peak_memory_gib"] is None  # no allocator stats on CPU
        expected = (config.warmup, config.iters) if result["mode"] == "eval" else (1, 1)
        assert (result["warmup_passes"], result["timed_passes"]) == expected
        assert result["images_per_s"] == pytest.approx(1000 * result["batch"] / result["ms_per_pass"])
    assert full["models"]["vig_micro"]["role"] == "ours" and full["models"]["deit_micro_plain"]["attention"] == "plain"

    by_cell = {(r["label"], r["mode"], r["dtype"], r["resolution"]): r for r in full["results"]}
    assert len(full["ratios"]) == 2 * 5  # ours against each baseline in each of its 5 cells
    for ratio in full["ratios"]:
        ours = by_cell[(ratio["model"], ratio["mode"], ratio["dtype"], ratio["resolution"])]
        base = by_cell[(ratio["baseline"], ratio["mode"], ratio["dtype"], ratio["resolution"])]
        assert ratio["speedup"] == pytest.approx(ours["images_per_s"] / base["images_per_s"], rel=1e-12)
        assert ratio["memory_ratio"] is None

    flat = json.loads(outputs["metrics"].read_text())
    assert flat["device"] == full["environment"]["device"] and flat["on_cpu"] is True
    key = "vig_micro_vs_deit_micro_fused/eval/bf16/32"
    ratio = next(r for r in full["ratios"] if f"{r['model']}_vs_{r['baseline']}/{benchmark.cell_key(r)}" == key)
    assert flat["speedup"][key] == pytest.approx(ratio["speedup"], rel=1e-3)
    assert flat["images_per_s"]["deit_micro_plain/train/bf16/16"] > 0

    with open(outputs["plot_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 15 and set(rows[0]) == set(benchmark.PLOT_COLUMNS)
    for name in ("benchmark_throughput", "benchmark_memory"):
        assert_png(outputs[name])


def test_out_of_memory_at_one_resolution_is_a_recorded_skip(monkeypatch):
    forward = ViG.forward

    def forward_that_runs_out_at_32px(self, x):
        if x.shape[-1] == 32:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, x)

    monkeypatch.setattr(ViG, "forward", forward_that_runs_out_at_32px)
    reset_calls = []
    monkeypatch.setattr(benchmark, "_reset_memory", lambda device, collect=False: reset_calls.append(collect))
    config = tiny_config(train_cases=((16, 2), (32, 1)))
    record = benchmark.run_benchmark(config)

    skipped = [r for r in record["results"] if r["status"] != "ok"]
    assert {(r["label"], r["mode"], r["dtype"]) for r in skipped} == {
        ("vig_micro", "eval", "fp32"), ("vig_micro", "eval", "bf16"), ("vig_micro", "train", "bf16")
    }  # fmt: skip
    for result in skipped:
        assert result["resolution"] == 32 and result["status"] == benchmark.OUT_OF_MEMORY
        assert "images_per_s" not in result and "Tried to allocate" in result["error"]
    # Every other cell still ran, the baselines at 32 px included.
    assert sum(r["status"] == "ok" for r in record["results"]) == 18 - 3
    at_32 = [q for q in record["ratios"] if q["resolution"] == 32]
    assert len(at_32) == 6 and all(q["speedup"] is None and "out of memory" in q["status"] for q in at_32)
    assert all(q["speedup"] > 0 for q in record["ratios"] if q["resolution"] == 16)
    assert len(reset_calls) >= len(record["results"])  # memory given back after every cell
    assert reset_calls.count(True) == 3 + 6  # cycles broken after each out-of-memory and each dropped model
    flat = benchmark.flat_metrics(record)
    assert flat["images_per_s"]["vig_micro/eval/fp32/32"] is None
    assert flat["speedup"]["vig_micro_vs_deit_micro_plain/eval/fp32/32"] is None


def test_plain_attention_copies_are_built_with_the_flag_off_and_the_flag_is_restored():
    fused_before = timm.layers.use_fused_attn()
    specs = benchmark.baseline_specs(["deit_tiny_patch16_224"])
    assert [s.label for s in specs] == ["deit_tiny_fused", "deit_tiny_plain"]
    for spec in specs:
        tiny = benchmark.ModelSpec(spec.name, spec.label, spec.role, spec.attention, kwargs=TINY)
        model = benchmark.build_model(tiny, 32)
        flags = {m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
        assert flags == {spec.attention == "fused"}
        assert timm.layers.use_fused_attn() == fused_before


def test_profile_splits_time_by_block_and_op_class(monkeypatch):
    bigla = kernels.bigla

    def bigla_in_a_profiler_range(*args, **kwargs):
        with torch.profiler.record_function("kernels.bigla"):
            return bigla(*args, **kwargs)

    monkeypatch.setattr(kernels, "bigla", bigla_in_a_profiler_range)
    model = benchmark.build_model(benchmark.ModelSpec("vig_tiny", "vig_micro", kwargs={**TINY, "depth": 2}), 16)
    profile = benchmark.profile_model(model, batch=2, resolution=16, dtype="fp32", device=torch.device("cpu"))
    blocks = {row["block"] for row in profile["rows"]}
    assert blocks == {"blocks.0", "blocks.1", benchmark.OUTSIDE_BLOCKS}
    classes_in_block = {row["op_class"] for row in profile["rows"] if row["block"] == "blocks.0"}
    assert {"matmul", "bigla", "norm", "conv"} <= classes_in_block
    assert "bigla" not in {row["op_class"] for row in profile["rows"] if row["block"] == benchmark.OUTSIDE_BLOCKS}
    assert profile["total_ms_per_pass"] == pytest.approx(sum(r["ms_per_pass"] for r in profile["rows"]))
    top = profile["top_kernels"]
    assert 0 < len(top) <= benchmark.TOP_KERNELS
    assert [k["ms_per_pass"] for k in top] == sorted((k["ms_per_pass"] for k in top), reverse=True)
    assert sum(k["ms_per_pass"] for k in top) <= profile["total_ms_per_pass"] * (1 + 1e-9)
    assert any(k["name"] in ("aten::addmm", "aten::mm", "aten::linear") for k in top)
    table = benchmark.profile_table({"label": "vig_micro", **profile}).splitlines()
    assert table[1].split()[0] == "block"
    assert [line.split()[0] for line in table[2:6]] == ["stem/head", "blocks.0", "blocks.1", "total"]
    assert table[6] == "longest-running ops, ms per pass:"
    assert [line.split()[1] for line in table[7:]] == [k["name"] for k in top]


def test_cli_measures_profiles_and_writes_everything(tmp_path, capsys):
    benchmark.main([
        "--model", "vig_tiny", "--baselines", "deit_tiny_patch16_224", "--attention", "fused",
        "--res", "32", "--batch", "1", "--dtype", "fp32", "--warmup", "1", "--iters", "1",
        "--train", "--train-cases", "32:1", "--profile", "--device", "cpu", "--out", str(tmp_path),
    ])  # fmt: skip
    full = json.loads((tmp_path / benchmark.FULL_JSON).read_text())
    assert [(r["label"], r["mode"]) for r in full["results"]] == [
        ("vig_tiny", "eval"), ("vig_tiny", "train"), ("deit_tiny_fused", "eval"), ("deit_tiny_fused", "train")
    ]  # fmt: skip
    assert full["models"]["vig_tiny"]["params_m"] == pytest.approx(5.83, abs=0.05)
    assert [p["label"] for p in full["profiles"]] == ["vig_tiny"]
    assert "blocks.11" in (tmp_path / "profile_vig_tiny.txt").read_text()
    assert "vig_tiny vs deit_tiny_fused" in capsys.readouterr().out
    for name in ("benchmark_throughput.png", "benchmark_memory.png"):
        assert_png(tmp_path / name)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--res", "300"], "no default batch for resolution(s) [300]"),
        (["--res", "224", "512", "--batch", "1", "2", "3"], "--batch takes one value or one per --res"),
        (["--train-cases", "224x8"], "RES:BATCH pairs"),
    ],
)
def test_cli_rejects_bad_arguments_with_a_clear_message(argv, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        benchmark.config_from_args(benchmark._parse_args([*argv, "--device", "cuda"]))


def test_config_rejects_unknown_dtype_and_duplicate_labels():
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        tiny_config(dtypes=("fp8",))
    spec = benchmark.ModelSpec("vig_tiny", "same")
    with pytest.raises(ValueError, match="labels must be unique"):
        tiny_config(models=(spec, spec))


def test_stage_params_with_a_trained_checkpoint_and_the_cpu_sweep(tmp_path):
    from vig.engine import state

    model_config = {"name": "vig_tiny", "num_classes": 10, "drop_path_rate": 0.0,
                    "kwargs": {"img_size": 32, **{k: v for k, v in TINY.items() if k != "num_classes"}}}  # fmt: skip
    trained = state.create_model(model_config)
    (tmp_path / "checkpoints").mkdir()
    weights = state.weights(model_config, trained, None, epoch=1, step=1, metrics={})
    state.save(weights, tmp_path / "checkpoints/best.pt")
    params = {
        "models": ["vig_tiny", "vig_small"], "checkpoint": "checkpoints/best.pt",
        "baselines": ["deit_tiny_patch16_224", "deit_base_patch16_224"], "attention": ["fused", "plain"],
        "dtypes": ["fp32", "fp16", "bf16"],
        "eval": {"resolutions": [224, 1024], "batch_sizes": [256, 16], "warmup": 50, "iters": 30},
        "train": {"dtype": "bf16", "resolutions": [224], "batch_sizes": [128], "warmup": 10, "iters": 20},
        "max_seconds": None, "profile": False, "threads": None, "executions": ["eager", "compiled"],
        "compile_mode": "reduce-overhead",
        "cpu": {"models": ["vig_tiny"], "baselines": ["deit_tiny_patch16_224"], "dtypes": ["fp32"],
                "eval": {"resolutions": [64], "batch_sizes": [2], "warmup": 1, "iters": 2}, "threads": 1},
    }  # fmt: skip
    gpu = benchmark.config_from_params(params, "cuda", tmp_path)
    labels = ["vig_tiny", "vig_small", "trained_vig_tiny", "deit_tiny_fused", "deit_tiny_plain", "deit_base_fused",
              "deit_base_plain"]  # fmt: skip
    assert [s.label for s in gpu.models] == [name + suffix for name in labels for suffix in ("", "_compiled")]
    assert gpu.eval_cases == ((224, 256), (1024, 16)) and gpu.warmup == 50 and gpu.threads is None
    assert gpu.compile_mode == "reduce-overhead"
    params["cpu"]["executions"] = ["eager"]
    cpu = benchmark.config_from_params(params, "cpu", tmp_path)
    assert [s.label for s in cpu.models] == ["vig_tiny", "trained_vig_tiny", "deit_tiny_fused", "deit_tiny_plain"]
    assert cpu.eval_cases == ((64, 2),) and cpu.dtypes == ("fp32",) and cpu.train_cases == ((224, 128),)
    assert cpu.threads == 1

    spec = cpu.models[1]
    model = benchmark.build_model(spec, 64)  # trained at 32 px: the position embedding is resampled to 16x16
    assert model.pos_embed.shape == (1, 256, 32)
    for name, value in trained.state_dict().items():
        if name != "pos_embed":
            assert torch.equal(model.state_dict()[name], value), name
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)

    with pytest.raises(ValueError, match=r"unknown key\(s\) \['batch'\]"):
        benchmark.config_from_params({**params, "batch": 3}, "cuda", tmp_path)
    with pytest.raises(FileNotFoundError, match="run the pretrain stage first"):
        benchmark.config_from_params({**params, "checkpoint": "missing.pt"}, "cuda", tmp_path)


def test_compiled_variants_are_labelled_and_compared_with_compiled_and_eager_baselines(monkeypatch):
    compile_calls = []
    real_compile = torch.compile

    def compile_without_a_cpp_toolchain(model, mode, dynamic):
        compile_calls.append((mode, dynamic))
        return real_compile(model, backend="aot_eager", fullgraph=True, dynamic=dynamic)  # fullgraph: no breaks

    monkeypatch.setattr(torch, "compile", compile_without_a_cpp_toolchain)
    base = tiny_config()
    config = tiny_config(models=tuple(benchmark.with_executions(base.models[:2], ["eager", "compiled"])),
                         dtypes=("fp32",), eval_cases=((16, 2),), compile_mode="max-autotune")  # fmt: skip
    assert [s.label for s in config.models] == ["vig_micro", "vig_micro_compiled", "deit_micro_fused",
                                                "deit_micro_fused_compiled"]  # fmt: skip
    record = benchmark.run_benchmark(config)

    assert compile_calls == [("max-autotune", False)] * 2  # once per compiled model and resolution, static shapes
    assert all(r["status"] == "ok" for r in record["results"]) and len(record["results"]) == 8
    assert {r["execution"] for r in record["results"] if r["label"].endswith("_compiled")} == {"compiled"}
    pairs = {(q["model"], q["baseline"]) for q in record["ratios"]}
    assert pairs == {("vig_micro", "deit_micro_fused"), ("vig_micro_compiled", "deit_micro_fused"),
                     ("vig_micro_compiled", "deit_micro_fused_compiled")}  # fmt: skip
    with pytest.raises(ValueError, match="unknown execution 'jit'"):
        benchmark.with_executions(base.models, ["jit"])
    # On a GPU, peak memory of CUDA-graph replays is not a measure of the model (the pool is taken at capture).
    eager_spec, compiled_spec = config.models[:2]
    for mode, graphs in (("reduce-overhead", True), ("max-autotune", True), ("default", False)):
        on_gpu = replace(config, device="cuda", compile_mode=mode)
        assert benchmark.runs_cuda_graphs(compiled_spec, on_gpu) is graphs
        assert not benchmark.runs_cuda_graphs(eager_spec, on_gpu)
    assert not benchmark.runs_cuda_graphs(compiled_spec, replace(config, compile_mode="reduce-overhead"))  # CPU


def test_cli_imports_without_the_pipeline_stack():
    """`vig-bench` is documented to need only torch and timm: it must load on a GPU box without the data,
    tracking or scheduling packages (a GPU run on 2026-12-07 failed on `import pycocotools` through vig.data)."""
    pipeline_only = ("pycocotools", "webdataset", "mlflow", "ray", "dvc", "submitit")
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in pipeline_only)
    result = subprocess.run([sys.executable, "-c", f"import sys; {blocked}; import vig.benchmark"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
