"""The MLflow UI (`vig-ui`) on the smoke pipeline's store, driven in headless Chromium through Selenium.

Screenshots land in test-artifacts/ (git-ignored): mlflow-runs.png (the runs of one pipeline run with a metric
of each stage) and mlflow-compare.png (the compare view of two pretrain runs).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from pipeline_fixture import REPO_ROOT, ParamRerun, PipelineRun, project_env

# The first test of the session also pays for the shared smoke pipeline and its rerun (pipeline_fixture.py),
# each bounded by PIPELINE_TIMEOUT_S.
pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(2400)]

ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Headless on a closed network: without the background-networking flags Chromium keeps calling Google's hosts.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
UI_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_ui(pretrain_rerun: ParamRerun, tmp_path_factory) -> str:
    """`vig-ui` serving the smoke project's store (one worker, job execution off), stopped with SIGTERM."""
    root = pretrain_rerun.pipeline.root
    services = os.environ.get("VIG_TEST_SERVICES")  # run_tests.sh stops what a crashed pytest leaves
    folder = Path(services) / "mlflow" if services else tmp_path_factory.mktemp("mlflow")
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    with open(folder / "vig-ui.log", "w") as log:
        # Its own process group: vig-ui, the mlflow server it starts and uvicorn stop together.
        server = subprocess.Popen([str(Path(sys.executable).parent / "vig-ui"), "--port", str(port)], cwd=root,
                                  env=project_env(root), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    pid_file = folder / "vig-ui.pid"
    pid_file.write_text(str(server.pid))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + UI_TIMEOUT_S
        while not _healthy(url):
            assert server.poll() is None, f"vig-ui exited {server.returncode}:\n{(folder / 'vig-ui.log').read_text()}"
            assert time.monotonic() < deadline, (
                f"no /health after {UI_TIMEOUT_S} s:\n{(folder / 'vig-ui.log').read_text()}"
            )
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        pid_file.unlink()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError):
        return False


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}", "--window-size=3000,1200"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _experiment_and_runs(pipeline: PipelineRun, pipeline_id: str) -> tuple[str, dict[str, mlflow.entities.Run]]:
    client = mlflow.MlflowClient(tracking_uri=pipeline.tracking_uri)
    experiment = client.get_experiment_by_name(pipeline.experiment)
    runs = client.search_runs([experiment.experiment_id], f"tags.pipeline_id = '{pipeline_id}'")
    return experiment.experiment_id, {run.data.tags["stage"]: run for run in runs}


def _wait_for(driver, xpath: str):
    """The element at `xpath` once the single-page app has rendered it."""
    return WebDriverWait(driver, UI_TIMEOUT_S).until(lambda d: d.find_element(By.XPATH, xpath))


def _close_assistant_panel(driver) -> None:
    """The MLflow Assistant side panel only takes room from the page (cosmetic: the screenshots)."""
    for button in driver.find_elements(By.CSS_SELECTOR, 'button[data-component-id$="assistant.chat_panel.close"]'):
        button.click()


def _show_metric_columns(driver, keys: set[str]) -> None:
    """Tick `keys` in the runs table's column selector (metric columns are hidden by default)."""
    _wait_for(driver, "//button[normalize-space()='Columns']").click()
    search = _wait_for(driver, "//input[@placeholder='Search columns']")
    for key in sorted(keys):
        search.send_keys(Keys.CONTROL, "a")
        search.send_keys(key)
        titles = driver.find_elements(By.CSS_SELECTOR, "span.du-bois-light-tree-title")
        next(title for title in titles if title.text == key).click()
    search.send_keys(Keys.ESCAPE)


def _cell_text(driver, run_id: str, column: str, inner: str = "") -> str:
    selector = f'div[role="row"][row-id="{run_id}"] div[col-id="{column}"] {inner}'
    return WebDriverWait(driver, UI_TIMEOUT_S).until(
        lambda d: d.find_element(By.CSS_SELECTOR, selector).get_attribute("textContent").strip()
    )


