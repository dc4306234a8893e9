"""A tiny real wsimil project and helpers for tests that start real servers.

``build_tiny_project`` runs the real CLI (synth → tiles → features → splits) on a cohort of
eight small synthetic slides with a random-initialised ResNet-18, so the orchestration tests
(Prefect deployments, MLflow Projects, PostgreSQL) drive the same commands a user does.
Servers are started in their own process group on 127.0.0.1 and stopped by that group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

SMALL_TRAIN = {"epochs": 2, "device": "cpu", "cpu_threads": 1}
TINY_PARAMS = {
    "synth": {"out_dir": "data/cohort", "n_slides": 8, "n_patients": 8, "width_px": 1024,
              "height_px": 768, "tumour_share": 0.08, "seed": 3},
    "tiles": {"slides_csv": "data/cohort/slides.csv", "tile_px": 64, "top_k": 8},
    "features": {"extractor": "resnet18", "weights": "random", "batch_size": 16},
    "crossval": {"cohort_csv": "data/cohort/slides.csv", "n_folds": 2, "val_folds": 2,
                 "experiment": "tiny", "n_heatmaps": 0},
    "model": {"abmil": {"hidden_dims": [16], "attention_dim": 8},
              "dtfd": {"hidden_dims": [16], "attention_dim": 8, "n_pseudo_bags": 2,
                       "n_eval_repeats": 1},
              "dmsmil": {"dim": 16, "heads": 2, "points": 2, "fusion_dim": 8}},
    "train": {family: SMALL_TRAIN for family in ("abmil", "dtfd", "dmsmil", "damil")},
    "tune": {"n_trials": 2, "pruner": "none",
             "space": {"dtfd": {"model.dtfd.n_pseudo_bags": {"kind": "int", "low": 2,
                                                             "high": 3}},
                       "dmsmil": {"model.dmsmil.lam": {"kind": "float", "low": 0.1,
                                                       "high": 1.0}}}},
}  # fmt: skip


def clean_env(project: Path, **extra: str) -> dict[str, str]:
    """The environment of a user in ``project``: the venv on PATH, no inherited servers."""
    # MLflow's set_tracking_uri/set_registry_uri/set_experiment in the test process write
    # MLFLOW_* variables that outlive them; a user's shell has none of those.
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("MLFLOW_") and k != "MLFLOW_DISABLE_TELEMETRY")
        and k not in {"PREFECT_API_URL", "WSIMIL_TUNE_STORAGE", "WSIMIL_DASK_ADDRESS"}
    }
    env["PREFECT_HOME"] = str(project / ".prefect")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


@contextlib.contextmanager
def mlflow_store(uri: str):
    """Point this process (and its children) at the MLflow store ``uri``, then undo it all.

    MLflow's setters also write ``MLFLOW_*`` environment variables, which ``None`` does not
    remove; they are restored here so later tests and subprocesses do not inherit them.
    """
    import mlflow

    saved = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # for servers this process starts
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        # set_experiment also keeps the experiment's id in the process: in another store
        # that id names nothing ("No Experiment with id=2 exists" in the next test)
        import mlflow.tracking.fluent

        mlflow.tracking.fluent._active_experiment_id = None
        for k in [k for k in os.environ if k.startswith("MLFLOW_")]:
            del os.environ[k]
        os.environ.update(saved)


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    """Run ``cmd``; fail with its output when it exits non-zero; return stdout + stderr."""
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(
            f"`{' '.join(cmd)}` exited {done.returncode}:\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
    return done.stdout + done.stderr


def wsimil(args: list[str], project: Path, env: dict[str, str] | None = None) -> str:
    """``python -m wsimil ARGS --params project/params.yaml`` in a fresh process."""
    return run(_wsimil_cmd(args, project), project, env or clean_env(project))


def wsimil_status(
    args: list[str], project: Path, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Like :func:`wsimil`, whatever the exit status (for tests of failures)."""
    return subprocess.run(
        _wsimil_cmd(args, project), cwd=project, env=env or clean_env(project),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _wsimil_cmd(args: list[str], project: Path) -> list[str]:
    return [sys.executable, "-m", "wsimil", *args, "--params", str(project / "params.yaml")]


def build_tiny_project(project: Path) -> Path:
    """Write params.yaml and run synth, tiles, features and splits; return the folder."""
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    for step in ("synth", "tiles", "features", "splits"):
        wsimil([step], project)
    return project


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A process in its own session (so its children stop with it), logging to a file."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None):
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``ready`` until true; fail with the log if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"{what} exited {self.proc.returncode}:\n{self.tail()}")
            try:
                if ready():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not ready after {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.5)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the process group, SIGKILL if it outlives ``timeout``."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        self._log.close()
