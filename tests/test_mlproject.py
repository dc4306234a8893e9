"""`mlflow run mlproject -e <entry>`: the MLproject entry points run the same CLI.

The run `mlflow run` opens must be the run the command records into (one run, with the
project's source tags and the cross-validation results), and bad parameters must fail the
run with the CLI's message.
"""

from __future__ import annotations

import re

import mlflow
import pytest
import yaml
from projects import BIN, REPO, clean_env, run

pytestmark = pytest.mark.slow


def mlflow_run(entry: str, project, *params: str) -> str:
    env = clean_env(project, MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlruns.db'}")
    cmd = [
        str(BIN / "mlflow"), "run", str(REPO / "mlproject"), "-e", entry, "--env-manager", "local",
        "--experiment-name", "tiny", "-P", f"params={project / 'params.yaml'}",
    ]  # fmt: skip
    for p in params:
        cmd += ["-P", p]
    return run(cmd, project, env, timeout=600)


def test_entry_points_cover_crossval_tune_and_register():
    spec = yaml.safe_load((REPO / "mlproject" / "MLproject").read_text())
    entries = spec["entry_points"]
    assert {"crossval", "tune", "register"} <= set(entries)
    for name in ("crossval", "tune", "register"):
        assert entries[name]["command"].startswith(f"python -m wsimil {name} --model {{model}}")


def test_crossval_entry_point_records_into_the_project_run(tiny_project):
    out = mlflow_run("crossval", tiny_project, "model=dtfd", "set=train.dtfd.epochs=1")
    run_id = re.search(r"Run \(ID '([0-9a-f]{32})'\) succeeded", out).group(1)

    client = mlflow.MlflowClient(f"sqlite:///{tiny_project / 'mlruns.db'}")
    project_run = client.get_run(run_id)
    tags = project_run.data.tags
    assert tags["mlflow.project.entryPoint"] == "crossval"
    assert (tags["run_kind"], tags["model_family"]) == ("crossval", "dtfd")
    assert project_run.data.params["train.epochs"] == "1"  # -P set=... reached the CLI
    assert "cv_auc_mean" in project_run.data.metrics
    folds = client.search_runs(
        [project_run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'"
    )
    assert sorted(r.data.tags["fold"] for r in folds) == ["0", "1"]


def test_a_bad_model_name_fails_with_the_clis_message(tiny_project):
    with pytest.raises(
        AssertionError, match="unknown model 'transmil'; choose one of abmil, dtfd, damil, dmsmil"
    ):
        mlflow_run("crossval", tiny_project, "model=transmil")
