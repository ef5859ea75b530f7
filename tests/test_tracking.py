import subprocess
import sys

import mlflow

from vig import tracking


def test_stage_run_logs_params_metrics_artifact_and_tags(mlflow_store, tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.PIPELINE_ID_ENV, "pipe-123")
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"samples": 3}')
    with tracking.stage_run("shard", {"shard_size": 64, "splits": ["train", "val"]}, experiment="unit") as run:
        mlflow.log_metric("samples_per_s", 12.5)
        mlflow.log_artifact(str(manifest))
    client = mlflow.MlflowClient(tracking_uri=mlflow_store)
    stored = client.get_run(run.info.run_id)
    assert stored.data.params == {"shard.shard_size": "64", "shard.splits": '["train", "val"]'}
    assert stored.data.metrics["samples_per_s"] == 12.5
    assert stored.data.tags["stage"] == "shard"
    assert stored.data.tags["pipeline_id"] == "pipe-123"
    assert len(stored.data.tags["git_commit"]) in (40, len("unknown"))
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["manifest.json"]
    experiment = client.get_experiment(stored.info.experiment_id)
    assert experiment.name == "unit" and experiment.artifact_location.startswith(f"file://{tmp_path}")


def test_pipeline_id_is_shared_by_processes_launched_from_one_parent(monkeypatch):
    monkeypatch.delenv(tracking.PIPELINE_ID_ENV, raising=False)
    # Two children of one process named `dvc` (as `dvc repro` launches stages) derive the same id.
    script = (
        "import subprocess\n"
        "code = 'from vig.tracking import pipeline_id; print(pipeline_id())'\n"
        f"ids = {{subprocess.run([{sys.executable!r}, '-c', code], capture_output=True, text=True).stdout for _ in range(2)}}\n"
        "print(len(ids), ids.pop().strip())\n"
    )
    out = subprocess.run(
        ["bash", "-c", f'exec -a dvc {sys.executable} -c "$0"', script], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "1" and len(out[1]) == 12
