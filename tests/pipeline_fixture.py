"""One real run of the whole DVC pipeline with smoke-sized params, shared by the UI, rerun and experiment tests.

`smoke_pipeline` (session scope) copies the repository (the files git knows, ignored ones left out) into a
temporary folder, makes it a git repository of its own, writes smoke params (the real params.yaml with the
smallest sizes) and runs ``python -m pipelines.repro`` there once. It works with whatever stages dvc.yaml holds,
and tests ask it for `stages` (read from dvc.yaml), so their checks grow as stages land.

`pretrain_rerun` (session scope, after it) changes one pretrain param in that project, commits, and runs the
pipeline again: the rerun tests check what reran, the UI test compares the two pretrain runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINE_TIMEOUT_S = 900
RERUN_STAGE = "pretrain"
RERUN_PARAM = "pretrain.optim.base_lr"  # changes the training, not its length

# Smallest sizes that still exercise every stage; a key is applied only where params.yaml has it, so the
# fixture follows params.yaml as stages land.
SMOKE_OVERRIDES: dict[str, Any] = {
    "data.embedded.detection": {"train": 24, "val": 8},
    "data.embedded.segmentation": {"train": 24, "val": 8},
    "shard.workers": 1,
    # pretrain keeps the Ray Train path (one worker: a second one would only queue on 2 cores). The stages after
    # it run in-process: on a 2-core machine each Ray start and stop costs ~35 s of waiting (evaluate: 44 s on
    # Ray, 7 s in-process, the same CPU time), paid twice per stage here (pipeline and rerun).
    "pretrain.num_workers": 1,
    "pretrain.progress_bar": False,
    "pretrain.optim.epochs": 1,
    "pretrain.optim.warmup_epochs": 0,
    "evaluate.backend": "local",
    "finetune_det.backend": "local",
    "finetune_det.progress_bar": False,
    "finetune_det.epochs": 1,
    "finetune_det.lr_steps": [1],
    "finetune_det.optim.warmup_iters": 2,
    "finetune_seg.backend": "local",
    "finetune_seg.progress_bar": False,
    "finetune_seg.iterations": 6,
    "finetune_seg.optim.warmup_iters": 2,
    "evaluate_seg.modes": ["whole"],
    "benchmark.cpu.dtypes": ["fp32"],
    "benchmark.cpu.eval": {"resolutions": [64], "batch_sizes": [2], "warmup": 1, "iters": 1},
    "benchmark.cpu.train": {"dtype": "fp32", "resolutions": [64], "batch_sizes": [2], "warmup": 1, "iters": 1},
}


def stage_outputs(root: Path) -> dict[str, list[str]]:
    """Each stage's outputs (outs, metrics and plots in dvc.yaml), as paths relative to `root`."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return {
        name: [entry if isinstance(entry, str) else next(iter(entry))
               for kind in ("outs", "metrics", "plots") for entry in spec.get(kind, [])]
        for name, spec in stages.items()
    }  # fmt: skip


def _is_under(name: str, paths: list[str]) -> bool:
    return any(name == path or name.startswith(f"{path}/") for path in paths)


def copy_repository(dest: Path) -> Path:
    """Copy the sources git tracks or would track (not ignored files, nor pipeline outputs left in this checkout)
    to `dest` and make `dest` a git repository with one commit, as a fresh clone would be."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    outputs = [path for paths in stage_outputs(REPO_ROOT).values() for path in paths]
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file() and not _is_under(name, outputs):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    git(dest, "init", "-q")
    git(dest, "config", "user.name", "vig tests")
    git(dest, "config", "user.email", "tests@vig.invalid")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "test copy")
    return dest


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout


def project_env(root: Path) -> dict[str, str]:
    """Environment for commands run in a project copy: its own MLflow store (the default one, at its root),
    the venv's `python` first on PATH (DVC stage commands say `python -m stages...`), nothing inherited that
    would point a stage elsewhere."""
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("MLFLOW_TRACKING_URI", "VIG_ROOT", "VIG_PIPELINE_ID", "RAY_ADDRESS")}  # fmt: skip
    return {**inherited, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip


def run(root: Path, *command: str, timeout_s: float = PIPELINE_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run `command` in the project copy; fail the test with its output if it fails."""
    done = subprocess.run(
        list(command), cwd=root, env=project_env(root), capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {done.returncode}\n--- stdout\n{done.stdout[-6000:]}\n"
                    f"--- stderr\n{done.stderr[-6000:]}")  # fmt: skip
    return done


def smoke_params(params: dict[str, Any]) -> dict[str, Any]:
    """params with SMOKE_OVERRIDES applied where the key exists."""
    for dotted, value in SMOKE_OVERRIDES.items():
        *parents, key = dotted.split(".")
        section = params
        for name in parents:
            section = section.get(name) if isinstance(section, dict) else None
        if isinstance(section, dict) and key in section:
            section[key] = value
    return params


