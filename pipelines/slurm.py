"""`vig-submit`: run DVC stages as SLURM jobs through submitit.

    vig-submit pretrain --nodes 2 --gpus-per-node 8 --partition gpu --time 12:00:00
    vig-submit --all                 # the whole `dvc repro` as one job
    vig-submit status <job-id>
    vig-submit cancel <job-id>

A job runs ``dvc repro -s <stage>`` (through `pipelines.repro`, so its MLflow runs share one pipeline id) in
the project root, so DVC's lock file and outputs stay exactly as a local run leaves them. Job parameters come
from the ``slurm:`` section of params.yaml; command-line flags override them. With more than one node the job
starts a Ray cluster across its nodes (`pipelines.ray_cluster`) and runs the stage with RAY_ADDRESS pointing at
its head; on one node the stage starts Ray itself. A preempted or timed-out job is requeued (submitit
checkpointing) and reruns the same command; stages that train resume from their own last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import submitit
import yaml
from submitit.core.utils import FailedJobError

from pipelines.ray_cluster import run_on_ray_cluster
from pipelines.repro import SANDBOX_ENV
from vig.params import ROOT_ENV, load_params, project_root
from vig.tracking import PIPELINE_ID_ENV

SLURM_KEYS = {
    "folder": str,
    "partition": (str, type(None)),
    "nodes": int,
    "gpus_per_node": int,
    "cpus_per_task": int,
    "mem_gb": (int, float, type(None)),
    "time_min": int,
    "max_timeouts": int,
    "signal_delay_s": int,
    "setup": list,
    "sbatch": dict,
    "ray_start_args": list,
}
_STOP_GRACE_S = 60  # a stage interrupted for requeueing gets this long to exit before SIGKILL
_REQUEUE_SIGNAL_WAIT_S = 10


class StageJob(submitit.helpers.Checkpointable):
    """The callable a job runs on each of its nodes: `command` on node 0, a Ray worker on the others.

    On preemption or timeout submitit calls `checkpoint` (node 0 only): the running command is stopped and the
    same StageJob is requeued, so the requeued job simply runs the command again.
    """

    def __init__(self, command: list[str], root: str, env: dict[str, str], ray_start_args: list[str]) -> None:
        self.command = command
        self.root = root
        self.env = env
        self.ray_start_args = ray_start_args
        self._process: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_process": None}

    def __call__(self) -> int:
        job = submitit.JobEnvironment()
        env = {**os.environ, **self.env}
        if job.num_nodes == 1:
            env.pop("RAY_ADDRESS", None)  # the stage starts its own Ray on this node
            return self._run(env)
        # One rendezvous folder per attempt: a requeued job must not see the previous attempt's stop file.
        rendezvous = job.paths.folder / f"{job.job_id}_ray_{os.environ.get('SLURM_RESTART_COUNT', '0')}"
        return run_on_ray_cluster(
            rendezvous, job.node, job.num_nodes, self._run, env=env, ray_start_args=self.ray_start_args,
        )  # fmt: skip

    def _run(self, env: dict[str, str]) -> int:
        print(f"[vig-submit] {' '.join(self.command)}  (in {self.root})", flush=True)
        # Own process group, so `checkpoint` can stop dvc and the stage it runs together. SLURM sends the
        # time-limit warning (SIGUSR2) to every process of the job, and it would kill the stage outright: the
        # stage ignores it, and submitit's handler in this process stops the stage gracefully in `checkpoint`.
        self._process = subprocess.Popen(
            self.command, cwd=self.root, env=env, start_new_session=True,
            preexec_fn=lambda: signal.signal(submitit.JobEnvironment._usr_sig(), signal.SIG_IGN),
        )  # fmt: skip
        # Poll rather than wait(): submitit's signal handler runs `checkpoint` in this thread, and it must be able
        # to wait for the process too.
        while self._process.poll() is None:
            time.sleep(1)
        if self._process.returncode == -signal.SIGTERM:
            # SLURM sends SIGTERM to all of the job's processes before it preempts (or cancels) the job; the
            # SIGUSR2 that makes submitit requeue a preempted job follows: give it time before calling this a failure.
            time.sleep(_REQUEUE_SIGNAL_WAIT_S)
        if self._process.returncode != 0:
            raise subprocess.CalledProcessError(self._process.returncode, self.command)
        return self._process.returncode

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        process = self._process
        if process is not None and process.poll() is None:
            print("[vig-submit] interrupted for requeueing: stopping the stage", flush=True)
            os.killpg(process.pid, signal.SIGINT)  # dvc releases its lock; Python stages raise KeyboardInterrupt
            deadline = time.monotonic() + _STOP_GRACE_S
            while process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        return super().checkpoint(*args, **kwargs)


def slurm_settings(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """params.yaml's `slurm:` section, checked, with the command line's non-None overrides applied."""
    if "slurm" not in params:
        raise SystemExit("params.yaml has no `slurm:` section: add one (see README, 'Run on SLURM')")
    settings = dict(params["slurm"])
    unknown = sorted(set(settings) - set(SLURM_KEYS))
    missing = sorted(set(SLURM_KEYS) - set(settings))
    if unknown or missing:
        raise SystemExit(
            f"params.yaml `slurm:` section: unknown keys {unknown}, missing keys {missing}; "
            f"expected exactly {sorted(SLURM_KEYS)}"
        )
    settings.update({key: value for key, value in overrides.items() if value is not None})
    for key, expected in SLURM_KEYS.items():
        if not isinstance(settings[key], expected):
            raise SystemExit(f"slurm.{key} = {settings[key]!r} has the wrong type (expected {expected})")
    if settings["nodes"] < 1:
        raise SystemExit(f"slurm.nodes must be >= 1, got {settings['nodes']}")
    return settings


def parse_time_min(text: str) -> int:
    """SLURM-style time limits: MINUTES, HH:MM:SS, D-HH[:MM[:SS]] -> whole minutes (rounded up)."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"time limit {text!r}: use minutes, HH:MM:SS or D-HH:MM:SS")
    days, first, second, third = match.groups()
    if days is None and second is None:
        return int(first)
    if days is None and third is None:  # MM:SS
        return int(first) + (int(second) > 0)
    hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
    return int(days or 0) * 1440 + hours * 60 + minutes + (seconds > 0)


