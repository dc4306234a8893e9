"""wsimil on shared services: an MLflow tracking server on PostgreSQL, Optuna on PostgreSQL.

A real PostgreSQL (this machine's server binaries, on 127.0.0.1, password auth for a
``wsimil`` role owning the ``mlflow`` and ``optuna`` databases) and a real ``mlflow server``
on it with proxied artifacts, as in ``docker/compose.yaml``. The real CLI runs a
cross-validation and a two-worker tuning on a copy of the tiny project, with only the two
environment variables a user sets; the runs, artifacts and trials are then read back from
the server and from PostgreSQL itself, and the project must hold no sqlite or journal file.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import pytest
from projects import BIN, Server, clean_env, free_port, run, wsimil

from wsimil.runtime import TELEMETRY_OFF


def find_pg_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` (Debian), else ``initdb`` on PATH."""
    found = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()]
    found.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


PG_BIN = find_pg_bin()
PASSWORD = "wsimil-test"
FAMILY = "dtfd"
STUDY = "tiny-dtfd"  # <crossval.experiment>-<family> of the tiny project
BUDGET = 3  # one more trial than workers, so both must take one

pytestmark = [
    pytest.mark.slow,
    pytest.mark.postgres,
    pytest.mark.skipif(
        PG_BIN is None,
        reason="PostgreSQL server binaries (initdb, pg_ctl) not found in "
        "/usr/lib/postgresql/*/bin or on PATH; install PostgreSQL to run this test",
    ),
]


@dataclass
class Postgres:
    port: int

    def url(self, database: str) -> str:
        """The URL a user gives MLflow and Optuna; the driver is named, as SQLAlchemy 2.1
        reads a bare ``postgresql://`` as psycopg 3, which wsimil does not install."""
        return f"postgresql+psycopg2://wsimil:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def query(self, database: str, sql: str, *args) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(
            host="127.0.0.1", port=self.port, user="wsimil", password=PASSWORD, dbname=database
        )
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall()
        finally:
            conn.close()


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    """PostgreSQL in a temporary folder on a free loopback port, stopped and removed after.

    The server refuses to run as root: as root, every server command runs as ``postgres``,
    which must own the folder (pytest's own tmp folders are private to root).
    """
    as_postgres: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="wsimil-pg-"))
    try:
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "as root, PostgreSQL needs a 'postgres' user to run as"
                ) from None
            os.chown(folder, user.pw_uid, user.pw_gid)
            as_postgres = ["runuser", "-u", "postgres", "--"]
        data, env = folder / "data", clean_env(folder)
        pg = [*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data)]
        run(
            [*as_postgres, str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres",
             "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"],
            folder, env, timeout=120,
        )  # fmt: skip
        port = free_port()
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off"
        run([*pg, "-l", str(folder / "server.log"), "-o", options, "-w", "-t", "60", "start"],
            folder, env, timeout=90)  # fmt: skip
        pid = int((data / "postmaster.pid").read_text().split()[0])
        try:
            psql = [*as_postgres, str(PG_BIN / "psql"), "-h", str(folder), "-p", str(port)]
            setup = [  # one -c each: CREATE DATABASE cannot run in a transaction
                f"CREATE ROLE wsimil LOGIN PASSWORD '{PASSWORD}'",
                "CREATE DATABASE mlflow OWNER wsimil",
                "CREATE DATABASE optuna OWNER wsimil",
            ]
            sql = [arg for statement in setup for arg in ("-c", statement)]
            run([*psql, "-U", "postgres", "-v", "ON_ERROR_STOP=1", *sql], folder, env)
            yield Postgres(port)
        finally:
            stop = subprocess.run([*pg, "stop", "-m", "fast", "-w", "-t", "30"], env=env,
                                  capture_output=True, timeout=60)  # fmt: skip
            if stop.returncode != 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGQUIT)  # the postmaster's immediate shutdown
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Tracking:
    url: str
    artifacts: Path


