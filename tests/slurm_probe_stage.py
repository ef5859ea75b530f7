"""Stage commands for the SLURM tests' small DVC projects (copied there as probe.py).

python probe.py requeue   resumable work: the first attempt records progress in checkpoints/ (a persistent
                          DVC output, as pretrain's checkpoints are), says it is running and waits to be
                          interrupted (saving again on SIGINT); a requeued attempt resumes from that progress
                          and finishes.
python probe.py ray       connects to the Ray cluster of the job (RAY_ADDRESS) and runs one task pinned to
                          each alive node.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.rename(path)


def requeue() -> None:
    progress_file = Path("checkpoints/progress.json")
    attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if not progress_file.exists():
        progress = {"steps_done": 1, "attempt": attempt, "saved_on_interrupt": False}
        _write_json(progress_file, progress)
        Path("running").write_text(os.environ.get("SLURM_JOB_ID", ""))
        try:
            time.sleep(600)  # interrupted long before this ends
        except KeyboardInterrupt:  # vig-submit's checkpoint stops the stage with SIGINT: save, then go
            _write_json(progress_file, {**progress, "saved_on_interrupt": True})
            raise
        raise SystemExit("the probe was not interrupted")
    progress = json.loads(progress_file.read_text())
    _write_json(Path("out/result.json"), {**progress, "finished_attempt": attempt})


def ray_nodes() -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(logging_level="ERROR")  # RAY_ADDRESS from the job: connect, never start a local instance
    alive = [node["NodeID"] for node in ray.nodes() if node["Alive"]]

    @ray.remote(num_cpus=1)
    def where() -> str:
        return ray.get_runtime_context().get_node_id()

    ran_on = ray.get([where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
                      for node in alive])  # fmt: skip
    _write_json(
        Path("out/ray.json"),
        {
            "address": os.environ.get("RAY_ADDRESS"),
            "alive_nodes": alive,
            "task_nodes": ran_on,
            "driver_host": socket.gethostname(),
        },
    )
    ray.shutdown()


if __name__ == "__main__":
    {"requeue": requeue, "ray": ray_nodes}[sys.argv[1]]()
