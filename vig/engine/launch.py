"""Starting per-worker functions on a Ray Train worker group (TorchTrainer, DDP through torch.distributed).

`connect` joins the cluster at $RAY_ADDRESS when set (e.g. one started across SLURM nodes by pipelines/),
otherwise starts a local one with sandbox-safe settings. Workers run in another working directory, so
everything they need arrives as absolute paths in their config and as environment variables.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vig.params import ROOT_ENV, project_root
from vig.tracking import PIPELINE_ID_ENV, pipeline_id, tracking_uri

# Without these Ray reports usage, asks for a token, and binds the routable interface instead of loopback.
RAY_SANDBOX_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}
OBJECT_STORE_BYTES = 512 * 2**20
# Passed through to the workers when set in the driver's environment.
FORWARDED_ENV = ("TRITON_INTERPRET", "CUDA_LAUNCH_BLOCKING", "TORCH_COMPILE_DISABLE")


CHECKPOINTS = "checkpoints"  # folder of the Ray Train checkpoints inside a run folder


def connect(num_cpus: int) -> None:
    """ray.init once per process: the cluster at $RAY_ADDRESS, else a local one with at least `num_cpus` CPUs."""
    import ray

    if ray.is_initialized():
        return
    for key, value in RAY_SANDBOX_ENV.items():
        os.environ.setdefault(key, value)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        # "local": always a private cluster, never one that another process left running on this machine.
        ray.init(
            address="local",
            num_cpus=max(num_cpus, os.cpu_count() or 1),
            include_dashboard=False,
            object_store_memory=OBJECT_STORE_BYTES,
        )


def worker_env() -> dict[str, str]:
    """Environment of the training workers: the MLflow store, project root, pipeline id and import path."""
    root = str(project_root())
    python_path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {
        "MLFLOW_TRACKING_URI": tracking_uri(),
        ROOT_ENV: root,
        PIPELINE_ID_ENV: pipeline_id(),
        "PYTHONPATH": python_path,
    }
    env.update({key: os.environ[key] for key in FORWARDED_ENV if key in os.environ})
    return env


def use_gpus(setting: str | bool) -> bool:
    """`auto`: GPU workers when the cluster has GPUs (call after `connect`)."""
    import ray

    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return bool(setting)


def run_on_workers(
    train_fn: Callable[[dict[str, Any]], Any],
    loop_config: dict[str, Any],
    *,
    num_workers: int,
    use_gpu: str | bool,
    cpus_per_worker: int,
    storage: Path,
    name: str,
    max_failures: int,
    keep_checkpoints: int = 1,
) -> Any:
    """Run `train_fn(loop_config)` on `num_workers` Ray Train workers (NCCL on GPUs, gloo on CPUs).

    Checkpoints reported by the workers land in `storage/name`; a worker failure restarts the group from the
    newest one (up to `max_failures` times), and a new call with the same folder continues from it too.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    connect(num_workers * cpus_per_worker)
    gpu = use_gpus(use_gpu)
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if gpu else {})}
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage.resolve()),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env()},
        ),
    )
    return trainer.fit()


def run_training(worker: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], config: Any, folder: Path) -> dict:
    """Run `worker(loop_config)` on Ray Train workers (`config.backend == "ray"`) or in this process.

    `folder` holds the unfinished run's checkpoints and is removed once the run completed; returns the content
    of the metrics file (`config.metrics`) the worker wrote.
    """
    if config.backend == "ray":
        run_on_workers(
            worker,
            loop_config,
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            cpus_per_worker=config.cpus_per_worker,
            storage=folder,
            name=CHECKPOINTS,
            max_failures=config.max_failures,
            keep_checkpoints=config.keep_checkpoints,
        )
    else:
        worker(loop_config)
    shutil.rmtree(folder)
    return json.loads(Path(config.metrics).read_text())