def write_smoke_params(root: Path) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(smoke_params(params), sort_keys=False))


def dvc_stages(root: Path) -> list[str]:
    return list((yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {})


@dataclass(frozen=True)
class PipelineRun:
    root: Path
    stages: list[str]
    pipeline_id: str
    experiment: str
    seconds: float

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlruns.db'}"

    def clone(self, dest: Path) -> Path:
        """A copy of the finished project (git, DVC state, outputs) with an empty MLflow store of its own."""
        shutil.copytree(self.root, dest, symlinks=True, ignore=shutil.ignore_patterns("mlruns.db", "mlartifacts"))
        return dest


@pytest.fixture(scope="session")
def smoke_pipeline(tmp_path_factory: pytest.TempPathFactory) -> PipelineRun:
    root = copy_repository(tmp_path_factory.mktemp("smoke-pipeline"))
    write_smoke_params(root)
    git(root, "commit", "-q", "-am", "smoke params")
    pipeline_id = "smoke-" + os.urandom(4).hex()
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.repro"], cwd=root, env={**project_env(root), "VIG_PIPELINE_ID": pipeline_id},
        capture_output=True, text=True, timeout=PIPELINE_TIMEOUT_S, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.fail(f"smoke pipeline failed ({done.returncode})\n{done.stdout[-8000:]}\n{done.stderr[-8000:]}")
    params = yaml.safe_load((root / "params.yaml").read_text())
    return PipelineRun(
        root=root,
        stages=dvc_stages(root),
        pipeline_id=pipeline_id,
        experiment=params.get("experiment", "vig"),
        seconds=time.monotonic() - started,
    )


def dvc_downstream(root: Path, stage: str) -> set[str]:
    """Stages that depend on `stage`, directly or through others, by DVC's own pipeline graph."""
    import networkx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # an edge points from a stage to a stage it depends on
        node = next(node for node in graph.nodes if getattr(node, "name", None) == stage)
        return {node.name for node in networkx.ancestors(graph, node)}


def get_param(params: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        params = params[key]
    return params


def set_param(params: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, key = dotted.split(".")
    for name in parents:
        params = params[name]
    params[key] = value


@dataclass(frozen=True)
class ParamRerun:
    pipeline: PipelineRun
    stage: str
    param: str
    old: Any
    new: Any
    pipeline_id: str
    rerun_expected: set[str]  # the changed stage and everything downstream of it
    dvc_output: str
    output_mtimes_before: dict[str, dict[str, int]]  # stage -> file -> mtime
    output_mtimes_after: dict[str, dict[str, int]]


def _output_mtimes(root: Path) -> dict[str, dict[str, int]]:
    """Modification times of every file each stage wrote (its outs, metrics and plots), by stage."""
    mtimes: dict[str, dict[str, int]] = {}
    for stage, paths in stage_outputs(root).items():
        files = [f for path in paths for f in ([root / path] if (root / path).is_file() else (root / path).rglob("*"))]
        mtimes[stage] = {str(f.relative_to(root)): f.stat().st_mtime_ns for f in files if f.is_file()}
    return mtimes


@pytest.fixture(scope="session")
def pretrain_rerun(smoke_pipeline: PipelineRun) -> ParamRerun:
    root = smoke_pipeline.root
    assert RERUN_STAGE in smoke_pipeline.stages, f"the smoke pipeline ran no {RERUN_STAGE} stage"
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "smoke pipeline results")
    params = yaml.safe_load((root / "params.yaml").read_text())
    old = get_param(params, RERUN_PARAM)
    new = old / 2
    set_param(params, RERUN_PARAM, new)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = _output_mtimes(root)
    pipeline_id = "rerun-" + os.urandom(4).hex()
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.repro"], cwd=root, env={**project_env(root), "VIG_PIPELINE_ID": pipeline_id},
        capture_output=True, text=True, timeout=PIPELINE_TIMEOUT_S, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.fail(f"rerun after {RERUN_PARAM}={new} failed ({done.returncode})\n{done.stdout[-8000:]}\n"
                    f"{done.stderr[-8000:]}")  # fmt: skip
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", f"{RERUN_PARAM}={new}")
    return ParamRerun(
        pipeline=smoke_pipeline, stage=RERUN_STAGE, param=RERUN_PARAM, old=old, new=new, pipeline_id=pipeline_id,
        rerun_expected={RERUN_STAGE, *dvc_downstream(root, RERUN_STAGE)}, dvc_output=done.stdout + done.stderr,
        output_mtimes_before=before, output_mtimes_after=_output_mtimes(root),
    )  # fmt: skip
