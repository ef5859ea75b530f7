"""`python -m stages.benchmark`: throughput and memory of our ViG models against DeiT baselines on this machine.

Reads params.yaml's `benchmark` section (its `cpu` keys replace the rest when no GPU is present).
Outputs: metrics/benchmark.json (headline numbers and ratios), reports/benchmark_full.json (every cell,
the environment and the protocol), reports/benchmark_plot.csv (DVC plots) and reports/benchmark_*.png,
all also in the MLflow run.
"""
from __future__ import annotations

import mlflow
import torch

from vig import benchmark
from vig.params import load_params, project_root
from vig.tracking import stage_run

REPORTS_DIR = "reports"
METRICS_FILE = "metrics/benchmark.json"


def main() -> None:
    params = load_params()["benchmark"]
    root = project_root()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = benchmark.config_from_params(params, device, root)
    with stage_run("benchmark", params):
        record = benchmark.run_benchmark(config)
        if params.get("profile"):
            record["profiles"] = benchmark.profile_benchmark(config)
        outputs = benchmark.write_outputs(record, root / REPORTS_DIR, metrics_path=root / METRICS_FILE)
        mlflow.set_tags({"device": record["environment"]["device"], "on_cpu": record["on_cpu"]})
        mlflow.log_metrics(benchmark.mlflow_metrics(record))
        for path in outputs.values():
            mlflow.log_artifact(str(path))
    print(benchmark.summary_table(record))
    if record["on_cpu"]:
        print("benchmark: no GPU here, so this was the reduced CPU sweep (params.yaml benchmark.cpu)")


if __name__ == "__main__":
    main()
