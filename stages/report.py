"""`python -m stages.report`: the pipeline report, from every stage's metrics files and this pipeline's MLflow runs.

Reads params.yaml's `report` section (and the rest of params.yaml for the model and dataset names).
Outputs: reports/report.md with its figures in reports/report_figures/, and reports/report.html (figures
inline), all also in the MLflow run. Stages that have not run are listed as "not run".
"""
from __future__ import annotations

import mlflow

from vig import report
from vig.params import load_params, project_root
from vig.tracking import git_commit, stage_run, tracking_uri

REPORTS_DIR = "reports"


def main() -> None:
    all_params = load_params()
    params = all_params["report"]
    root = project_root()
    with stage_run("report", params) as run:
        inputs = report.gather(
            root, all_params, tracking_uri(), run.data.tags["pipeline_id"], git_commit(), exclude_run=run.info.run_id
        )
        outputs = report.build_report(inputs, root / REPORTS_DIR, params["title"], params["max_curve_panels"])
        for name, path in outputs.items():
            mlflow.log_artifact(str(path), report.FIGURES_DIR if name.startswith("figure:") else None)
    ran = [stage for stage in report.STAGES if stage in inputs.metrics or stage in inputs.runs]
    print(f"report: wrote {outputs['markdown']} and {outputs['html']} ({len(ran)}/{len(report.STAGES)} stages ran)")


if __name__ == "__main__":
    main()