@contextlib.contextmanager
def running_tracking_server(pg: Postgres, folder: Path) -> Iterator[Tracking]:
    """``mlflow server`` on the ``mlflow`` database, artifacts proxied to ``folder``."""
    port = free_port()
    cmd = [
        str(BIN / "mlflow"), "server", "--backend-store-uri", pg.url("mlflow"),
        "--artifacts-destination", str(folder / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    # wsimil starts no server-side jobs; the job runner's worker processes would only take CPU.
    env = clean_env(folder, **TELEMETRY_OFF, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    server = Server(cmd, env, folder / "server.log", cwd=folder)
    url = f"http://127.0.0.1:{port}"
    try:
        # The first start migrates the empty database: give it time.
        server.wait_until(
            lambda: urllib.request.urlopen(f"{url}/health", timeout=5).status == 200,
            timeout=180,
            what="mlflow server",
        )
        yield Tracking(url, folder / "artifacts")
    finally:
        server.stop()


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as pg:
        yield pg


@pytest.fixture(scope="module")
def tracking(postgres, tmp_path_factory) -> Iterator[Tracking]:
    with running_tracking_server(postgres, tmp_path_factory.mktemp("tracking")) as server:
        yield server


@pytest.fixture(scope="module")
def project(tiny_project, tmp_path_factory) -> Path:
    """The tiny project without anything tracked yet: a leftover store would hide a fallback."""
    dst = tmp_path_factory.mktemp("pg") / "project"
    ignore = shutil.ignore_patterns("mlruns.db", "mlruns", "results", ".prefect")
    shutil.copytree(tiny_project, dst, ignore=ignore)
    return dst


@pytest.fixture(scope="module")
def env(project, postgres, tracking) -> dict[str, str]:
    """What a user exports to work against the shared services."""
    return clean_env(
        project, MLFLOW_TRACKING_URI=tracking.url, WSIMIL_TUNE_STORAGE=postgres.url("optuna")
    )


def local_stores(project: Path) -> list[Path]:
    """Files that would mean something fell back to the embedded stores."""
    return [p for p in (project / "mlruns.db", project / "mlruns") if p.exists()] + list(
        project.glob("results/tune/**/journal.log")
    )


def test_crossval_lands_in_postgres_and_its_artifacts_go_through_the_server(
    project, env, postgres, tracking, tmp_path
):
    out = wsimil(["crossval", "--model", FAMILY], project, env)
    run_id = out.rsplit("(MLflow run ", 1)[1].split(")")[0]

    client = mlflow.MlflowClient(tracking_uri=tracking.url)
    parent = client.get_run(run_id)
    assert parent.data.tags["run_kind"] == "crossval"
    assert 0.0 <= parent.data.metrics["cv_auc_mean"] <= 1.0
    folds = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert sorted(r.data.tags["fold"] for r in folds) == ["0", "1"]  # the tiny project's 2 folds
    assert all("test_auc" in r.data.metrics for r in folds)

    # Artifacts: the client uploads through the server (mlflow-artifacts:), which writes
    # them under its --artifacts-destination; read back, they are the numbers logged.
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
    listed = {a.path for a in client.list_artifacts(run_id, "crossval")}
    assert {"crossval/metrics.json", "crossval/models"} <= listed
    stored = list(tracking.artifacts.glob(f"*/{run_id}/artifacts/crossval/metrics.json"))
    assert len(stored) == 1
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id,
        artifact_path="crossval/metrics.json",
        dst_path=str(tmp_path),
        tracking_uri=tracking.url,
    )
    metrics = json.loads(Path(local).read_text())
    assert metrics["auc_mean"] == pytest.approx(parent.data.metrics["cv_auc_mean"])

    # The rows are in PostgreSQL, and nothing was written to an embedded store.
    ids = {run_id, *(r.info.run_id for r in folds)}
    rows = postgres.query("mlflow", "SELECT run_uuid FROM runs WHERE run_uuid = ANY(%s)", list(ids))
    assert {r[0] for r in rows} == ids
    (value,) = postgres.query(
        "mlflow",
        "SELECT value FROM latest_metrics WHERE run_uuid = %s AND key = 'cv_auc_mean'",
        run_id,
    )[0]
    assert value == pytest.approx(parent.data.metrics["cv_auc_mean"])
    assert local_stores(project) == []


def test_two_tune_workers_share_one_study_in_postgres(project, env, postgres, tracking, tmp_path):
    out = wsimil(["tune", "--model", FAMILY, "--init-only"], project, env)
    assert f"study {STUDY} ready" in out

    cmd = [sys.executable, "-m", "wsimil", "tune", "--model", FAMILY, "--n-trials", str(BUDGET),
           "--params", str(project / "params.yaml")]  # fmt: skip
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(log, "w")) for log in logs]
        workers = [
            subprocess.Popen(cmd, cwd=project, env=env, stdout=f, stderr=subprocess.STDOUT)
            for f in files
        ]
        deadline = time.monotonic() + 200
        try:
            for w in workers:
                w.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
                    w.wait()
    for w, log in zip(workers, logs, strict=True):
        assert w.returncode == 0, (
            f"worker {w.pid} exited {w.returncode}:\n{log.read_text()[-4000:]}"
        )

    study = optuna.load_study(study_name=STUDY, storage=postgres.url("optuna"))
    trials = study.trials
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    # MaxTrialsCallback bounds the total; both workers may start the last trial.
    assert BUDGET <= len(trials) <= BUDGET + 1
    assert all(t.state in finished for t in trials), [t.state for t in trials]
    assert [t.number for t in trials] == list(range(len(trials)))
    # Both workers took trials, and each trial names the process that ran it.
    host = socket.gethostname()
    assert {t.user_attrs["worker"] for t in trials} == {f"{host}:{w.pid}" for w in workers}

    # Every trial's MLflow run, nested under the study's run, agrees with the trial.
    client = mlflow.MlflowClient(tracking_uri=tracking.url)
    study_run = study.user_attrs["mlflow_run_id"]
    for t in trials:
        tags = client.get_run(t.user_attrs["mlflow_run_id"]).data.tags
        assert tags["mlflow.parentRunId"] == study_run
        assert tags["trial_number"] == str(t.number)
        assert tags["trial_state"] == t.state.name.lower()
        assert tags["worker"] == t.user_attrs["worker"]
    assert client.get_run(study_run).data.tags["best_trial_number"] == str(study.best_trial.number)

    # PostgreSQL holds the trials and their runs; no journal file or sqlite was written.
    (n,) = postgres.query(
        "optuna",
        "SELECT count(*) FROM trials JOIN studies USING (study_id) WHERE study_name = %s",
        STUDY,
    )[0]
    assert n == len(trials)
    ids = [t.user_attrs["mlflow_run_id"] for t in trials]
    rows = postgres.query("mlflow", "SELECT run_uuid FROM runs WHERE run_uuid = ANY(%s)", ids)
    assert {r[0] for r in rows} == set(ids)
    assert local_stores(project) == []
