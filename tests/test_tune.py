"""Optuna tuning: spaces checked before any trial, studies tracked, workers share storage."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import mlflow
import optuna
import pytest

from wsimil.config import ConfigError, Params, with_overrides
from wsimil.experiment.tune import check_space, init_study, make_storage

SPACE = {
    "dtfd": {
        "model.dtfd.n_pseudo_bags": {"kind": "int", "low": 2, "high": 4},
        "model.dtfd.distill": {"kind": "categorical", "choices": ["maxs", "afs"]},
        "train.dtfd.lr": {"kind": "float", "low": 1e-4, "high": 3e-3, "log": True},
    }
}


def params_with(space: dict) -> Params:
    return Params.model_validate({"tune": {"space": space}})


def test_space_is_checked_before_any_trial():
    assert set(check_space(params_with(SPACE), "dtfd")) == set(SPACE["dtfd"])
    typo = {"dtfd": {"model.dtfd.n_pseudo_bag": {"kind": "int", "low": 2, "high": 4}}}
    with pytest.raises(ConfigError, match="unknown parameter 'model.dtfd.n_pseudo_bag'"):
        check_space(params_with(typo), "dtfd")
    negative = {"dmsmil": {"model.dmsmil.lam": {"kind": "float", "low": -1, "high": 1}}}
    with pytest.raises(ConfigError, match="model.dmsmil.lam"):  # λ must be ≥ 0
        check_space(params_with(negative), "dmsmil")
    with pytest.raises(ConfigError, match="no entry for 'abmil'"):
        check_space(params_with(SPACE), "abmil")


@pytest.mark.parametrize(
    "dim, message",
    [
        ({"kind": "float", "low": 3, "high": 1}, "inverted range"),
        ({"kind": "int", "low": 2, "high": 2}, "empty or inverted"),
        ({"kind": "float", "low": 0, "high": 1, "log": True}, "log range needs low > 0"),
        ({"kind": "categorical", "choices": []}, "non-empty 'choices'"),
    ],
)
def test_bad_ranges_fail_at_load(dim, message):
    with pytest.raises(ValueError, match=message):
        params_with({"dtfd": {"model.dtfd.n_pseudo_bags": dim}})


def test_bad_range_message_names_the_key(tmp_path):
    from wsimil.config import load_params

    p = tmp_path / "params.yaml"
    p.write_text(
        "tune:\n  space:\n    dtfd:\n      model.dtfd.n_pseudo_bags: {kind: int, low: 9, high: 2}\n"
    )
    with pytest.raises(ConfigError, match=r"tune\.space\.dtfd\.model\.dtfd\.n_pseudo_bags"):
        load_params(p)


def test_overrides_are_validated():
    p = with_overrides(Params(), {"train.dtfd.lr": 0.01, "model.dtfd.distill": "mas"})
    assert p.train.dtfd.lr == 0.01 and p.model.dtfd.distill == "mas"
    with pytest.raises(ConfigError, match="distill"):
        with_overrides(Params(), {"model.dtfd.distill": "mean"})


@pytest.mark.skipif(importlib.util.find_spec("psycopg") is not None, reason="psycopg 3 installed")
def test_storage_url_with_a_missing_driver_says_which_url_to_write(tmp_path):
    # SQLAlchemy 2.1 reads postgresql:// as psycopg 3; wsimil installs psycopg2.
    url = "postgresql://wsimil:secret@127.0.0.1:9/optuna"
    with pytest.raises(ConfigError, match=r"driver 'psycopg'.*postgresql\+psycopg2://") as exc:
        make_storage(url, tmp_path / "journal.log")
    assert "secret" not in str(exc.value)


def test_unreachable_storage_is_one_clear_line_from_the_cli(tmp_path, repo_root):
    from projects import clean_env, free_port

    url = f"postgresql+psycopg2://wsimil:secret@127.0.0.1:{free_port()}/optuna"  # nobody there
    with pytest.raises(ConfigError, match="cannot connect") as exc:
        make_storage(url, tmp_path / "journal.log")
    assert "secret" not in str(exc.value) and "***" in str(exc.value)

    space = (
        "tune:\n  space:\n    dtfd:\n      model.dtfd.n_pseudo_bags: {kind: int, low: 2, high: 3}\n"
    )
    (tmp_path / "params.yaml").write_text(space)
    env = clean_env(tmp_path, WSIMIL_TUNE_STORAGE=url)
    done = subprocess.run(
        [sys.executable, "-m", "wsimil", "tune", "--model", "dtfd", "--init-only",
         "--params", str(tmp_path / "params.yaml")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("error: tune storage postgresql+psycopg2://wsimil:***@")
    assert "Traceback" not in done.stderr and "secret" not in done.stderr


WORKER = textwrap.dedent(
    """
    import sys, json
    from pathlib import Path
    import mlflow
    sys.path.insert(0, {tests!r})
    from test_train import SMALL, make_bags
    from wsimil.config import Params, with_overrides
    from wsimil.experiment.crossval import run_crossval
    from wsimil.experiment.tune import make_storage, run_study
    import pandas as pd

    out = Path({out!r})
    mlflow.set_tracking_uri({uri!r})
    splits = json.loads((out / "splits.json").read_text())
    table = pd.read_csv(out / "table.csv", dtype=str)
    bags = {{b.slide_id: b for b in make_bags(16, 1, seed=5)}}
    base = with_overrides(
        Params.model_validate({{"tune": {{"space": {space!r}}}}}),
        {{"model.dtfd.hidden_dims": [16], "model.dtfd.attention_dim": 8, "train.dtfd.epochs": 2,
          "train.dtfd.device": "cpu"}},
    )

    def cv(p, **kw):
        return run_crossval("dtfd", p.model, p.train.dtfd, splits, bags, table=table,
                            cohort_dir=out, experiment="tune-test", lineage={{}}, root=out, **kw)

    run_study("dtfd", base, cv, storage=make_storage(None, out / "journal.log"),
              study_name="s", out_dir=out / "dtfd", n_trials={n_trials})
    """
)


@pytest.mark.slow
def test_two_workers_share_one_journal_and_lose_no_trial(tmp_path, repo_root):
    import pandas as pd
    from test_train import make_bags

    from wsimil.train.splits import make_splits

    bags = make_bags(16, 1, seed=5)
    table = pd.DataFrame(
        {
            "slide_id": [b.slide_id for b in bags],
            "patient_id": [f"p{i // 4}-{i % 2}" for i in range(16)],
            "label": ["tumour" if b.label else "normal" for b in bags],
        }
    )
    table.to_csv(tmp_path / "table.csv", index=False)
    (tmp_path / "splits.json").write_text(json.dumps(make_splits(table, 2, 2, seed=0)))
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    mlflow.set_tracking_uri(uri)
    storage = make_storage(None, tmp_path / "journal.log")
    init_study(storage, "s", experiment="tune-test", sampler_seed=0, pruner="median", startup=1)
    n_trials = 4
    script = WORKER.format(
        tests=str(repo_root / "tests"), out=str(tmp_path), uri=uri, space=SPACE, n_trials=n_trials
    )
    workers = [
        subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    errors = [w.communicate(timeout=300)[1] for w in workers]
    assert all(w.returncode == 0 for w in workers), errors
    study = optuna.load_study(study_name="s", storage=storage)
    finished = [t for t in study.trials if t.state.is_finished()]
    # MaxTrialsCallback bounds the total; two workers may each start the last trial.
    assert n_trials <= len(study.trials) <= n_trials + 1
    assert len(finished) == len(study.trials)
    assert sorted(t.number for t in study.trials) == list(range(len(study.trials)))
    # Every trial has its MLflow run, nested under the one study run, with its state.
    client = mlflow.MlflowClient(uri)
    parent = study.user_attrs["mlflow_run_id"]
    exp = client.get_experiment_by_name("tune-test")
    trial_runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(int(r.data.tags["trial_number"]) for r in trial_runs) == sorted(
        t.number for t in study.trials
    )
    states = {t.number: t.state.name.lower() for t in study.trials}
    for r in trial_runs:
        assert r.data.tags["trial_state"] == states[int(r.data.tags["trial_number"])]
    best = json.loads((tmp_path / "dtfd" / "best.json").read_text())
    assert best["value"] == pytest.approx(study.best_value)
    assert (tmp_path / "dtfd" / "best" / "models" / "ensemble.json").exists()
    assert client.get_run(parent).data.tags["best_trial_number"] == str(study.best_trial.number)
    mlflow.set_tracking_uri(None)
