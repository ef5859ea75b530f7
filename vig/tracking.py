"""MLflow tracking shared by every stage: one run per stage execution, grouped by pipeline id.

Default store: ``sqlite:///<root>/mlruns.db`` with artifacts under ``<root>/mlartifacts``;
``MLFLOW_TRACKING_URI`` overrides the store. Experiments are created with an absolute artifact
location because Ray workers log from another working directory.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vig.params import flatten, load_params, project_root

PIPELINE_ID_ENV = "VIG_PIPELINE_ID"
_MLFLOW_PARAM_BATCH = 100  # MLflow's limit on params per logging request
_MLFLOW_PARAM_VALUE_MAX = 6000


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlruns.db'}"


def artifact_root() -> Path:
    return project_root() / "mlartifacts"


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root or project_root(), capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _dvc_ancestor() -> str | None:
    """'<pid>-<start time>' of the `dvc` process that launched this stage, if any (Linux /proc)."""
    pid = os.getppid()
    while pid > 1:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        # The command name in /proc/pid/stat may contain spaces; fields after the closing ')' are fixed.
        fields = stat[stat.rindex(")") + 2 :].split()
        if any(Path(arg.decode(errors="replace")).name in ("dvc", "dvc.exe") for arg in cmdline[:2]) or (
            len(cmdline) > 2 and cmdline[1:3] == [b"-m", b"dvc"]
        ):
            return f"{pid}-{fields[19]}"
        pid = int(fields[1])
    return None


def pipeline_id() -> str:
    """Shared by all stages of one `dvc repro`: $VIG_PIPELINE_ID, else derived from the parent dvc process."""
    if os.environ.get(PIPELINE_ID_ENV):
        return os.environ[PIPELINE_ID_ENV]
    ancestor = _dvc_ancestor()
    if ancestor is not None:
        return hashlib.sha1(ancestor.encode()).hexdigest()[:12]
    return uuid.uuid4().hex[:12]


def setup_experiment(name: str) -> str:
    """Point MLflow at the project store and make sure `name` exists with an absolute artifact location."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        location = artifact_root() / name
        location.mkdir(parents=True, exist_ok=True)
        experiment_id = mlflow.create_experiment(name, artifact_location=location.as_uri())
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def log_params(params: dict[str, Any], prefix: str = "") -> None:
    import mlflow

    flat = {k: (json.dumps(v) if isinstance(v, (list, tuple)) else v) for k, v in flatten(params, prefix).items()}
    flat = {k: str(v)[:_MLFLOW_PARAM_VALUE_MAX] for k, v in flat.items()}
    items = sorted(flat.items())
    for start in range(0, len(items), _MLFLOW_PARAM_BATCH):
        mlflow.log_params(dict(items[start : start + _MLFLOW_PARAM_BATCH]))


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any] | None = None, experiment: str | None = None) -> Iterator[Any]:
    """One MLflow run for one stage execution, tagged with stage, git commit and pipeline id.

    `params` is the stage's params section (logged flattened, prefixed with the stage name);
    `experiment` defaults to params.yaml's top-level `experiment`.
    """
    import mlflow

    if experiment is None:
        experiment = load_params().get("experiment", "vig")
    setup_experiment(experiment)
    tags = {"stage": stage, "git_commit": git_commit(), "pipeline_id": pipeline_id()}
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        if params:
            log_params(params, prefix=f"{stage}.")
        yield run


def serve_ui(argv: list[str] | None = None) -> None:
    """`vig-ui`: the MLflow UI on 127.0.0.1 against the project's store (Ctrl-C stops it)."""
    parser = argparse.ArgumentParser(description=serve_ui.__doc__)
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    proc = subprocess.Popen(mlflow_server_command(args.host, args.port), env=mlflow_server_env())
    print(f"MLflow UI: http://{args.host}:{args.port}  (store {tracking_uri()}); Ctrl-C to stop", flush=True)
    try:
        sys.exit(proc.wait())
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        proc.wait()


def mlflow_server_command(host: str, port: int, store: str | None = None, artifacts: Path | None = None) -> list[str]:
    """One-worker `mlflow server` (the default spawns many processes, ~3 GiB) for the project's store."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", store or tracking_uri(),
        "--artifacts-destination", str(artifacts or artifact_root()),
        "--host", host, "--port", str(port), "--workers", "1",
    ]  # fmt: skip


def mlflow_server_env() -> dict[str, str]:
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
