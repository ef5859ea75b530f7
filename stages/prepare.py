"""`python -m stages.prepare`: generate the embedded DigitScenes or validate real dataset roots; write data/layout.json.

Reads params.yaml's `data` section. Outputs: data/ (layout.json, and digitscenes/ when embedded data is
used) and metrics/prepare.json.
"""
from __future__ import annotations

import mlflow

from vig.atomic import write_json
from vig.data.layout import LAYOUT_FILE, prepare
from vig.params import load_params, project_root
from vig.tracking import stage_run

DATA_DIR = "data"
METRICS_FILE = "metrics/prepare.json"


def main() -> None:
    params = load_params()["data"]
    root = project_root()
    with stage_run("prepare", params):
        metrics = prepare(params, root / DATA_DIR, root)
        mlflow.log_metrics({"seconds": metrics["seconds"]} | {
            f"{dataset}.{split}": count
            for dataset, counts in metrics.items() if isinstance(counts, dict)
            for split, count in counts.items()
        })  # fmt: skip
        mlflow.log_artifact(str(root / DATA_DIR / LAYOUT_FILE))
        write_json(root / METRICS_FILE, metrics)
    print(f"prepare: wrote {DATA_DIR}/{LAYOUT_FILE} in {metrics['seconds']:.1f} s")


if __name__ == "__main__":
    main()
