"""A Ray cluster across the nodes of one SLURM job: the head on node 0, one Ray worker on each other node.

Every node of the job calls `run_on_ray_cluster` (submitit runs the job's callable once per node with
``tasks_per_node=1``). The nodes meet through files in a folder on the filesystem they share (the job's
submitit folder): node 0 starts the head and writes its address there, the others join it, node 0 waits until
all nodes are alive, runs the work against the cluster and then writes a stop file; every node stops the Ray
node it started. Each node runs `ray start --block` and stops it with SIGTERM, which ends exactly the Ray
processes of that job (`ray stop` would end every Ray process of the user on the machine, other jobs' too).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

HEAD_ADDRESS_FILE = "head_address"
STOP_FILE = "stop"
FAILED_PREFIX = "failed-node-"
MULTI_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_RAY_NODE_STOP_GRACE_S = 30


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.rename(path)


def _ray_start(args: Sequence[str], env: dict[str, str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *args]
    print(f"[ray-cluster] {' '.join(command)}", flush=True)
    return subprocess.Popen(command, env=env, start_new_session=True)


def _stop_ray_node(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)  # `ray start --block` stops the Ray processes it started
    try:
        process.wait(timeout=_RAY_NODE_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait_until(
    what: str, ready: Callable[[], bool], timeout_s: float, watched: subprocess.Popen, rendezvous: Path
) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if watched.poll() is not None:
            raise RuntimeError(f"`ray start` exited with {watched.returncode} while waiting for {what}")
        _raise_if_a_node_failed(rendezvous)
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting {timeout_s:.0f} s for {what}")
        time.sleep(1)


def _alive_nodes(address: str) -> int:
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        return sum(1 for node in ray.nodes() if node["Alive"])
    finally:
        ray.shutdown()


def _node_resources() -> list[str]:
    """Claim only what SLURM gave this job on this node, not the whole machine's CPUs and GPUs."""
    args = []
    if os.environ.get("SLURM_CPUS_ON_NODE"):
        args.append(f"--num-cpus={os.environ['SLURM_CPUS_ON_NODE']}")
    gpus = os.environ.get("SLURM_GPUS_ON_NODE")
    args.append(f"--num-gpus={gpus or 0}")
    return args


def run_on_ray_cluster(
    rendezvous: Path,
    node_rank: int,
    num_nodes: int,
    work: Callable[[dict[str, str]], T],
    env: dict[str, str],
    ray_start_args: Sequence[str] = (),
    timeout_s: float = 300,
) -> T | None:
    """On node 0: start the head, wait for `num_nodes` alive nodes, return ``work(driver_env)`` (`env` with
    RAY_ADDRESS pointing at the head). On the other nodes: join the head, wait for node 0's stop file, return
    None. Every node stops the Ray node it started; a node that fails leaves a file saying why, so that the
    others stop waiting for it."""
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the sandbox setting for one-machine runs) confines Ray to loopback
    # and refuses worker nodes; it is read when ray is imported, hence before that import.
    os.environ[MULTI_NODE_ENV] = "1"
    env = {**env, MULTI_NODE_ENV: "1"}
    import ray.util

    rendezvous.mkdir(parents=True, exist_ok=True)
    node_ip = ray.util.get_node_ip_address()
    common = [f"--node-ip-address={node_ip}", *_node_resources(), *ray_start_args]
    try:
        if node_rank == 0:
            return _run_head(rendezvous, node_ip, num_nodes, work, env, common, timeout_s)
        _run_worker(rendezvous, node_rank, env, common, timeout_s)
        return None
    except BaseException as error:
        _write_atomically(rendezvous / f"{FAILED_PREFIX}{node_rank}", f"{type(error).__name__}: {error}")
        raise


def _run_head(
    rendezvous: Path,
    node_ip: str,
    num_nodes: int,
    work: Callable[[dict[str, str]], T],
    env: dict[str, str],
    common: list[str],
    timeout_s: float,
) -> T:
    port = _free_port()
    address = f"{node_ip}:{port}"
    head = _ray_start(["--head", f"--port={port}", "--include-dashboard=false", *common], env)
    try:
        _wait_until(f"the Ray head at {address}", lambda: _port_open(node_ip, port), timeout_s, head, rendezvous)
        _write_atomically(rendezvous / HEAD_ADDRESS_FILE, address)
        _wait_until(f"{num_nodes} alive Ray nodes", lambda: _alive_nodes(address) >= num_nodes, timeout_s, head,
                    rendezvous)  # fmt: skip
        print(f"[ray-cluster] {num_nodes} nodes alive; head at {address}", flush=True)
        return work({**env, "RAY_ADDRESS": address})
    finally:
        _write_atomically(rendezvous / STOP_FILE, "")
        _stop_ray_node(head)


def _run_worker(rendezvous: Path, node_rank: int, env: dict[str, str], common: list[str], timeout_s: float) -> None:
    address_file = rendezvous / HEAD_ADDRESS_FILE
    deadline = time.monotonic() + timeout_s
    while not address_file.exists():
        _raise_if_a_node_failed(rendezvous)
        if time.monotonic() > deadline:
            raise TimeoutError(f"node {node_rank}: no Ray head address in {address_file} after {timeout_s:.0f} s")
        time.sleep(1)
    worker = _ray_start([f"--address={address_file.read_text()}", *common], env)
    try:
        while not (rendezvous / STOP_FILE).exists():
            if worker.poll() is not None:
                raise RuntimeError(f"node {node_rank}: `ray start` exited with {worker.returncode} before the stop")
            time.sleep(1)
    finally:
        _stop_ray_node(worker)


def _raise_if_a_node_failed(rendezvous: Path) -> None:
    for failed in rendezvous.glob(f"{FAILED_PREFIX}*"):
        raise RuntimeError(f"node {failed.name[len(FAILED_PREFIX) :]} of the Ray cluster failed: {failed.read_text()}")


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) == 0
