"""vig-submit against a real SLURM (slurmctld, two slurmd node names, slurmdbd on MariaDB, munged) on this host."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import yaml

from pipeline_fixture import REPO_ROOT, copy_repository, git, project_env, run, write_smoke_params
from pipelines.repro import repair_truncated_rwlock
from pipelines.slurm import make_executor, parse_time_min, slurm_settings
from services.local_slurm import start_cluster, stop_services

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

VIG_SUBMIT = str(Path(sys.executable).parent / "vig-submit")
TEST_SLURM_SETTINGS = {"cpus_per_task": 1, "time_min": 10, "signal_delay_s": 30,
                       "ray_start_args": ["--object-store-memory=100000000"]}  # fmt: skip


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """The cluster, with SLURM_CONF set for this module's clients (vig-submit, submitit, sacct)."""
    services = os.environ.get("VIG_TEST_SERVICES")  # set by run_tests.sh, which stops what is left on exit
    folder = Path(services) / "slurm" if services else tmp_path_factory.mktemp("slurm")
    folder.mkdir(parents=True, exist_ok=True)
    cluster = start_cluster(folder, ("vig1", "vig2"))
    with pytest.MonkeyPatch.context() as patch:
        for key, value in cluster.env.items():
            patch.setenv(key, value)
        yield cluster
    stop_services(folder)


def _set_test_slurm_params(root: Path) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["slurm"].update(TEST_SLURM_SETTINGS)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def shard_project(slurm_cluster, tmp_path_factory):
    """A copy of the repository with smoke params whose pipeline is cut to prepare -> shard (short jobs)."""
    root = copy_repository(tmp_path_factory.mktemp("slurm-project"))
    write_smoke_params(root)
    _set_test_slurm_params(root)
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text())
    pipeline["stages"] = {name: pipeline["stages"][name] for name in ("prepare", "shard")}
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    git(root, "commit", "-q", "-am", "SLURM test project: prepare and shard only, smoke params")
    return root


def _probe_project(root: Path, stage: dict) -> Path:
    """A small DVC project whose one stage `probe` runs tests/slurm_probe_stage.py."""
    shutil.copy(REPO_ROOT / "tests" / "slurm_probe_stage.py", root / "probe.py")
    params = {"slurm": {**yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["slurm"], **TEST_SLURM_SETTINGS}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"probe": stage}}, sort_keys=False))
    (root / ".gitignore").write_text("/slurm-jobs/\n/mlruns.db\n/mlartifacts/\n/running\n")
    git(root, "init", "-q")
    git(root, "config", "user.name", "vig tests")
    git(root, "config", "user.email", "tests@vig.invalid")
    run(root, sys.executable, "-m", "dvc", "init", "-q")
    run(root, sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "probe project")
    return root


def vig_submit(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([VIG_SUBMIT, *args], cwd=root, env=project_env(root), capture_output=True, text=True,
                          timeout=400)  # fmt: skip
    if check and done.returncode != 0:
        match = re.search(r"submitted job (\d+)", done.stdout)
        pytest.fail(f"vig-submit {' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
                    + (_job_logs(root, match.group(1)) if match else ""))  # fmt: skip
    return done


def _job_logs(root: Path, job_id: str) -> str:
    logs = sorted((root / "slurm-jobs").glob(f"{job_id}_*_log.*"))
    return "".join(f"\n--- {log.name}\n{log.read_text(errors='replace')[-4000:]}" for log in logs)


def _job_id(output: str) -> str:
    match = re.search(r"submitted job (\d+)", output)
    assert match, f"no job id in vig-submit's output:\n{output}"
    return match.group(1)


def sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True,
                         check=True).stdout.split()  # fmt: skip
    return out[0] if out else "UNKNOWN"


def _scontrol_show_job(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout


def _processes_mentioning(ray_address: str) -> list[str]:
    """Command lines naming the Ray head (`ray start`, gcs_server, raylets, workers) still running."""
    port = ray_address.rsplit(":", 1)[1].encode()
    found = []
    for cmdline_file in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline_file.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith((b"=" + port, b":" + port)) for arg in args):
            found.append(b" ".join(args).decode(errors="replace"))
    return found


def dvc_status_is_clean(root: Path) -> None:
    status = run(root, sys.executable, "-m", "dvc", "status", "--json").stdout
    assert json.loads(status) == {}, f"dvc status after the job: {status}"


