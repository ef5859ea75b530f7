"""`python -m stages.pretrain`: pretrain the classifier on shards/classification with Ray Train.

Reads params.yaml's `pretrain` section (`--params FILE` reads another params file, e.g. a paper-scale
variant in pipelines/imagenet/; `--backend local` runs in this process without Ray). Outputs:
<out_dir>/last.pt and best.pt (model + EMA weights and the model config), the metrics JSON and the
training-curve PNG named in the section; everything is also logged to the stage's MLflow run. An
interrupted run leaves <out_dir>/run/, which the next call resumes (pretrain.resume).
"""
from __future__ import annotations

import argparse
import os

from vig.engine.config import BACKENDS, pretrain_config
from vig.engine.pretrain import pretrain
from vig.params import load_params, project_root
from vig.tracking import PIPELINE_ID_ENV, pipeline_id, stage_run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", help="params file to read instead of params.yaml")
    parser.add_argument("--backend", choices=BACKENDS, help="override pretrain.backend")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if "pretrain" not in params:
        raise SystemExit(f"{args.params or 'params.yaml'} has no `pretrain` section")
    section = {**params["pretrain"], **({"backend": args.backend} if args.backend else {})}
    config = pretrain_config(section, project_root())
    os.environ.setdefault(PIPELINE_ID_ENV, pipeline_id())  # the workers tag the same pipeline as this run
    with stage_run("pretrain", section, experiment=params.get("experiment")) as run:
        summary = pretrain(config, run.info.run_id)
    print(
        f"pretrain: {summary['steps']} steps, val top-1 {summary['final_top1']:.2f}% "
        f"(EMA {summary.get('final_ema_top1', float('nan')):.2f}%), best {summary['best_top1']:.2f}% "
        f"({summary['best_source']}, epoch {summary['best_epoch']})"
    )


if __name__ == "__main__":
    main()
