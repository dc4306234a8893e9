"""MLflow conventions: what every run records about where its numbers came from.

- ``git_commit`` and ``git_dirty``: the code version.
- ``data_version``: the DVC hash (from ``dvc.lock``) of the feature cache the run read.
- ``seed``, ``model_family``, ``wsimil_version``.
- params: the model and train sections, flattened to dotted keys (plus ``trial.number``).
- artifacts ``lineage/``: params.yaml, dvc.lock, splits.json and ``resolved_params.yaml``
  (every section as the run used it), which ``wsimil reproduce`` rebuilds the run from.

This module is the only one (with ``crossval``/``tune``/``registry``/``lineage``) that
imports MLflow.
"""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import time
from pathlib import Path

import yaml

LAUNCHER_RUN = "MLFLOW_RUN_ID"  # set by `mlflow run` for the entry point's command
RESOLVED_PARAMS = "lineage/resolved_params.yaml"


def start_top_run(experiment: str, run_name: str):
    """The run a command records into: a new one in ``experiment``, nested if one is active.

    Under ``mlflow run`` (an MLproject entry point) the launcher has already opened a run
    and says so in ``MLFLOW_RUN_ID``: that run becomes the command's run, so the project
    run holds the results (its experiment is the one given to ``mlflow run``).
    """
    import mlflow

    if mlflow.active_run() is None and os.environ.get(LAUNCHER_RUN):
        return mlflow.start_run()
    mlflow.set_experiment(experiment)
    return mlflow.start_run(run_name=run_name, nested=mlflow.active_run() is not None)


def log_history(history: list[dict]) -> None:
    """Per-epoch metrics (``{"epoch": e, name: value, ...}`` rows) into the active run, in
    one store write: one ``log_metrics`` per epoch costs ~35 ms each on sqlite."""
    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), now, int(row["epoch"]))
        for row in history
        for key, value in row.items()
        if key != "epoch"
    ]
    if metrics:
        mlflow.MlflowClient().log_batch(mlflow.active_run().info.run_id, metrics=metrics)


def git_state(root: Path) -> dict[str, str]:
    """``git_commit`` (or "unknown" outside a git checkout), ``git_dirty`` and what is dirty.

    ``git_dirty`` is about the code and configuration the commit does not hold. Files whose
    content every run records itself are left out, so ``dvc repro`` (which rewrites them on
    its way) does not make its own runs dirty: ``dvc.lock`` and ``params.yaml`` (logged as
    lineage artifacts, with the resolved params) and the outputs of the DVC stages (the data
    version pins them; ``splits.json`` is logged too).
    """

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=20
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return res.stdout if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no", "--no-renames", ".")
    prefix = (git("rev-parse", "--show-prefix") or "").strip()
    if status is None:
        return {"git_commit": (commit or "").strip() or "unknown", "git_dirty": "unknown"}
    recorded = _recorded_by_runs(Path(root))
    dirty = []
    for line in status.splitlines():
        path = line[3:].strip().strip('"')
        rel = path[len(prefix) :] if prefix and path.startswith(prefix) else path
        if not any(fnmatch.fnmatch(rel, pat) or rel.startswith(pat.rstrip("/") + "/")
                   for pat in recorded):  # fmt: skip
            dirty.append(rel)
    return {
        "git_commit": commit.strip() if commit else "unknown",
        "git_dirty": str(bool(dirty)).lower(),
        **({"git_dirty_files": ",".join(dirty)[:500]} if dirty else {}),
    }


def _recorded_by_runs(root: Path) -> list[str]:
    """Patterns of the files a run records itself: dvc.lock, params.yaml, the stage outputs."""
    patterns = ["dvc.lock", "params.yaml"]
    try:
        stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return patterns
    for stage in stages.values():
        spec = stage.get("do", stage) if isinstance(stage, dict) else {}
        for kind in ("outs", "metrics", "plots"):
            for out in spec.get(kind) or []:
                path = next(iter(out)) if isinstance(out, dict) else str(out)
                patterns.append(re.sub(r"\$\{[^}]*\}", "*", path))
    return patterns


def dvc_out_hash(root: Path, out_path: str | Path) -> str:
    """The md5 that ``dvc.lock`` records for the stage output at ``out_path``.

    ``out_path`` is relative to ``root``, or absolute under it (``Params.under``).
    Returns "untracked" when no stage in dvc.lock produces it (e.g. a cache the user
    brought without DVC).
    """
    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        return "untracked"
    doc = yaml.safe_load(lock.read_text()) or {}
    path = Path(out_path)
    if path.is_absolute() and path.is_relative_to(root):  # dvc.lock paths are root-relative
        path = path.relative_to(root)
    want = path.as_posix().rstrip("/")
    for stage in (doc.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if Path(out.get("path", "")).as_posix().rstrip("/") == want:
                return str(out.get("md5") or out.get("hash") or "unknown")
    return "untracked"


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists become strings."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat
