"""Rerunning after a param change, and DVC experiments, on the real pipeline with smoke params."""

from __future__ import annotations

import json
import math
import sys

import mlflow
import pytest
import yaml

from pipeline_fixture import ParamRerun, dvc_downstream, get_param, run
from vig.params import flatten

# The first test of the session also pays for the shared smoke pipeline and its rerun (pipeline_fixture.py),
# each bounded by PIPELINE_TIMEOUT_S.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

EXP_PARAM = "evaluate_det.mask_threshold"  # only the report depends on evaluate_det
EXP_VALUE = 0.4
EXP_NAME = "smoke-mask-threshold"


def _runs_of(pipeline_run, filter_string: str) -> list:
    client = mlflow.MlflowClient(tracking_uri=pipeline_run.tracking_uri)
    experiment = client.get_experiment_by_name(pipeline_run.experiment)
    return client.search_runs([experiment.experiment_id], filter_string)


def test_param_change_reruns_the_stage_and_everything_downstream_and_nothing_upstream(pretrain_rerun: ParamRerun):
    rerun, root = pretrain_rerun, pretrain_rerun.pipeline.root
    upstream = set(rerun.pipeline.stages) - rerun.rerun_expected
    assert {"prepare", "shard"} <= upstream
    assert rerun.rerun_expected >= {"pretrain", "benchmark"}

    for stage in upstream:
        assert f"Stage '{stage}' didn't change, skipping" in rerun.dvc_output
        before = rerun.output_mtimes_before[stage]
        assert before and rerun.output_mtimes_after[stage] == before, f"{stage} rewrote outputs"
    for stage in rerun.rerun_expected:
        assert f"Running stage '{stage}'" in rerun.dvc_output
        before, after = rerun.output_mtimes_before[stage], rerun.output_mtimes_after[stage]
        assert after and all(after[name] != before.get(name) for name in after), f"{stage} kept old outputs"

    # One MLflow run per rerun stage under the rerun's pipeline id; the pretrain run has the new value.
    reran = _runs_of(rerun.pipeline, f"tags.pipeline_id = '{rerun.pipeline_id}'")
    assert sorted(r.data.tags["stage"] for r in reran) == sorted(rerun.rerun_expected)
    pretrain = next(r for r in reran if r.data.tags["stage"] == "pretrain")
    assert math.isclose(float(pretrain.data.params[rerun.param]), rerun.new)
    assert json.loads(run(root, sys.executable, "-m", "dvc", "status", "--json").stdout) == {}


def test_dvc_exp_run_metrics_show_in_exp_show_and_in_mlflow(pretrain_rerun: ParamRerun):
    root = pretrain_rerun.pipeline.root
    stage = EXP_PARAM.split(".")[0]
    assert stage in pretrain_rerun.pipeline.stages and dvc_downstream(root, stage) == {"report"}
    done = run(root, sys.executable, "-m", "dvc", "exp", "run", "-n", EXP_NAME, "-S", f"{EXP_PARAM}={EXP_VALUE}")
    ran = {line.split("'")[1] for line in done.stdout.splitlines() if line.startswith("Running stage")}
    # The report reruns only if the stage's metrics file changed (the smoke run's AP may be 0 at any threshold).
    assert stage in ran and ran <= {stage, "report"}, done.stdout

    shown = json.loads(run(root, sys.executable, "-m", "dvc", "exp", "show", "--json").stdout)
    experiments = [rev for commit in shown for exp in commit.get("experiments") or [] for rev in exp["revs"]]
    experiment = next(rev for rev in experiments if rev.get("name") == EXP_NAME)
    data = experiment["data"]
    params = data["params"]["params.yaml"]
    assert "data" in params, f"dvc exp show, params.yaml of {EXP_NAME}: {params}"
    assert get_param(params["data"], EXP_PARAM) == EXP_VALUE
    metrics_file = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]["metrics"][0]
    metrics_file = metrics_file if isinstance(metrics_file, str) else next(iter(metrics_file))
    # An experiment is a git commit: a metrics file that git ignores and DVC does not cache is not in it.
    shown_metrics = data["metrics"][metrics_file]
    assert "data" in shown_metrics, f"dvc exp show, {metrics_file} of {EXP_NAME}: {shown_metrics}"
    exp_metrics = {k: v for k, v in flatten(shown_metrics["data"]).items() if isinstance(v, float)}
    assert exp_metrics, f"dvc exp show has no metrics of {metrics_file} for {EXP_NAME}"
    # dvc exp run applied the experiment to the workspace: the metrics file is the experiment's.
    assert exp_metrics == {
        k: v for k, v in flatten(json.loads((root / metrics_file).read_text())).items() if isinstance(v, float)
    }

    (tracked,) = _runs_of(pretrain_rerun.pipeline, f"tags.stage = '{stage}' and params.`{EXP_PARAM}` = '{EXP_VALUE}'")
    common = set(tracked.data.metrics) & set(exp_metrics)
    assert common, f"no metric both in MLflow ({sorted(tracked.data.metrics)}) and dvc exp show"
    assert all(math.isclose(tracked.data.metrics[k], exp_metrics[k], rel_tol=1e-6) for k in common)
