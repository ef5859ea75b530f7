"""A real SLURM cluster on this one host for the tests: munged, MariaDB, slurmdbd, slurmctld and one slurmd
per node name (several slurmd share the host on their own ports, each started with `slurmd -N <name>`).

Everything — configs, munge key and socket, database, spool, logs, PID files — lives in one folder on free
ports, so nothing in /etc is touched and a developer's own SLURM is not disturbed. Clients reach the cluster
through ``SLURM_CONF=<folder>/slurm.conf``. Needs root (the daemons run as root, as on CI) and Debian's
slurmctld, slurmd, slurm-client, slurmdbd, munge and mariadb-server (tests/services/run_tests.sh installs them).

Every daemon leaves ``<program>[-<name>].pid`` in the folder; `stop_services` stops each by that PID, which is
also how run_tests.sh cleans up after a pytest that died:

    python tests/services/local_slurm.py start FOLDER [--nodes 2]
    python tests/services/local_slurm.py stop FOLDER
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CLUSTER_NAME = "vigtest"
PARTITION = "debug"
REQUIRED_PROGRAMS = ("munged", "mungekey", "mariadb-install-db", "mariadbd", "slurmdbd", "slurmctld", "slurmd",
                     "sbatch", "srun", "sacct", "sacctmgr", "scontrol", "scancel", "sinfo", "squeue")  # fmt: skip
START_TIMEOUT_S = 60


@dataclass(frozen=True)
class SlurmCluster:
    folder: Path
    node_names: tuple[str, ...]
    partition: str = PARTITION

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Environment entries a SLURM client (sbatch, sacct, submitit) needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(what: str, ready, log: Path | None, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else "(no log)"
    raise RuntimeError(f"{what} did not come up within {timeout_s:.0f} s; last log lines:\n{tail}")


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def _slurm_conf(folder: Path, node_names: tuple[str, ...], ports: dict[str, int]) -> str:
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    memory_mb = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 * 3 // 4
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[name]} "
        f"CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN"
        for name in node_names
    )
    return f"""\
ClusterName={CLUSTER_NAME}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports["slurmctld"]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={_munge_socket(folder)}
CredType=cred/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
# No cgroups and no systemd in these containers.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Several slurmd declare the same host's CPUs; trust the config instead of draining the nodes.
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=5
MinJobAge=3600
InactiveLimit=0
# slurmdbd so that sacct (and submitit's job.state) report exact job states.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={ports["slurmdbd"]}
AccountingStoragePass={_munge_socket(folder)}
JobCompType=jobcomp/none
{nodes}
PartitionName={PARTITION} Nodes={",".join(node_names)} Default=YES MaxTime=INFINITE State=UP
"""


def _slurmdbd_conf(folder: Path, ports: dict[str, int]) -> str:
    return f"""\