def dvc_stages(root: Path) -> list[str]:
    with open(root / "dvc.yaml") as f:
        return list((yaml.safe_load(f) or {}).get("stages") or {})


def make_executor(settings: dict[str, Any], root: Path, job_name: str) -> submitit.AutoExecutor:
    """A submitit executor for SLURM with the job parameters of `settings` (a checked `slurm:` section)."""
    try:
        executor = submitit.AutoExecutor(
            folder=root / settings["folder"], cluster="slurm", slurm_max_num_timeout=settings["max_timeouts"]
        )
    except RuntimeError as error:
        raise SystemExit(f"no SLURM here ({error}); run `dvc repro` directly, or check with --dry-run") from error
    executor.update_parameters(**executor_parameters(settings, job_name))
    return executor


def executor_parameters(settings: dict[str, Any], job_name: str) -> dict[str, Any]:
    parameters: dict[str, Any] = {
        "name": job_name,
        "nodes": settings["nodes"],
        "tasks_per_node": 1,  # one StageJob per node: the stage (node 0) or a Ray worker
        "cpus_per_task": settings["cpus_per_task"],
        "timeout_min": settings["time_min"],
        "slurm_signal_delay_s": settings["signal_delay_s"],
        # --requeue: SLURM may requeue the job itself (node failure), and `scontrol requeue` is always allowed.
        "slurm_additional_parameters": {"requeue": True, **settings["sbatch"]},
    }
    if settings["gpus_per_node"]:
        parameters["gpus_per_node"] = settings["gpus_per_node"]
    if settings["mem_gb"] is not None:
        parameters["mem_gb"] = settings["mem_gb"]
    if settings["partition"] is not None:
        parameters["slurm_partition"] = settings["partition"]
    if settings["setup"]:
        parameters["slurm_setup"] = list(settings["setup"])
    return parameters


def job_command(stage: str | None) -> list[str]:
    """What the job runs in the project root: `dvc repro -s <stage>` (or the whole `dvc repro`)."""
    return [sys.executable, "-m", "pipelines.repro", *(["-s", stage] if stage else [])]


def _final_state(job: submitit.Job) -> str:
    # sacct can lag the job's end by a few seconds; wait for a terminal state.
    deadline = time.monotonic() + 60
    while True:
        state = job.get_info(mode="force").get("State", "UNKNOWN")
        if state not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "UNKNOWN") or time.monotonic() > deadline:
            return state
        time.sleep(2)


