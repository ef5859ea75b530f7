"""The pipeline report: every stage's metrics beside the paper's numbers, speed claims checked, curves and plots.

Sources: the metrics files the stages write (metrics/<stage>.json, reports/benchmark_full.json) and the
MLflow runs of this pipeline execution (tag `pipeline_id`), whose metric history gives the training
curves. A stage with neither is listed as "not run", so the report builds at any point of the pipeline.
Output: reports/report.md (figures as files beside it) and reports/report.html (figures inline).
"""
from __future__ import annotations

import base64
import html
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vig.atomic import atomic_path, write_bytes
from vig.benchmark import COMPILED_SUFFIX, OUT_OF_MEMORY, plot_benchmark
from vig.params import flatten

# The pipeline's stages in DESIGN.md order, each with the metrics file it writes.
STAGES = ("prepare", "shard", "pretrain", "evaluate", "finetune_det", "evaluate_det", "finetune_seg", "evaluate_seg",
          "benchmark")  # fmt: skip
FIGURES_DIR = "report_figures"
REPORT_MD, REPORT_HTML = "report.md", "report.html"

# ImageNet-1k top-1 (%) of the released models (paper, Tables 1-2).
PAPER_TOP1 = {"vig_tiny": 77.2, "vig_small": 81.7, "vig_base": 82.6, "vig_h_tiny": 82.8, "vig_h_small": 83.8,
              "vig_h_base": 84.2}  # fmt: skip


@dataclass(frozen=True)
class SpeedClaim:
    """One speed/memory claim of the paper's abstract, as a ratio of our model's cell to a baseline's."""

    text: str
    model: str
    baseline: str  # baseline label without the attention suffix
    resolution: int
    quantity: str  # "speedup" (ours/baseline img/s) or "memory_saving" (1 - ours/baseline peak memory)
    paper: float


PAPER_SPEED_CLAIMS = (
    SpeedClaim("ViG-S runs 2x faster than DeiT-B at 224x224", "vig_small", "deit_base", 224, "speedup", 2.0),
    SpeedClaim("ViG-T runs 4.8x faster than DeiT-T at 1024x1024", "vig_tiny", "deit_tiny", 1024, "speedup", 4.8),
    SpeedClaim("ViG-T saves 90% GPU memory vs DeiT-T at 1024x1024", "vig_tiny", "deit_tiny", 1024, "memory_saving",
               0.90),
)  # fmt: skip

# BENCHMARK.md: measured on one NVIDIA H100 80GB HBM3 (2026-11-25, torch 2.11, Triton 3.6, timm 1.0.31) with
# the released hustvl/ViG code (commit dfb9d32). Eval images/s (peak GiB) at 224/bs256, 512/bs64, 1024/bs16.
REFERENCE_H100 = (
    ("DeiT-T fused attention, fp32", "10,262 (0.68)", "1,370 (0.85)", "155 (0.85)"),
    ("DeiT-T fused attention, fp16 autocast", "33,033 (0.54)", "5,541 (0.67)", "1,021 (0.67)"),
    ("DeiT-T plain attention, fp32", "9,187 (0.72)", "1,136 (2.12)", "123 (6.62)"),
    ("official ViG-T, eval path, fp32", "6,422 (0.90)", "984 (1.06)", "119 (1.06)"),
    ("official ViG-T, eval path, fp16", "8,729 (0.74)", "1,248 (0.86)", "119 (0.86)"),
    ("official ViG-T, training path, fp32", "5,630 (1.10)", "1,185 (1.18)", "277 (1.18)"),
)
REFERENCE_H100_NOTES = (
    "2048 (batch 4): DeiT-T fp32 12.5, fp16 121.9 img/s; official ViG-T fp32 9.7, fp16 8.6 img/s.",
    "224, batch 256, fp32 / fp16 autocast img/s: DeiT-S 4,028 / 18,573; DeiT-B 1,247 / 8,364; "
    "official ViG-S 2,736 / 5,327 (ViG-S vs DeiT-B: 2.19x in fp32, 0.64x in fp16).",
    "Training, bf16 autocast, img/s: DeiT-T 224/bs128 3,943-5,173 (two runs); official ViG-T 224/bs128 985 "
    "(4.07 GiB); DeiT-T 1024/bs8 224; official ViG-T 1024/bs8 66 (4.96 GiB).",
)


