"""Test-wide settings: sandbox-safe Ray/DVC/MLflow environment and a private MLflow store per test."""
import os

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest  # noqa: E402
from pipeline_fixture import pretrain_rerun, smoke_pipeline  # noqa: E402,F401  (session-wide pipeline runs)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """An empty sqlite MLflow store and artifact folder under tmp_path, used by vig.tracking."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("VIG_ROOT", str(tmp_path))
    return uri