def submit(stage: str | None, settings: dict[str, Any], root: Path, dry_run: bool = False) -> submitit.Job | None:
    """Submit `dvc repro -s <stage>` (`stage` None: the whole pipeline) and print job id, log paths and state."""
    job_name = f"vig-{stage or 'all'}"
    command = job_command(stage)
    env = {PIPELINE_ID_ENV: os.environ.get(PIPELINE_ID_ENV) or uuid.uuid4().hex[:12], ROOT_ENV: str(root),
           **{k: v for k, v in SANDBOX_ENV.items() if k not in os.environ}}  # fmt: skip
    what = f"`dvc repro{f' -s {stage}' if stage else ''}` on {settings['nodes']} node(s)"
    if dry_run:
        print(f"dry run: would submit {job_name}: {what}")
        print(f"  in {root}, job folder {root / settings['folder']}; node 0 runs: {' '.join(command)}")
        for key, value in executor_parameters(settings, job_name).items():
            print(f"  {key}: {value}")
        return None
    executor = make_executor(settings, root, job_name)
    try:
        job = executor.submit(StageJob(command, str(root), env, [str(arg) for arg in settings["ray_start_args"]]))
    except FailedJobError as error:
        raise SystemExit(f"sbatch refused the job:\n{error}") from error
    print(f"submitted job {job.job_id} ({job_name}): {what}")
    _print_job(job)
    return job


def _print_job(job: submitit.Job) -> None:
    print(f"  stdout: {job.paths.stdout}")
    print(f"  stderr: {job.paths.stderr}")
    if job.num_tasks > 1:
        print(f"  (one log pair per node: {job.job_id}_<node>_log.out/.err in {job.paths.folder})")
    print(f"  state: {job.get_info(mode='force').get('State', 'UNKNOWN')}")


def _existing_job(job_id: str, settings: dict[str, Any], root: Path) -> submitit.SlurmJob:
    if not re.fullmatch(r"\d+(_\d+)?", job_id):
        raise SystemExit(f"{job_id!r} is not a SLURM job id (a number, as `vig-submit` printed it)")
    return submitit.SlurmJob(folder=root / settings["folder"], job_id=job_id)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vig-submit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage", nargs="?", help="the DVC stage to run (see dvc.yaml)")
    parser.add_argument("--all", action="store_true", help="run the whole pipeline (`dvc repro`) as one job")
    parser.add_argument("--nodes", type=int, help="nodes; > 1 starts a Ray cluster across them")
    parser.add_argument("--gpus-per-node", type=int)
    parser.add_argument("--cpus-per-task", type=int, help="CPUs per node (one task per node)")
    parser.add_argument("--mem-gb", type=float)
    parser.add_argument("--partition")
    parser.add_argument("--time", type=parse_time_min, dest="time_min", help="MINUTES, HH:MM:SS or D-HH:MM:SS")
    parser.add_argument("--dry-run", action="store_true", help="print what would be submitted and stop")
    parser.add_argument("--wait", action="store_true", help="wait for the job to end; fail if it did not complete")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = project_root()
    params = load_params(root / "params.yaml")
    if argv[:1] in (["status"], ["cancel"]):
        action_parser = argparse.ArgumentParser(prog=f"vig-submit {argv[0]}")
        action_parser.add_argument("job_id")
        job_id = action_parser.parse_args(argv[1:]).job_id
        job = _existing_job(job_id, slurm_settings(params, {}), root)
        if argv[0] == "cancel":
            job.cancel(check=True)
            print(f"cancelled job {job.job_id}")
        print(f"job {job.job_id}")
        _print_job(job)
        return 0
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.all == (args.stage is not None):
        parser.error("give one stage, or --all for the whole pipeline")
    if args.stage is not None and args.stage.split("@")[0] not in dvc_stages(root):
        parser.error(f"no stage {args.stage!r} in {root / 'dvc.yaml'}; stages: {', '.join(dvc_stages(root))}")
    overrides = {key: getattr(args, key) for key in ("nodes", "gpus_per_node", "cpus_per_task", "mem_gb",
                                                     "partition", "time_min")}  # fmt: skip
    settings = slurm_settings(params, overrides)
    job = submit(args.stage, settings, root, dry_run=args.dry_run)
    if not args.wait or job is None:
        return 0
    job.wait()
    state = _final_state(job)
    print(f"job {job.job_id} finished: {state}")
    return 0 if state == "COMPLETED" else 1


if __name__ == "__main__":
    sys.exit(main())