# ---------------------------------------------------------------------------------------------------------------
# Document model, rendered to Markdown and to HTML.


@dataclass
class Table:
    header: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Section:
    title: str
    blocks: list[str | Table | Figure] = field(default_factory=list)  # str: a paragraph


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def render_markdown(title: str, sections: list[Section], base: Path) -> str:
    """Markdown with figures linked relative to `base` (the report's folder)."""
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                if block.caption:
                    lines += [f"*{block.caption}*", ""]
                lines.append("| " + " | ".join(block.header) + " |")
                lines.append("|" + "---|" * len(block.header))
                lines += ["| " + " | ".join(_cell(v).replace("|", "\\|") for v in row) + " |" for row in block.rows]
            elif isinstance(block, Figure):
                lines.append(f"![{block.caption}]({os.path.relpath(block.path, base)})")
            else:
                lines.append(block)
            lines.append("")
    return "\n".join(lines)


def render_html(title: str, sections: list[Section]) -> str:
    """One self-contained HTML page: figures inline as base64 PNG."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        f'<html><head><meta charset="utf-8"><title>{esc(title)}</title><style>'
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:left}"
        "th{background:#eee}img{max-width:100%}caption{font-style:italic;text-align:left}"
        "</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<h2>{esc(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Table):
                parts.append("<table>")
                if block.caption:
                    parts.append(f"<caption>{esc(block.caption)}</caption>")
                parts.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in block.header) + "</tr>")
                for row in block.rows:
                    parts.append("<tr>" + "".join(f"<td>{esc(_cell(v))}</td>" for v in row) + "</tr>")
                parts.append("</table>")
            elif isinstance(block, Figure):
                data = base64.b64encode(block.path.read_bytes()).decode()
                parts.append(
                    f'<figure><img alt="{esc(block.caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{esc(block.caption)}</figcaption></figure>"
                )
            else:
                parts.append(f"<p>{_inline_markup(esc(block))}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _inline_markup(text: str) -> str:
    """The Markdown the report's paragraphs use: `code` and **bold**."""
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


# ---------------------------------------------------------------------------------------------------------------
# Inputs: metrics files and MLflow runs.


@dataclass
class StageRun:
    """A stage's MLflow run as the report uses it."""

    stage: str
    run_id: str
    experiment_id: str
    status: str
    start_time: int  # ms since the epoch
    metrics: dict[str, float]


@dataclass
class ReportInputs:
    metrics: dict[str, dict[str, Any]]  # stage -> its metrics file
    benchmark: dict[str, Any] | None  # reports/benchmark_full.json
    runs: dict[str, StageRun]  # stage -> MLflow run
    curves: dict[str, list[tuple[int, float]]]  # pretrain metric -> (step, value) history
    run_selection: str  # how the runs were chosen
    params: dict[str, Any]
    pipeline_id: str
    tracking_uri: str
    git_commit: str


def read_metrics(metrics_dir: Path) -> dict[str, dict[str, Any]]:
    """Every stage's metrics file that exists; a stage without one is simply absent."""
    found = {}
    for stage in STAGES:
        path = metrics_dir / f"{stage}.json"
        if path.exists():
            found[stage] = json.loads(path.read_text())
    return found


