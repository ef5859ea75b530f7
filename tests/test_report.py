import base64
import json
import re
import shutil
from pathlib import Path

import mlflow
import pytest
import yaml
from PIL import Image

from vig import report, tracking

FIXTURES = Path(__file__).parent / "fixtures" / "report"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PARAMS = {"data": {"source": "embedded"}, "pretrain": {"model": {"name": "vig_tiny"}}}


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One sqlite store for the module (creating its schema takes seconds); each test uses its own experiment."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def store(shared_store, monkeypatch):
    uri = f"sqlite:///{shared_store / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("VIG_ROOT", str(shared_store))
    return uri


@pytest.fixture
def pipeline_root(tmp_path):
    """A project folder holding one pipeline run's metrics files (no det/seg stages yet)."""
    (tmp_path / "metrics").mkdir()
    for stage in ("prepare", "shard", "pretrain", "evaluate", "benchmark"):
        shutil.copy(FIXTURES / f"{stage}.json", tmp_path / "metrics")
    (tmp_path / "reports").mkdir()
    shutil.copy(FIXTURES / "benchmark_full.json", tmp_path / "reports")
    return tmp_path


def log_stage(experiment, stage, pipeline, history=None):
    """A finished stage run tagged as vig.tracking.stage_run tags it."""
    client = mlflow.MlflowClient(tracking.tracking_uri())
    run = client.create_run(tracking.setup_experiment(experiment), tags={"stage": stage, "pipeline_id": pipeline})
    for key, points in (history or {}).items():
        for step, value in points:
            client.log_metric(run.info.run_id, key, value, step=step)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def assert_png(data: bytes):
    assert data[:8] == PNG_MAGIC


def table_row(markdown: str, *cells: str) -> str:
    """The one table line containing all `cells`."""
    rows = [line for line in markdown.splitlines() if line.startswith("|") and all(c in line for c in cells)]
    assert len(rows) == 1, (cells, rows)
    return rows[0]


def test_report_has_every_table_and_plot_of_the_pipeline_run(pipeline_root, store):
    curves = {"train/loss": [(s, 2.3 - 0.2 * s) for s in range(8)], "val/top1": [(3, 40.0), (6, 80.0)],
              "val/ema_top1": [(3, 30.0), (6, 70.0)], "summary/steps": [(7, 8.0)]}  # fmt: skip
    pretrain_run = log_stage("full", "pretrain", "pipe-A", curves)
    benchmark_run = log_stage("full", "benchmark", "pipe-A")
    other_pipeline_run = log_stage("full", "pretrain", "pipe-B", curves)  # newer, but another pipeline

    inputs = report.gather(pipeline_root, {**PARAMS, "experiment": "full"}, store, "pipe-A", "c0ffee")
    outputs = report.build_report(inputs, pipeline_root / "reports", "ViG pipeline report")
    md = outputs["markdown"].read_text()

    for title in ("Stages", "Classification", "Detection and segmentation", "Speed and memory", "Training curves",
                  "Metrics of every stage", "Environment", "MLflow runs"):  # fmt: skip
        assert re.search(rf"^## {re.escape(title)}", md, flags=re.M), title
    # Stages: what ran (metrics file and/or run of this pipeline) and what did not.
    assert pretrain_run in table_row(md, "| pretrain | ran |") and other_pipeline_run not in md
    assert benchmark_run in table_row(md, "| benchmark | ran |")
    assert "metrics/prepare.json" in table_row(md, "| prepare | ran |")
    for stage in ("finetune_det", "evaluate_det", "finetune_seg", "evaluate_seg"):
        assert table_row(md, f"| {stage} | not run |")
    assert "`evaluate_det` not run" in md and "`evaluate_seg` not run" in md
    # Classification beside the paper, with the dataset caveat.
    assert "91.94" in table_row(md, "| evaluate: model |") and "88.06" in table_row(md, "| evaluate: EMA |")
    assert table_row(md, "| vig_h_base | 84.2 |") and table_row(md, "| vig_tiny | 77.2 |")
    assert "not comparable with the paper's ImageNet numbers" in md
    # Speed claims: ratios from the benchmark JSON of this run, one row per baseline variant and dtype.
    benchmark = json.loads((FIXTURES / "benchmark_full.json").read_text())
    for claim in report.PAPER_SPEED_CLAIMS:
        ratios = [r for r in benchmark["ratios"] if r["model"] == claim.model and r["resolution"] == claim.resolution
                  and r["mode"] == "eval" and r["baseline"].startswith(claim.baseline)]  # fmt: skip
        assert len(ratios) == 4  # fused/plain x fp32/bf16
        for ratio in ratios:
            row = table_row(md, claim.text, f"{ratio['model']} vs {ratio['baseline']}", f"| {ratio['dtype']} |")
            if claim.quantity == "speedup":
                assert f"| {ratio['speedup']:.2f}x |" in row
                verdict = "holds" if ratio["speedup"] >= claim.paper else f"{claim.paper / ratio['speedup']:.2f}x below"
                assert verdict in row
            else:  # CPU: no allocator statistics, so no memory ratio
                assert "| - | not measured (peak memory is measured on CUDA only) |" in row
    assert "reduced CPU sweep" in md
    # The whole sweep, one table per mode and dtype.
    for result in benchmark["results"]:
        assert f"*{result['mode']}, {result['dtype']}: images/s (peak GiB)*" in md
        assert table_row(md, f"| {result['label']} |", f"{result['images_per_s']:,.1f}")
    assert "Reference numbers measured elsewhere, not by this run" in md
    assert table_row(md, "official ViG-T, eval path, fp32", "6,422 (0.90)")
    # Environment and runs.
    assert table_row(md, "| git commit | c0ffee |") and table_row(md, "| pipeline id | pipe-A |")
    assert benchmark["environment"]["device"] in table_row(md, "| benchmark device |")
    assert table_row(md, "| pretrain |", pretrain_run, "#/experiments/")

    figures = sorted(p.name for p in (pipeline_root / "reports" / report.FIGURES_DIR).iterdir())
    assert figures == ["benchmark_memory.png", "benchmark_throughput.png", "training_curves.png"]
    for name in figures:
        path = pipeline_root / "reports" / report.FIGURES_DIR / name
        assert f"]({report.FIGURES_DIR}/{name})" in md
        assert_png(path.read_bytes())
        with Image.open(path) as image:
            image.verify()
    page = outputs["html"].read_text()
    inline = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(inline) == 3
    for data in inline:
        assert_png(base64.b64decode(data))
    assert page.count("<table>") == sum(line.startswith("|---") for line in md.splitlines())
    assert "<h2>Speed and memory (benchmark)</h2>" in page and "<strong>This run had no GPU" in page