def test_function_job_runs_on_a_slurm_node(slurm_cluster, shard_project):
    settings = slurm_settings(yaml.safe_load((shard_project / "params.yaml").read_text()), {})
    executor = make_executor(settings, shard_project, "vig-function")
    job = executor.submit(subprocess.check_output, ["bash", "-c", "echo $SLURM_JOB_ID $SLURMD_NODENAME"], text=True)
    job_id, node = job.result().split()
    assert job_id == job.job_id and node in slurm_cluster.node_names
    assert job.paths.stdout.exists()
    status = vig_submit(shard_project, "status", job.job_id).stdout
    assert re.search(r"state: COMPLETED", status), status
    assert str(job.paths.stdout) in status


def test_cancel_stops_a_running_job(slurm_cluster, shard_project):
    settings = slurm_settings(yaml.safe_load((shard_project / "params.yaml").read_text()), {})
    job = make_executor(settings, shard_project, "vig-sleeper").submit(time.sleep, 600)
    deadline = time.monotonic() + 60
    while sacct_state(job.job_id) != "RUNNING":
        assert time.monotonic() < deadline, f"job {job.job_id} never started: {sacct_state(job.job_id)}"
        time.sleep(1)
    out = vig_submit(shard_project, "cancel", job.job_id).stdout
    assert f"cancelled job {job.job_id}" in out
    deadline = time.monotonic() + 60
    while sacct_state(job.job_id) != "CANCELLED":
        assert time.monotonic() < deadline, f"job {job.job_id} state after cancel: {sacct_state(job.job_id)}"
        time.sleep(1)


