"""`python -m stages.shard`: the layouts named in data/layout.json -> WebDataset shards under shards/<task>/.

Reads params.yaml's `shard` section. Outputs: shards/ (tars + one manifest.json per task) and
metrics/shard.json; the manifests are logged to MLflow as artifacts, counts, skips and samples/s as metrics.
"""
from __future__ import annotations

import mlflow

from vig.atomic import write_json
from vig.data.layout import LAYOUT_FILE, read_layout
from vig.data.sharding import MANIFEST, ShardSettings, shard_all
from vig.params import load_params, project_root
from vig.tracking import stage_run

LAYOUT = f"data/{LAYOUT_FILE}"
SHARD_DIR = "shards"
METRICS_FILE = "metrics/shard.json"


def main() -> None:
    params = load_params()["shard"]
    root = project_root()
    with stage_run("shard", params):
        result = shard_all(read_layout(root / LAYOUT), root / SHARD_DIR, ShardSettings.from_params(params))
        metrics = result["metrics"]
        mlflow.log_metrics(metrics)
        for task in result["manifests"]:
            mlflow.log_artifact(str(root / SHARD_DIR / task / MANIFEST), artifact_path=task)
        write_json(root / METRICS_FILE, metrics)
    seconds, throughput = metrics["seconds"], metrics["samples_per_s"]
    print(f"shard: {metrics['samples']} samples in {seconds:.1f} s ({throughput:.0f} samples/s)")


if __name__ == "__main__":
    main()