def test_report_builds_before_any_stage_ran(tmp_path, store):
    inputs = report.gather(tmp_path, {**PARAMS, "experiment": "never-run"}, store, "pipe-A", "c0ffee")
    outputs = report.build_report(inputs, tmp_path / "reports", "empty")
    md = outputs["markdown"].read_text()
    for stage in report.STAGES:
        assert table_row(md, f"| {stage} | not run |")
    assert "`benchmark` not run." in md and "`pretrain` not run." in md
    assert "no MLflow experiment named 'never-run'" in md
    assert "data:image/png" not in outputs["html"].read_text()


def test_runs_of_another_pipeline_are_used_only_when_none_has_this_id(tmp_path, store):
    run_id = log_stage("fallback", "pretrain", "pipe-B", {"train/loss": [(0, 2.0), (1, 1.0)]})
    inputs = report.gather(tmp_path, {**PARAMS, "experiment": "fallback"}, store, "pipe-A", "c0ffee")
    assert inputs.runs["pretrain"].run_id == run_id and inputs.curves == {"train/loss": [(0, 2.0), (1, 1.0)]}
    assert "no run is tagged pipeline_id=pipe-A" in inputs.run_selection


def test_memory_claim_is_checked_against_peak_memory_of_a_gpu_run():
    """Real H200 cells (vig_tiny vs DeiT-T at 1024, fused and plain attention): the memory claim gets a verdict."""
    benchmark = json.loads((FIXTURES / "benchmark_full_h200_1024.json").read_text())
    claim = next(c for c in report.PAPER_SPEED_CLAIMS if c.quantity == "memory_saving")
    rows = [row for row in report.claim_rows(benchmark) if row[0] == claim.text]
    assert len(rows) == 4
    for ratio in (r for r in benchmark["ratios"] if r["resolution"] == 1024):
        row = next(row for row in rows if row[2] == f"{ratio['model']} vs {ratio['baseline']}" and row[3] == ratio["dtype"])
        saving = 1 - ratio["memory_ratio"]
        percent = round(100 * saving)
        assert row[4] == (f"{percent}% less" if percent >= 0 else f"{-percent}% more")
        expected = "holds" if saving >= claim.paper else f"falls short by {100 * (claim.paper - saving):.0f} points"
        assert row[5] == expected


def test_report_stage_runs_after_every_stage_whose_metrics_it_reports():
    """dvc orders stages by their deps only: the report must depend on each stage's metrics file to run last."""
    stages = yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())["stages"]
    report_deps = set(stages["report"]["deps"])
    for name, stage in stages.items():
        metrics = [entry if isinstance(entry, str) else next(iter(entry)) for entry in stage.get("metrics", [])]
        if name != "report":
            assert name in report.STAGES and metrics and set(metrics) <= report_deps, name
    assert set(report.STAGES) == set(stages) - {"report"}