def test_whole_pipeline_job_then_single_stage_after_param_change(slurm_cluster, shard_project):
    jobs_before = sorted((shard_project / "slurm-jobs").rglob("*"))
    dry = vig_submit(shard_project, "shard", "--dry-run", "--nodes", "2", "--partition", "gpu", "--time", "1:30:00")
    assert "nodes: 2" in dry.stdout and "slurm_partition: gpu" in dry.stdout and "timeout_min: 90" in dry.stdout
    assert sorted((shard_project / "slurm-jobs").rglob("*")) == jobs_before, "a dry run must not submit"

    out = vig_submit(shard_project, "--all", "--wait").stdout
    job_id = _job_id(out)
    assert f"job {job_id} finished: COMPLETED" in out and "stdout: " in out
    assert sacct_state(job_id) == "COMPLETED"
    assert (shard_project / "shards" / "classification" / "manifest.json").exists()
    dvc_status_is_clean(shard_project)
    prepared_at = (shard_project / "data" / "layout.json").stat().st_mtime_ns
    metrics_before = json.loads((shard_project / "metrics" / "shard.json").read_text())

    # A shard param change: the stage job reruns shard only, as `dvc repro -s shard` would.
    params = yaml.safe_load((shard_project / "params.yaml").read_text())
    params["shard"]["samples_per_shard"] //= 2
    (shard_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = vig_submit(shard_project, "shard", "--wait").stdout
    assert f"job {_job_id(out)} finished: COMPLETED" in out
    metrics_after = json.loads((shard_project / "metrics" / "shard.json").read_text())
    assert metrics_after["classification.train.shards"] > metrics_before["classification.train.shards"]
    assert (shard_project / "data" / "layout.json").stat().st_mtime_ns == prepared_at
    dvc_status_is_clean(shard_project)


@pytest.mark.parametrize("interruption", ["time_limit", "preemption"])
def test_interrupted_stage_is_requeued_and_resumes(slurm_cluster, tmp_path, interruption):
    root = _probe_project(tmp_path, {
        "cmd": "python probe.py requeue", "deps": ["probe.py"],
        "outs": [{"checkpoints": {"persist": True, "cache": False}}, "out"],
    })  # fmt: skip
    job_id = _job_id(vig_submit(root, "probe").stdout)
    deadline = time.monotonic() + 120
    while not (root / "running").exists():
        assert time.monotonic() < deadline, f"probe never started: {sacct_state(job_id)}"
        time.sleep(0.5)
    job = submitit.SlurmJob(folder=root / "slurm-jobs", job_id=job_id)
    # submitit's own test hook sends what SLURM sends: SIGUSR2 (the --signal warning) before the time limit,
    # SIGTERM and then SIGUSR2 to a preempted job.
    job._interrupt(timeout=interruption == "time_limit")
    deadline = time.monotonic() + 120
    requeued = ("Restarts=1", "JobState=PENDING", "Reason=BeginTime")
    while not all(word in (info := _scontrol_show_job(job_id)) for word in requeued):
        assert time.monotonic() < deadline, f"job {job_id} was not requeued:\n{info}"
        time.sleep(0.5)
    # SLURM holds a requeued job ~2 minutes (BeginTime) before it is eligible again; an admin may skip that wait.
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
    job.wait()
    deadline = time.monotonic() + 60
    while sacct_state(job_id) != "COMPLETED":
        assert time.monotonic() < deadline, f"requeued job ended {sacct_state(job_id)}:\n{_job_logs(root, job_id)}"
        time.sleep(1)
    result = json.loads((root / "out" / "result.json").read_text())
    assert result["steps_done"] == 1 and result["attempt"] == 0 and result["finished_attempt"] == 1
    # At the time limit vig-submit stops the stage itself (SIGINT), so it can save; a preempted job's processes
    # all get SLURM's SIGTERM.
    assert result["saved_on_interrupt"] == (interruption == "time_limit")
    dvc_status_is_clean(root)


def test_stage_runs_after_a_killed_dvc_left_its_rwlock_truncated(tmp_path):
    # What the requeued attempt of a preempted job met in CI: dvc was killed while it rewrote .dvc/tmp/rwlock.
    root = _probe_project(tmp_path, {"cmd": "echo done > out", "outs": ["out"]})
    (root / ".dvc" / "tmp").mkdir(exist_ok=True)
    (root / ".dvc" / "tmp" / "rwlock").write_text('{"write": {"')
    done = subprocess.run([sys.executable, "-m", "pipelines.repro", "-s", "probe"], cwd=root, env=project_env(root),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rwlock was truncated (12 bytes of invalid JSON)" in done.stdout
    assert (root / "out").read_text() == "done\n"
    assert not any(json.loads((root / ".dvc" / "tmp" / "rwlock").read_text()).values()), "no locks left held"
    assert repair_truncated_rwlock(root) is False, "a valid rwlock is left as it is"
    dvc_status_is_clean(root)


def test_two_node_job_runs_the_stage_on_a_ray_cluster_across_both_nodes(slurm_cluster, tmp_path):
    root = _probe_project(tmp_path, {"cmd": "python probe.py ray", "deps": ["probe.py"], "outs": ["out"]})
    out = vig_submit(root, "probe", "--nodes", "2", "--wait").stdout
    job_id = _job_id(out)
    assert f"job {job_id} finished: COMPLETED" in out, out + _job_logs(root, job_id)
    report = json.loads((root / "out" / "ray.json").read_text())
    head_address = (root / "slurm-jobs" / f"{job_id}_ray_0" / "head_address").read_text()
    assert report["address"] == head_address
    assert len(report["alive_nodes"]) == 2 and sorted(report["task_nodes"]) == sorted(report["alive_nodes"])
    worker_log = (root / "slurm-jobs" / f"{job_id}_1_log.out").read_text()
    assert f"--address={head_address}" in worker_log  # node 1 joined the head as a Ray worker
    assert not _processes_mentioning(head_address), f"Ray processes of job {job_id} outlived it"
    dvc_status_is_clean(root)


@pytest.mark.parametrize(
    ("text", "minutes"), [("90", 90), ("1:30:00", 90), ("45:30", 46), ("2-00", 2880), ("1-02:03:04", 1564)]
)
def test_time_limits_in_slurm_formats(text, minutes):
    assert parse_time_min(text) == minutes


def test_slurm_section_is_checked_and_overridden():
    section = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["slurm"]
    settings = slurm_settings({"slurm": section}, {"nodes": 4, "partition": "gpu", "time_min": None})
    assert (settings["nodes"], settings["partition"], settings["time_min"]) == (4, "gpu", section["time_min"])
    with pytest.raises(SystemExit, match=r"unknown keys \['gpus'\]"):
        slurm_settings({"slurm": {**section, "gpus": 8}}, {})
    with pytest.raises(SystemExit, match="slurm.nodes must be >= 1"):
        slurm_settings({"slurm": section}, {"nodes": 0})
    with pytest.raises(SystemExit, match="no `slurm:` section"):
        slurm_settings({}, {})