def find_runs(tracking_uri: str, experiment: str, pipeline_id: str, exclude_run: str | None = None) -> tuple[
    dict[str, StageRun], str
]:
    """The latest run of each stage tagged with `pipeline_id`; if there is none, the latest of each stage overall."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}, f"no MLflow experiment named {experiment!r} in {tracking_uri}"
    selections = [
        (f"tags.pipeline_id = '{pipeline_id}'", f"runs tagged pipeline_id={pipeline_id}"),
        ("", f"no run is tagged pipeline_id={pipeline_id} (report run outside `dvc repro`?): "
             "the latest run of each stage"),
    ]  # fmt: skip
    for filter_string, description in selections:
        runs: dict[str, StageRun] = {}
        for run in client.search_runs(
            [found.experiment_id], filter_string=filter_string, order_by=["attributes.start_time DESC"]
        ):
            stage = run.data.tags.get("stage")
            if stage in STAGES and stage not in runs and run.info.run_id != exclude_run:
                runs[stage] = StageRun(
                    stage, run.info.run_id, run.info.experiment_id, run.info.status, run.info.start_time,
                    dict(run.data.metrics),
                )  # fmt: skip
        if runs:
            return runs, description
    return {}, f"no stage runs in MLflow experiment {experiment!r}"


def metric_histories(tracking_uri: str, run: StageRun) -> dict[str, list[tuple[int, float]]]:
    """Every metric of `run` logged at more than one step, as (step, value) sorted by step."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    curves = {}
    for key in sorted(run.metrics):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.run_id, key))
        if len(history) > 1:
            curves[key] = history
    return curves


def gather(
    root: Path,
    params: dict[str, Any],
    tracking_uri: str,
    pipeline_id: str,
    git_commit: str,
    exclude_run: str | None = None,
) -> ReportInputs:
    """Everything the report shows, from the metrics files under `root` and the MLflow store."""
    metrics = read_metrics(root / "metrics")
    benchmark_file = root / "reports" / "benchmark_full.json"
    benchmark = json.loads(benchmark_file.read_text()) if benchmark_file.exists() else None
    runs, selection = find_runs(tracking_uri, params.get("experiment", "vig"), pipeline_id, exclude_run)
    curves = metric_histories(tracking_uri, runs["pretrain"]) if "pretrain" in runs else {}
    return ReportInputs(metrics, benchmark, runs, curves, selection, params, pipeline_id, tracking_uri, git_commit)


# ---------------------------------------------------------------------------------------------------------------
# Sections.


def run_link(tracking_uri: str, run: StageRun) -> str:
    """The run's page: on the tracking server, or in `vig-ui` (default port) for a local store."""
    page = f"#/experiments/{run.experiment_id}/runs/{run.run_id}"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    return f"http://127.0.0.1:5000/{page} (start `vig-ui`)"


def stages_section(inputs: ReportInputs) -> Section:
    rows = []
    for stage in STAGES:
        run = inputs.runs.get(stage)
        ran = stage in inputs.metrics or run is not None
        rows.append([
            stage,
            "ran" if ran else "not run",
            f"metrics/{stage}.json" if stage in inputs.metrics else "-",
            run.run_id if run else "-",
            run.status if run else "-",
        ])  # fmt: skip
    header = ["stage", "status", "metrics file", "MLflow run", "run status"]
    return Section("Stages", [f"MLflow runs: {inputs.run_selection}.", Table(header, rows)])


def _model_name(params: dict[str, Any]) -> str | None:
    return ((params.get("pretrain") or {}).get("model") or {}).get("name")


def _dataset_name(params: dict[str, Any]) -> str:
    data = params.get("data") or {}
    if data.get("imagenet"):
        return f"ImageNet ({data['imagenet']})"
    if data.get("source") not in (None, "embedded"):
        return f"ImageNet under {data['source']}"
    return "DigitScenes (the embedded digits data)"


