"""Prefect flows for the model side: cross-validate, tune, register, the whole pipeline.

Each flow runs the wsimil command line in the project folder, so a run started from the
Prefect UI does exactly what the same command does in a shell: the CLI stays the only
reader of params.yaml, MLflow records the run, and nothing is computed twice. Parameters
are typed, so the UI shows a form; ``overrides`` become ``--set KEY=VALUE`` for that run.
Each command gets ``timeout_h`` hours (default 24); past that it is stopped with every
process it started, and the run fails saying so. It also dies if the flow run's process does.

The pipeline flow runs ``dvc repro`` (or ``dvc exp run -S KEY=VALUE ...`` when overrides
are given), so DVC stays the owner of what reruns. Prefect caching is off everywhere.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from wsimil.models import MODELS
from wsimil.runtime import die_with_parent

Family = Literal[tuple(MODELS)]  # the UI's choices, in MODELS order
RUN_ID = re.compile(r"MLflow run ([0-9a-f]{32})")
TIMEOUT_H = 24.0  # a cross-validation or tuning run on a real cohort takes hours, not days


def project_dir(given: str | None) -> Path:
    """The project folder: the argument, ``WSIMIL_PROJECT_DIR``, or this checkout."""
    return Path(given or os.environ.get("WSIMIL_PROJECT_DIR") or Path(__file__).parents[1])


def _sets(overrides: dict[str, str]) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]


@task(name="wsimil-cli", task_run_name="wsimil {args[0]}", cache_policy=NO_CACHE)
def run_cli(args: list[str], root: str, timeout_h: float = TIMEOUT_H) -> str:
    """``python -m wsimil ARGS`` in ``root``; its stdout, or an error with its last words."""
    return _run([sys.executable, "-m", "wsimil", *args], root, timeout_h)


@task(name="dvc", task_run_name="dvc {args[0]}", cache_policy=NO_CACHE)
def run_dvc(args: list[str], root: str, timeout_h: float = TIMEOUT_H) -> str:
    """``dvc ARGS`` in ``root`` (the venv's dvc, beside this Python)."""
    dvc = Path(sys.executable).with_name("dvc")
    return _run([str(dvc) if dvc.exists() else "dvc", *args], root, timeout_h)


def _run(cmd: list[str], root: str, timeout_h: float) -> str:
    """Run ``cmd`` in its own process group, which is stopped whole on timeout or error."""
    logger = get_run_logger()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=die_with_parent(),
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout_h * 3600)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        out, err = proc.communicate()
        tail = "\n".join((err or out).strip().splitlines()[-3:])
        raise RuntimeError(
            f"`{' '.join(cmd[-4:])}` ran past this flow's time limit of {timeout_h:g} h "
            f"(timeout_h) and was stopped with the processes it started; run it again with a "
            f"larger timeout_h, or make the run smaller. Its last words: {tail or '(none)'}"
        ) from None
    finally:
        if proc.poll() is None:  # the flow run is being cancelled or failed: take it along
            _stop_group(proc)
    for line in out.strip().splitlines()[-20:]:
        logger.info(line)
    if proc.returncode != 0:
        tail = "\n".join((err or out).strip().splitlines()[-5:])
        raise RuntimeError(f"`{' '.join(cmd[-4:])}` exited {proc.returncode}: {tail}")
    return out


def _stop_group(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to ``proc``'s process group, SIGKILL to what is left after ``grace_s``."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # children of a stopped command too


@flow(name="wsimil-crossval")
def crossval_flow(
    model: Family = "dtfd",
    overrides: dict[str, str] | None = None,
    project: str | None = None,
    timeout_h: float = TIMEOUT_H,
) -> dict:
    """Cross-validate one model family; returns the MLflow parent run id and the summary."""
    args = ["crossval", "--model", model, *_sets(overrides or {})]
    out = run_cli(args, str(project_dir(project)), timeout_h)
    found = RUN_ID.search(out)
    return {"mlflow_run_id": found.group(1) if found else None, "summary": out.strip()}


@flow(name="wsimil-tune")
def tune_flow(
    model: Family = "dmsmil",
    n_trials: int | None = None,
    overrides: dict[str, str] | None = None,
    project: str | None = None,
    timeout_h: float = TIMEOUT_H,
) -> str:
    """One Optuna worker on the family's study (several may run at once)."""
    args = ["tune", "--model", model, *_sets(overrides or {})]
    if n_trials:
        args += ["--n-trials", str(n_trials)]
    return run_cli(args, str(project_dir(project)), timeout_h).strip()


@flow(name="wsimil-register")
def register_flow(
    model: Family = "dtfd", project: str | None = None, timeout_h: float = TIMEOUT_H
) -> str:
    """Register the tuned fold ensemble; the champion alias moves only on the gate's evidence."""
    return run_cli(["register", "--model", model], str(project_dir(project)), timeout_h).strip()


@flow(name="wsimil-pipeline")
def pipeline_flow(
    overrides: dict[str, str] | None = None,
    stages: list[str] | None = None,
    project: str | None = None,
    timeout_h: float = TIMEOUT_H,
) -> str:
    """The DVC pipeline: ``dvc repro [stages]``, or ``dvc exp run -S k=v`` with overrides."""
    root = str(project_dir(project))
    if overrides:
        sets = [arg for k, v in overrides.items() for arg in ("-S", f"{k}={v}")]
        return run_dvc(["exp", "run", *sets, *(stages or [])], root, timeout_h).strip()
    return run_dvc(["repro", *(stages or [])], root, timeout_h).strip()