def _few_metric_columns(runs: dict[str, mlflow.entities.Run]) -> dict[str, str]:
    """A metric of each run that has metrics, chosen so that few columns cover all runs (the grid draws only
    the columns in view): greedily the name most of the remaining runs share."""
    remaining = {stage: set(run.data.metrics) for stage, run in runs.items() if run.data.metrics}
    chosen: dict[str, str] = {}
    while remaining:
        names = sorted({name for metrics in remaining.values() for name in metrics})
        best = max(names, key=lambda name: sum(name in metrics for metrics in remaining.values()))
        for stage in [stage for stage, metrics in remaining.items() if best in metrics]:
            chosen[stage] = best
            del remaining[stage]
    return chosen


def test_runs_of_every_stage_of_a_pipeline_run_are_listed_with_their_metrics(mlflow_ui, browser, smoke_pipeline):
    experiment_id, runs = _experiment_and_runs(smoke_pipeline, smoke_pipeline.pipeline_id)
    assert sorted(runs) == sorted(smoke_pipeline.stages), "one MLflow run per stage of the pipeline run"
    shown = _few_metric_columns(runs)
    stages = yaml.safe_load((smoke_pipeline.root / "dvc.yaml").read_text())["stages"]
    with_metrics_file = {stage for stage, spec in stages.items() if spec.get("metrics")}
    assert with_metrics_file <= set(shown), f"no metrics in MLflow for {sorted(with_metrics_file - set(shown))}"

    query = urllib.parse.quote(f"tags.pipeline_id = '{smoke_pipeline.pipeline_id}'")
    browser.get(f"{mlflow_ui}/#/experiments/{experiment_id}/runs?searchFilter={query}")
    _wait_for(browser, f"//*[normalize-space()='{len(runs)} matching runs']")
    _close_assistant_panel(browser)
    _show_metric_columns(browser, set(shown.values()))
    for stage, run in runs.items():
        assert _cell_text(browser, run.info.run_id, "attributes.`Run Name`", f'a[href*="{run.info.run_id}"]') == stage
        if stage in shown:
            value = _cell_text(browser, run.info.run_id, f"metrics.`{shown[stage]}`")
            assert math.isclose(float(value), run.data.metrics[shown[stage]], rel_tol=1e-6), (stage, value)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "mlflow-runs.png"))


def test_compare_view_of_two_pretrain_runs(mlflow_ui, browser, pretrain_rerun: ParamRerun):
    experiment_id, first = _experiment_and_runs(pretrain_rerun.pipeline, pretrain_rerun.pipeline.pipeline_id)
    _, second = _experiment_and_runs(pretrain_rerun.pipeline, pretrain_rerun.pipeline_id)
    pair = [first[pretrain_rerun.stage], second[pretrain_rerun.stage]]
    runs = urllib.parse.quote(json.dumps([run.info.run_id for run in pair]))
    browser.set_window_size(1600, 2400)
    browser.get(f"{mlflow_ui}/#/compare-runs?runs={runs}&experiments={urllib.parse.quote(json.dumps([experiment_id]))}")
    _wait_for(browser, "//*[normalize-space()='Comparing 2 Runs from 1 Experiment']")
    _close_assistant_panel(browser)

    run_ids = _wait_for(browser, "//tr[th[normalize-space()='Run ID:']]").text
    assert all(run.info.run_id in run_ids for run in pair)
    # "Show diff only": the one param the rerun changed, with both values.
    browser.find_element(By.CSS_SELECTOR, 'button[aria-label="Parameters - Show diff only"]').click()
    prefix = f"{pretrain_rerun.stage}."
    rows = WebDriverWait(browser, UI_TIMEOUT_S).until(
        lambda d: d.find_elements(By.XPATH, f"//tr[th[starts-with(normalize-space(), '{prefix}')]]")
    )
    assert [row.find_element(By.TAG_NAME, "th").text for row in rows] == [pretrain_rerun.param]
    shown_values = sorted(float(cell.text) for cell in rows[0].find_elements(By.TAG_NAME, "td"))
    assert shown_values == sorted([pretrain_rerun.old, pretrain_rerun.new])
    # The metrics table renders only the rows in view: the first metric names, in order, must be there.
    logged = sorted(set(pair[0].data.metrics) | set(pair[1].data.metrics))
    metric_links = [
        a.get_attribute("textContent") for a in browser.find_elements(By.CSS_SELECTOR, 'a[title="Plot chart"]')
    ]
    assert metric_links and metric_links == logged[: len(metric_links)], (metric_links, logged)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "mlflow-compare.png"))
