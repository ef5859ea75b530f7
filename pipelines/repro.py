"""`python -m pipelines.repro [dvc repro args]`: run the DVC pipeline as one tracked pipeline execution.

Sets the environment every stage expects (one pipeline id shared by all stages' MLflow runs, the
sandbox-safe Ray/DVC settings) and hands over to `dvc repro`.
"""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from vig.params import project_root
from vig.tracking import PIPELINE_ID_ENV

SANDBOX_ENV = {
    "DVC_NO_ANALYTICS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def pipeline_env() -> dict[str, str]:
    env = {**os.environ, **{k: v for k, v in SANDBOX_ENV.items() if k not in os.environ}}
    # dvc.yaml's `python -m stages.<name>` must find this interpreter (the project venv), not the system one.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault(PIPELINE_ID_ENV, uuid.uuid4().hex[:12])
    env.setdefault("VIG_ROOT", str(project_root()))
    return env


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    env = pipeline_env()
    print(f"pipeline id {env[PIPELINE_ID_ENV]}: dvc repro {' '.join(argv)}", flush=True)
    return subprocess.call([sys.executable, "-m", "dvc", "repro", *argv], cwd=project_root(), env=env)


if __name__ == "__main__":
    sys.exit(main())
