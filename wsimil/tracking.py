"""MLflow conventions: what every run records about where its numbers came from.

- ``git_commit`` and ``git_dirty``: the code version.
- ``data_version``: the DVC hash (from ``dvc.lock``) of the feature cache the run read.
- ``seed``, ``model_family``.
- params: the model and train sections, flattened to dotted keys.

This module is the only one (with ``crossval``/``tune``/``registry``) that imports MLflow.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml


def git_state(root: Path) -> dict[str, str]:
    """``git_commit`` (or "unknown" outside a git checkout) and ``git_dirty``."""

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=20
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": commit or "unknown",
        "git_dirty": "unknown" if status is None else str(bool(status)).lower(),
    }


def dvc_out_hash(root: Path, out_path: str) -> str:
    """The md5 that ``dvc.lock`` records for the stage output at ``out_path``.

    Returns "untracked" when no stage in dvc.lock produces it (e.g. a cache the user
    brought without DVC).
    """
    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        return "untracked"
    doc = yaml.safe_load(lock.read_text()) or {}
    want = Path(out_path).as_posix().rstrip("/")
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
