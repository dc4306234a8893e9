"""Embedded defaults: MLflow on an absolute sqlite path, telemetry off, env wins."""

import os
from pathlib import Path

from wsimil.runtime import apply_runtime_defaults, default_tracking_uri


def test_tracking_uri_is_absolute_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri(Path("."))
    assert uri.startswith("sqlite:////")
    assert Path(uri.removeprefix("sqlite:///")) == tmp_path.resolve() / "mlruns.db"


def test_defaults_fill_unset_and_keep_set(tmp_path, monkeypatch):
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY", "DVC_NO_ANALYTICS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    used = apply_runtime_defaults(tmp_path)
    assert used["MLFLOW_TRACKING_URI"] == default_tracking_uri(tmp_path)
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert os.environ["DVC_NO_ANALYTICS"] == "1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert apply_runtime_defaults(tmp_path)["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"


def test_prefects_temporary_server_gets_time_to_start_on_a_busy_machine(tmp_path, monkeypatch):
    from prefect.settings import Settings

    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    assert Settings().server.ephemeral.startup_timeout_seconds == 20  # Prefect's own
    apply_runtime_defaults(tmp_path)
    assert Settings().server.ephemeral.startup_timeout_seconds == 120