def classification_section(inputs: ReportInputs) -> Section:
    section = Section("Classification (ImageNet top-1 beside the paper)")
    evaluate, pretrain = inputs.metrics.get("evaluate"), inputs.metrics.get("pretrain")
    dataset = _dataset_name(inputs.params)
    model = _model_name(inputs.params)
    if evaluate is None and pretrain is None:
        section.blocks.append("The pretrain and evaluate stages have not run.")
    else:
        rows = []
        if evaluate is not None:
            rows += [["evaluate: model", evaluate.get("top1"), evaluate.get("top5"), evaluate.get("samples")]]
            if "ema_top1" in evaluate:
                rows += [["evaluate: EMA", evaluate["ema_top1"], evaluate.get("ema_top5"), evaluate.get("samples")]]
        if pretrain is not None:
            rows += [[f"pretrain: best ({pretrain.get('best_source', '?')}, epoch {pretrain.get('best_epoch', '?')})",
                      pretrain.get("best_top1"), None, None]]  # fmt: skip
        comparable = dataset.startswith("ImageNet")
        paper = PAPER_TOP1.get(model or "")
        note = (
            f"Model `{model}` trained and evaluated on {dataset}."
            + ("" if comparable else " These accuracies are not comparable with the paper's ImageNet numbers.")
        )
        section.blocks += [note, Table(["this run", "top-1 (%)", "top-5 (%)", "val images"], rows)]
        if paper is not None and comparable and evaluate is not None and evaluate.get("top1") is not None:
            best = max(evaluate["top1"], evaluate.get("ema_top1", float("-inf")))
            section.blocks.append(f"Paper: {paper}% for `{model}`; this run: {best:.2f}% ({best - paper:+.2f} points).")
    paper_rows = [[name, top1] for name, top1 in PAPER_TOP1.items()]
    section.blocks.append(Table(["released model (paper)", "ImageNet-1k top-1 (%)"], paper_rows))
    return section


def dense_section(inputs: ReportInputs) -> Section:
    section = Section("Detection and segmentation")
    for stage, task in (("evaluate_det", "COCO-style detection / instance segmentation"),
                        ("evaluate_seg", "ADE20K-style semantic segmentation")):  # fmt: skip
        metrics = inputs.metrics.get(stage)
        if metrics is None:
            section.blocks.append(f"{task}: `{stage}` not run.")
        else:
            section.blocks.append(Table(["metric", "value"], [[k, v] for k, v in flatten(metrics).items()],
                                        caption=f"{task} ({stage})"))  # fmt: skip
    section.blocks.append(
        "The paper's COCO and ADE20K numbers are not quoted here: this report only prints numbers it can source."
    )
    return section


def claim_rows(benchmark: dict[str, Any]) -> list[list[Any]]:
    """For each speed claim: our ratio from the same benchmark run, per baseline attention and dtype."""
    rows = []
    for claim in PAPER_SPEED_CLAIMS:
        matching = [
            r for r in benchmark["ratios"]
            if r["model"].removesuffix(COMPILED_SUFFIX) == claim.model and r["mode"] == "eval"
            and r["resolution"] == claim.resolution
            and r["baseline"].removesuffix(COMPILED_SUFFIX).rsplit("_", 1)[0] == claim.baseline
        ]  # fmt: skip
        if not matching:
            rows.append([claim.text, _claim_value(claim, claim.paper), "not measured", "-", "-", "-"])
        for ratio in matching:
            ours = None
            if ratio["status"] == "ok":
                ours = ratio["speedup"] if claim.quantity == "speedup" else (
                    None if ratio["memory_ratio"] is None else 1 - ratio["memory_ratio"]
                )
            if ours is not None:
                measured, verdict = _claim_value(claim, ours), _verdict(claim, ours)
            elif ratio["status"] == "ok":
                measured, verdict = "-", "not measured (peak memory is measured on CUDA only)"
            else:
                measured, verdict = ratio["status"], "not measured"
            pair = f"{ratio['model']} vs {ratio['baseline']}"
            rows.append([claim.text, _claim_value(claim, claim.paper), pair, ratio["dtype"], measured, verdict])
    return rows


def _claim_value(claim: SpeedClaim, value: float | None) -> str:
    if value is None:
        return "-"
    if claim.quantity == "speedup":
        return f"{value:.2f}x"
    percent = round(100 * value)
    return f"{percent}% less" if percent >= 0 else f"{-percent}% more"


