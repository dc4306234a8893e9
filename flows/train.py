"""Prefect flows for the model side: cross-validate, tune, register, the whole pipeline.

Each flow runs the wsimil command line in the project folder, so a run started from the
Prefect UI does exactly what the same command does in a shell: the CLI stays the only
reader of params.yaml, MLflow records the run, and nothing is computed twice. Parameters
are typed, so the UI shows a form; ``overrides`` become ``--set KEY=VALUE`` for that run.

The pipeline flow runs ``dvc repro`` (or ``dvc exp run -S KEY=VALUE ...`` when overrides
are given), so DVC stays the owner of what reruns. Prefect caching is off everywhere.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from wsimil.models import MODELS

Family = Literal[tuple(MODELS)]  # the UI's choices, in MODELS order
RUN_ID = re.compile(r"MLflow run ([0-9a-f]{32})")


def project_dir(given: str | None) -> Path:
    """The project folder: the argument, ``WSIMIL_PROJECT_DIR``, or this checkout."""
    return Path(given or os.environ.get("WSIMIL_PROJECT_DIR") or Path(__file__).parents[1])


def _sets(overrides: dict[str, str]) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]


@task(name="wsimil-cli", task_run_name="wsimil {args[0]}", cache_policy=NO_CACHE)
def run_cli(args: list[str], root: str) -> str:
    """``python -m wsimil ARGS`` in ``root``; its stdout, or an error with its last words."""
    return _run([sys.executable, "-m", "wsimil", *args], root)


@task(name="dvc", task_run_name="dvc {args[0]}", cache_policy=NO_CACHE)
def run_dvc(args: list[str], root: str) -> str:
    """``dvc ARGS`` in ``root`` (the venv's dvc, beside this Python)."""
    dvc = Path(sys.executable).with_name("dvc")
    return _run([str(dvc) if dvc.exists() else "dvc", *args], root)


def _run(cmd: list[str], root: str) -> str:
    logger = get_run_logger()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)
    for line in res.stdout.strip().splitlines()[-20:]:
        logger.info(line)
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"`{' '.join(cmd[-4:])}` exited {res.returncode}: {tail}")
    return res.stdout


@flow(name="wsimil-crossval")
def crossval_flow(
    model: Family = "dtfd",
    overrides: dict[str, str] | None = None,
    project: str | None = None,
) -> dict:
    """Cross-validate one model family; returns the MLflow parent run id and the summary."""
    out = run_cli(
        ["crossval", "--model", model, *_sets(overrides or {})], str(project_dir(project))
    )
    found = RUN_ID.search(out)
    return {"mlflow_run_id": found.group(1) if found else None, "summary": out.strip()}


@flow(name="wsimil-tune")
def tune_flow(
    model: Family = "dmsmil",
    n_trials: int | None = None,
    overrides: dict[str, str] | None = None,
    project: str | None = None,
) -> str:
    """One Optuna worker on the family's study (several may run at once)."""
    args = ["tune", "--model", model, *_sets(overrides or {})]
    if n_trials:
        args += ["--n-trials", str(n_trials)]
    return run_cli(args, str(project_dir(project))).strip()


@flow(name="wsimil-register")
def register_flow(model: Family = "dtfd", project: str | None = None) -> str:
    """Register the tuned fold ensemble; the champion alias moves only on the gate's evidence."""
    return run_cli(["register", "--model", model], str(project_dir(project))).strip()


@flow(name="wsimil-pipeline")
def pipeline_flow(
    overrides: dict[str, str] | None = None,
    stages: list[str] | None = None,
    project: str | None = None,
) -> str:
    """The DVC pipeline: ``dvc repro [stages]``, or ``dvc exp run -S k=v`` with overrides."""
    root = str(project_dir(project))
    if overrides:
        sets = [arg for k, v in overrides.items() for arg in ("-S", f"{k}={v}")]
        return run_dvc(["exp", "run", *sets, *(stages or [])], root).strip()
    return run_dvc(["repro", *(stages or [])], root).strip()