AuthType=auth/munge
AuthInfo=socket={_munge_socket(folder)}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={ports["slurmdbd"]}
SlurmUser=root
LogFile={folder}/slurmdbd.log
PidFile={folder}/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports["mariadb"]}
StorageUser=root
StorageLoc=slurm_acct_db
"""


def check_prerequisites() -> None:
    missing = [program for program in REQUIRED_PROGRAMS if shutil.which(program) is None]
    if missing:
        raise RuntimeError(
            f"missing {', '.join(missing)}: install Debian's slurmctld slurmd slurm-client slurmdbd munge "
            "mariadb-server (tests/services/run_tests.sh does that when run as root)"
        )
    if os.geteuid() != 0:
        raise RuntimeError("the local SLURM cluster runs its daemons as root: run the tests as root")


def start_cluster(folder: Path, node_names: tuple[str, ...] = ("vig1",)) -> SlurmCluster:
    """Start munged, MariaDB, slurmdbd, slurmctld and one slurmd per node name; wait until all nodes are idle."""
    check_prerequisites()
    folder = Path(folder).resolve()
    if any(folder.glob("*.pid")):
        raise RuntimeError(f"{folder} holds PID files of a running cluster: stop it first ({__file__} stop {folder})")
    for stale in ("state", "spool", "mysql", "munge", "munge.key"):  # state of another cluster name kills slurmctld
        _remove(folder / stale)
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True)
    ports = {name: _free_port() for name in ("slurmctld", "slurmdbd", "mariadb", *node_names)}
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
    try:
        _start_munge(folder)
        _start_mariadb(folder, ports["mariadb"])
        (folder / "slurm.conf").write_text(_slurm_conf(folder, node_names, ports))
        dbd_conf = folder / "slurmdbd.conf"
        dbd_conf.write_text(_slurmdbd_conf(folder, ports))
        dbd_conf.chmod(0o600)  # slurmdbd refuses a config others can read
        subprocess.run(["slurmdbd"], env=env, check=True)
        _wait_for("slurmdbd", lambda: _port_open(ports["slurmdbd"]), folder / "slurmdbd.log")
        _run(["sacctmgr", "-i", "add", "cluster", CLUSTER_NAME], env)
        subprocess.run(["slurmctld", "-f", str(folder / "slurm.conf")], env=env, check=True)
        _wait_for(
            "slurmctld",
            lambda: subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True).stdout.count("UP"),
            folder / "slurmctld.log",
        )
        for name in node_names:
            subprocess.run(["slurmd", "-f", str(folder / "slurm.conf"), "-N", name], env=env, check=True)

        def all_idle() -> bool:
            states = _run(["sinfo", "-h", "-N", "-o", "%N %t"], env).split("\n")
            return sorted(line for line in states if line.endswith(" idle")) == sorted(f"{n} idle" for n in node_names)

        _wait_for(f"slurmd {', '.join(node_names)}", all_idle, folder / f"slurmd-{node_names[-1]}.log")
    except BaseException:
        stop_services(folder)
        raise
    return SlurmCluster(folder=folder, node_names=tuple(node_names))


def _munge_socket(folder: Path) -> Path:
    return (folder / "munge").resolve() / "munge.socket"


def _start_munge(folder: Path) -> None:
    # munged insists that every folder above its socket is searchable by all, which a private temporary folder
    # (pytest's, mktemp's) is not: the socket lives in its own folder under /tmp, linked from `folder`.
    socket_dir = Path(tempfile.mkdtemp(prefix="vig-munge-"))
    socket_dir.chmod(0o755)
    (folder / "munge").symlink_to(socket_dir)
    key = folder / "munge.key"
    _run(["mungekey", "--create", f"--keyfile={key}"])
    subprocess.run(
        ["munged", f"--socket={_munge_socket(folder)}", f"--key-file={key}", f"--pid-file={folder}/munged.pid",
         f"--log-file={folder}/munged.log", f"--seed-file={folder}/munged.seed", "--num-threads=10"],
        check=True,
    )  # fmt: skip
    _wait_for("munged", _munge_socket(folder).exists, folder / "munged.log")


def _start_mariadb(folder: Path, port: int) -> None:
    datadir = folder / "mysql"
    if not datadir.exists():
        _run(["mariadb-install-db", "--no-defaults", "--user=root", f"--datadir={datadir}", "--skip-test-db",
              "--auth-root-authentication-method=normal"])  # fmt: skip
    # Only slurmdbd on loopback talks to this throwaway database, so it needs no accounts.
    subprocess.Popen(
        ["mariadbd", "--no-defaults", "--user=root", f"--datadir={datadir}", f"--socket={folder}/mysql.sock",
         f"--port={port}", "--bind-address=127.0.0.1", f"--pid-file={folder}/mariadbd.pid",
         f"--log-error={folder}/mariadbd.log", "--skip-grant-tables", "--innodb-buffer-pool-size=64M",
         "--skip-log-bin"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    _wait_for("mariadbd", lambda: _port_open(port), folder / "mariadbd.log")


def _process_is(pid: int, program: str) -> bool:
    """True if `pid` is alive and runs `program` (guards against a PID reused by an unrelated process)."""
    try:
        return program.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def stop_services(folder: Path, grace_s: float = 10.0) -> None:
    """Stop every process that left a ``<program>[-<name>].pid`` file in `folder`, with the processes of its
    group (SIGTERM, then SIGKILL)."""
    folder = Path(folder).resolve()
    conf = folder / "slurm.conf"
    if conf.exists() and (folder / "slurmctld.pid").exists() and shutil.which("scancel"):
        _cancel_all_jobs(conf, grace_s)
    running: dict[int, Path] = {}
    for pid_file in sorted(folder.glob("*.pid")):
        program = pid_file.stem.split("-")[0]
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid_file.unlink(missing_ok=True)
            continue
        if _process_is(pid, program):
            _signal_process_group(pid, signal.SIGTERM)
            running[pid] = pid_file
        else:
            pid_file.unlink(missing_ok=True)
    deadline = time.monotonic() + grace_s
    while running and time.monotonic() < deadline:
        for pid, pid_file in list(running.items()):
            if not _process_is(pid, pid_file.stem.split("-")[0]) or _is_zombie(pid):
                pid_file.unlink(missing_ok=True)
                del running[pid]
        time.sleep(0.1)
    for pid, pid_file in running.items():
        _signal_process_group(pid, signal.SIGKILL)
        pid_file.unlink(missing_ok=True)
    for pid in _job_processes(conf):
        os.kill(pid, signal.SIGKILL)  # slurmstepd ignores SIGTERM; without its slurmd it would wait forever
    _remove(folder / "munge")


def _signal_process_group(pid: int, signum: int) -> None:
    """Signal `pid`, and the processes it started too when it leads its own process group (a daemon that called
    setsid, or a command started in a new session such as vig-ui with its mlflow server)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _cancel_all_jobs(conf: Path, grace_s: float) -> None:
    """Cancel every job and give the steps time to end while slurmd and slurmctld can still hear about it."""
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True, timeout=30)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=30)
        if queue.returncode != 0 or not queue.stdout.strip():
            return
        time.sleep(0.5)


def _job_processes(conf: Path) -> list[int]:
    """slurmstepd and job processes of the cluster configured by `conf` (found by SLURM_CONF in their env)."""
    marker = f"SLURM_CONF={conf}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        in_a_job = cmdline.startswith(b"slurmstepd") or any(v.startswith(b"SLURM_JOB_ID=") for v in environ)
        if marker in environ and in_a_job:
            found.append(int(proc.name))
    return found


def _remove(path: Path) -> None:
    if path.is_symlink():
        shutil.rmtree(path.resolve(), ignore_errors=True)
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--nodes", type=int, default=1, help="number of slurmd node names on this host")
    args = parser.parse_args(argv)
    if args.action == "start":
        args.folder.mkdir(parents=True, exist_ok=True)
        cluster = start_cluster(args.folder, tuple(f"vig{i + 1}" for i in range(args.nodes)))
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        stop_services(args.folder)


if __name__ == "__main__":
    main()