def _verdict(claim: SpeedClaim, ours: float) -> str:
    if ours >= claim.paper:
        return "holds"
    if claim.quantity == "speedup":
        return f"falls short: {claim.paper / ours:.2f}x below the claim"
    return f"falls short by {100 * (claim.paper - ours):.0f} points"


def _sweep_tables(benchmark: dict[str, Any]) -> list[Table]:
    tables = []
    for mode in ("eval", "train"):
        cells = [r for r in benchmark["results"] if r["mode"] == mode]
        for dtype in dict.fromkeys(r["dtype"] for r in cells):
            chosen = [r for r in cells if r["dtype"] == dtype]
            columns = sorted({(r["resolution"], r["batch"]) for r in chosen})
            rows = []
            for label in dict.fromkeys(r["label"] for r in chosen):
                by_cell = {(r["resolution"], r["batch"]): r for r in chosen if r["label"] == label}
                rows.append([label, *(_sweep_cell(by_cell.get(c)) for c in columns)])
            header = ["model", *(f"{res} px, batch {batch}" for res, batch in columns)]
            tables.append(Table(header, rows, caption=f"{mode}, {dtype}: images/s (peak GiB)"))
    return tables


def _sweep_cell(result: dict[str, Any] | None) -> str:
    if result is None:
        return "-"
    if result["status"] != "ok":
        return "OOM" if result["status"] == OUT_OF_MEMORY else result["status"]
    memory = "" if result["peak_memory_gib"] is None else f" ({result['peak_memory_gib']:.2f})"
    return f"{result['images_per_s']:,.1f}{memory}"


def speed_section(inputs: ReportInputs, figures_dir: Path) -> Section:
    section = Section("Speed and memory (benchmark)")
    benchmark = inputs.benchmark
    if benchmark is None:
        section.blocks.append("`benchmark` not run.")
    else:
        env = benchmark["environment"]
        protocol = benchmark["protocol"]
        section.blocks.append(
            f"Measured by this run on **{env['device']}** (torch {env['torch']}, Triton {env['triton']}, "
            f"timm {env['timm']}): eval {protocol['warmup']} warm-up + {protocol['iters']} timed passes per cell"
            + (f", capped at {protocol['max_seconds']} s per cell (passes per cell in reports/benchmark_full.json)"
               if protocol.get("max_seconds") else "")
            + "; baselines measured in the same process. Ratios are ours / baseline of the same cell."
        )  # fmt: skip
        if benchmark["on_cpu"]:
            section.blocks.append(
                "**This run had no GPU: it measured the reduced CPU sweep, which checks the machinery; "
                "its numbers say nothing about the paper's GPU claims.**"
            )
        section.blocks.append(Table(
            ["paper claim", "paper", "ours vs baseline", "dtype", "this run", "verdict"], claim_rows(benchmark),
            caption="The abstract's speed claims (the paper measured fp32 on an RTX 4090)",
        ))  # fmt: skip
        section.blocks += _sweep_tables(benchmark)
        for path in plot_benchmark(benchmark, figures_dir):
            section.blocks.append(Figure(path, path.stem.replace("_", " ")))
    section.blocks.append(
        "Reference numbers measured elsewhere, not by this run (BENCHMARK.md: one NVIDIA H100 80GB HBM3, "
        "2026-11-25, torch 2.11, Triton 3.6, timm 1.0.31, released hustvl/ViG code):"
    )
    section.blocks.append(Table(["model (reference, H100)", "224, bs 256", "512, bs 64", "1024, bs 16"],
                                [list(row) for row in REFERENCE_H100],
                                caption="Eval images/s (peak GiB), measured elsewhere"))  # fmt: skip
    section.blocks += list(REFERENCE_H100_NOTES)
    return section


