"""A real Prefect server on loopback: serve the deployments, trigger a run, find its MLflow run.

This is what a user does from the Prefect UI: `prefect server start`, `python flows/deploy.py`,
then Run on a deployment with a changed parameter. The Run button and `prefect deployment
run` call the same API, so the test presses it with the CLI.
"""

from __future__ import annotations

import json
import re
import sys

import mlflow
import pytest
import requests
from projects import BIN, REPO, Server, clean_env, free_port, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME; its API URL."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = clean_env(home, PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_HOME=str(home))
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = Server(cmd, env, home / "server.log")
    api = f"http://127.0.0.1:{port}/api"
    try:
        server.wait_until(
            lambda: requests.get(f"{api}/health", timeout=2).ok, 180, "prefect server"
        )
        yield api, home
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served(prefect_api, tiny_project):
    """`python flows/deploy.py --params <tiny project>` against the server; stopped first."""
    api, home = prefect_api
    # the extraction deployments fan out over a local 2-worker Dask cluster per run
    env = clean_env(
        tiny_project, PREFECT_API_URL=api, PREFECT_HOME=str(home), WSIMIL_DASK_ADDRESS="local:2"
    )
    params = str(tiny_project / "params.yaml")
    cmd = [sys.executable, str(REPO / "flows" / "deploy.py"), "--params", params]
    serving = Server(cmd, env, home / "serve.log", cwd=REPO)

    def deployed() -> bool:
        names = requests.post(f"{api}/deployments/filter", json={}, timeout=5).json()
        return len(names) == 6

    try:
        serving.wait_until(deployed, 180, "python flows/deploy.py")
        yield api, env
    finally:
        serving.stop()  # before the server (the prefect_api fixture stops after this)


def test_the_served_deployments_carry_the_projects_defaults(served, tiny_project):
    api, _ = served
    deployments = requests.post(f"{api}/deployments/filter", json={}, timeout=5).json()
    by_name = {d["name"]: d for d in deployments}
    assert set(by_name) == {
        "wsimil-tiles", "wsimil-features", "wsimil-crossval", "wsimil-tune",
        "wsimil-register", "wsimil-pipeline",
    }  # fmt: skip
    assert by_name["wsimil-crossval"]["parameters"] == {"project": str(tiny_project)}
    tiles = by_name["wsimil-tiles"]["parameters"]["tiles"]
    assert (tiles["top_k"], tiles["tile_px"]) == (8, 64)  # the tiny project's params.yaml
    assert tiles["slides_csv"] == str(tiny_project / "data" / "cohort" / "slides.csv")
    # the form: typed parameters with their defaults
    schema = by_name["wsimil-crossval"]["parameter_openapi_schema"]["properties"]
    assert schema["model"]["enum"] == ["abmil", "dtfd", "damil", "dmsmil"]


def trigger(served, project, deployment: str, *params: str) -> tuple[str, dict]:
    """`prefect deployment run NAME -p ... --watch` (what the UI's Run does); (id, state)."""
    api, env = served
    cmd = [str(BIN / "prefect"), "deployment", "run", deployment]
    for p in params:
        cmd += ["--param", p]
    cmd += ["--watch", "--watch-timeout", "300"]
    try:
        out = run(cmd, project, env, timeout=360)
    except AssertionError as failed:  # --watch exits non-zero when the run fails
        out = str(failed)
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    return flow_run_id, requests.get(f"{api}/flow_runs/{flow_run_id}", timeout=5).json()["state"]


def test_a_run_triggered_with_a_changed_parameter_lands_in_mlflow(served, tiny_project):
    api, _ = served
    flow_run_id, state = trigger(
        served, tiny_project, "wsimil-crossval/wsimil-crossval", "model=abmil",
        'overrides={"train.abmil.epochs": "1", "train.abmil.lr": "0.0007"}',
    )  # fmt: skip
    assert state["type"] == "COMPLETED", state

    # The flow logs the CLI's last line, which names the MLflow run it created.
    logs = requests.post(
        f"{api}/logs/filter",
        json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200},
        timeout=5,
    ).json()
    found = [m for log in logs if (m := re.search(r"MLflow run ([0-9a-f]{32})", log["message"]))]
    assert found, [log["message"] for log in logs]
    run_id = found[-1].group(1)

    client = mlflow.MlflowClient(f"sqlite:///{tiny_project / 'mlruns.db'}")
    tracked = client.get_run(run_id)
    assert tracked.info.status == "FINISHED"
    assert tracked.data.tags["model_family"] == "abmil"
    params = tracked.data.params
    assert (params["train.epochs"], params["train.lr"]) == ("1", "0.0007")  # the changed ones
    assert "cv_auc_mean" in tracked.data.metrics


def test_a_bad_parameter_fails_the_run_with_the_clis_message(served, tiny_project):
    _, state = trigger(
        served, tiny_project, "wsimil-crossval/wsimil-crossval", "model=abmil",
        'overrides={"train.abmil.epoch": "1"}',
    )  # fmt: skip
    assert state["type"] == "FAILED"
    assert "unknown parameter 'train.abmil.epoch' (did you mean 'epochs'?)" in state["message"]


def test_extraction_deployments_fan_out_over_dask(served, tiny_project):
    api, _ = served
    report = tiny_project / "reports" / "tiles.json"
    before = json.loads(report.read_text())["task_runner"]
    assert before.startswith("threads")  # the CLI built the project on threads
    flow_run_id, state = trigger(served, tiny_project, "wsimil-tiles/wsimil-tiles")
    assert state["type"] == "COMPLETED", state
    doc = json.loads(report.read_text())
    assert doc["task_runner"] == "dask local:2"
    assert {r["status"] for r in doc["slides"]} == {"cached"}  # same tiles, nothing redone
    task_runs = requests.post(
        f"{api}/task_runs/filter",
        json={"flow_runs": {"id": {"any_": [flow_run_id]}}},
        timeout=5,
    ).json()
    assert len(task_runs) == 8 and {t["state"]["type"] for t in task_runs} == {"COMPLETED"}
