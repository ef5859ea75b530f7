"""`python -m pipelines.repro [dvc repro args]`: run the DVC pipeline as one tracked pipeline execution.

Sets the environment every stage expects (one pipeline id shared by all stages' MLflow runs, the
sandbox-safe Ray/DVC settings), repairs the rwlock file an interrupted dvc can leave truncated, and hands over to
`dvc repro`.
"""
from __future__ import annotations

import json
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


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return False
    return True


def repair_truncated_rwlock(root: Path) -> bool:
    """Reset DVC's stage-lock file if it is not valid JSON; True if it was reset.

    dvc rewrites `.dvc/tmp/rwlock` in place when a stage starts and ends, so a dvc killed at that moment (SLURM
    preempting or timing out a job, Ctrl-C twice) leaves it truncated, and every later `dvc repro` in the project
    fails with "JSON structure is corrupted". The file only records which live dvc processes use which paths
    (dvc drops entries of dead processes itself), so nothing a truncated file held can still be read back. The
    check runs under dvc's own guard lock, so a dvc writing the file at that moment is never mistaken for a crash.
    """
    from dvc.lock import make_lock
    from dvc.repo import Repo
    from dvc.rwlock import RWLOCK_FILE, RWLOCK_LOCK

    if not (root / Repo.DVC_DIR).is_dir():
        return False  # not a DVC project: `dvc repro` says so itself
    with Repo(str(root)) as repo:
        tmp_dir, hardlink = repo.tmp_dir, repo.config["core"].get("hardlink_lock", False)
    rwlock = Path(tmp_dir) / RWLOCK_FILE
    with make_lock(str(Path(tmp_dir) / RWLOCK_LOCK), tmp_dir=tmp_dir, hardlink_lock=hardlink):
        if not rwlock.exists() or _is_json(rwlock.read_bytes()):
            return False
        size = rwlock.stat().st_size
        staged = rwlock.with_name(f".{RWLOCK_FILE}.repair")
        staged.write_text("{}", encoding="utf-8")
        staged.replace(rwlock)
    print(f"warning: {rwlock} was truncated ({size} bytes of invalid JSON), most likely by a dvc killed while "
          "it wrote the file (a preempted or timed-out job): reset it to no locks held", flush=True)  # fmt: skip
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    env = pipeline_env()
    repair_truncated_rwlock(project_root())
    print(f"pipeline id {env[PIPELINE_ID_ENV]}: dvc repro {' '.join(argv)}", flush=True)
    return subprocess.call([sys.executable, "-m", "dvc", "repro", *argv], cwd=project_root(), env=env)


if __name__ == "__main__":
    sys.exit(main())