def curves_section(inputs: ReportInputs, figures_dir: Path, max_panels: int) -> Section:
    section = Section("Training curves (pretrain, from MLflow)")
    if "pretrain" not in inputs.runs:
        if "pretrain" in inputs.metrics:
            section.blocks.append("`pretrain` ran (metrics/pretrain.json), but no MLflow run of it was found.")
        else:
            section.blocks.append("`pretrain` not run.")
    elif not inputs.curves:
        section.blocks.append("The pretrain run logged no metric at more than one step.")
    else:
        path = plot_curves(inputs.curves, figures_dir / "training_curves.png", max_panels)
        section.blocks.append(Figure(path, f"pretrain run {inputs.runs['pretrain'].run_id}"))
    return section


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path, max_panels: int) -> Path:
    """One panel per metric family (a metric and its `ema_` twin share one), against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[str]] = {}
    for key in curves:
        panels.setdefault(key.replace("ema_", ""), []).append(key)
    names = list(panels)[:max_panels]
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.5 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for key in panels[name]:
            ax.plot(*zip(*curves[key]), marker="." if len(curves[key]) < 50 else None, label=key)
        ax.set(xlabel="step", title=name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def stage_metrics_section(inputs: ReportInputs) -> Section:
    """Every metrics file as written (the benchmark's is summarised above)."""
    section = Section("Metrics of every stage")
    for stage in STAGES:
        if stage == "benchmark":
            continue
        if stage not in inputs.metrics:
            section.blocks.append(f"`{stage}`: not run.")
            continue
        rows = [[key, value] for key, value in flatten(inputs.metrics[stage]).items()]
        section.blocks.append(Table(["metric", "value"], rows, caption=f"metrics/{stage}.json"))
    return section


def environment_section(inputs: ReportInputs) -> Section:
    import platform

    import torch

    rows = [
        ["git commit", inputs.git_commit],
        ["pipeline id", inputs.pipeline_id],
        ["MLflow tracking URI", inputs.tracking_uri],
        ["report built", time.strftime("%Y-%m-%d %H:%M:%S %Z")],
        ["report machine", f"Python {platform.python_version()}, torch {torch.__version__}"],
    ]
    if inputs.benchmark is not None:
        rows += [[f"benchmark {key}", value] for key, value in inputs.benchmark["environment"].items()]
    return Section("Environment", [Table(["item", "value"], rows)])


def runs_section(inputs: ReportInputs) -> Section:
    rows = [
        [run.stage, run.run_id, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.start_time / 1000)),
         run_link(inputs.tracking_uri, run)]
        for run in sorted(inputs.runs.values(), key=lambda r: STAGES.index(r.stage))
    ]  # fmt: skip
    blocks: list[str | Table | Figure] = [f"Selection: {inputs.run_selection}."]
    blocks.append(Table(["stage", "run id", "started", "link"], rows) if rows else "No MLflow runs found.")
    return Section("MLflow runs", blocks)


def build_report(inputs: ReportInputs, out_dir: Path, title: str, max_curve_panels: int = 9) -> dict[str, Path]:
    """Write report.md, report.html and their figures into `out_dir`; returns the paths written."""
    figures_dir = out_dir / FIGURES_DIR
    figures_dir.mkdir(parents=True, exist_ok=True)
    sections = [
        stages_section(inputs),
        classification_section(inputs),
        dense_section(inputs),
        speed_section(inputs, figures_dir),
        curves_section(inputs, figures_dir, max_curve_panels),
        stage_metrics_section(inputs),
        environment_section(inputs),
        runs_section(inputs),
    ]
    markdown, page = out_dir / REPORT_MD, out_dir / REPORT_HTML
    write_bytes(markdown, render_markdown(title, sections, out_dir).encode())
    write_bytes(page, render_html(title, sections).encode())
    figures = [block.path for s in sections for block in s.blocks if isinstance(block, Figure)]
    return {"markdown": markdown, "html": page, **{f"figure:{p.name}": p for p in figures}}
