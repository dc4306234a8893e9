"""Process-wide defaults the CLI applies once at start (never at import time).

- MLflow tracks to a sqlite database at an *absolute* path inside the project (MLflow's
  own default, ``sqlite:///mlflow.db``, is relative to the working directory).
- Telemetry of MLflow, Prefect and DVC is off.
- Prefect runs without a server unless ``PREFECT_API_URL`` is set; its temporary server
  gets 120 s to start (Prefect's 20 s is too short on a busy 2-core machine).

Anything already set in the environment wins, so a tracking server or PostgreSQL is one
environment variable away.
"""

from __future__ import annotations

import os
from pathlib import Path

TELEMETRY_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


PREFECT_DEFAULTS = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def default_tracking_uri(root: Path) -> str:
    """The embedded MLflow store: ``sqlite:////abs/path/mlruns.db``."""
    return f"sqlite:///{(Path(root).resolve() / 'mlruns.db').as_posix()}"


def apply_runtime_defaults(root: Path) -> dict[str, str]:
    """Fill unset environment variables; return what the process now uses."""
    for key, value in {**TELEMETRY_OFF, **PREFECT_DEFAULTS}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_TRACKING_URI", default_tracking_uri(root))
    return {k: os.environ[k] for k in (*TELEMETRY_OFF, "MLFLOW_TRACKING_URI")}
