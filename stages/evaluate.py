"""`python -m stages.evaluate`: top-1 / top-5 / loss of a checkpoint (model and EMA) on the val shards.

Reads params.yaml's `evaluate` section (`--params FILE` and `--backend local` as for stages.pretrain).
The checkpoint is our pretrain output (`checkpoint.kind: pretrain`) or a released official one
(`checkpoint.kind: official`, with the model to build). Output: the metrics JSON named in the section,
also logged to the stage's MLflow run.
"""
from __future__ import annotations

import argparse
import os

from vig.engine.config import BACKENDS, evaluate_config
from vig.engine.evaluate import run_evaluate
from vig.params import load_params, project_root
from vig.tracking import PIPELINE_ID_ENV, pipeline_id, stage_run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", help="params file to read instead of params.yaml")
    parser.add_argument("--backend", choices=BACKENDS, help="override evaluate.backend")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if "evaluate" not in params:
        raise SystemExit(f"{args.params or 'params.yaml'} has no `evaluate` section")
    section = {**params["evaluate"], **({"backend": args.backend} if args.backend else {})}
    config = evaluate_config(section, project_root())
    os.environ.setdefault(PIPELINE_ID_ENV, pipeline_id())
    with stage_run("evaluate", section, experiment=params.get("experiment")) as run:
        metrics = run_evaluate(config, run.info.run_id)
    ema = f", EMA top-1 {metrics['ema_top1']:.2f}%" if "ema_top1" in metrics else ""
    top = f"top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}%"
    print(f"evaluate: {metrics['samples']} val samples, {top}{ema}")


if __name__ == "__main__":
    main()
