"""Optuna over cross-validation: one study per model family, tracked in MLflow.

- The objective is the mean test AUC over the shared folds; each fold's AUC is reported as
  ``trial.report(auc, step=fold)`` so a fold-aware pruner (Wilcoxon, or median) can stop
  a hopeless trial after a few folds.
- Storage: an Optuna journal file by default (embedded, safe for several processes on one
  machine), or any RDB URL (PostgreSQL for many machines). The study is created once by
  :func:`init_study` before workers start: concurrent first use of an empty database races.
- MLflow: one parent run per study (its id lives in the study's user attributes, so every
  worker nests under the same run), one nested run per trial (a cross-validation run with
  ``trial_state`` and ``worker`` tags), and the folds nested under that. ``worker``
  (``host:pid``, also the trial's user attribute) says which process ran a trial.
- Output: ``<out_dir>/<family>/best.json`` (value, params, trial number, MLflow run id) and
  the best trial's cross-validation folder as ``<out_dir>/<family>/best/`` (its fold
  models are what ``register`` publishes).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import warnings
from collections.abc import Callable
from pathlib import Path

import mlflow
import optuna

from wsimil import progress
from wsimil.atomic import write_text
from wsimil.config import ConfigError, Params, SearchParam, with_overrides
from wsimil.experiment.folds import CVResult, FoldResult
from wsimil.experiment.tracking import start_top_run


def check_space(params: Params, family: str) -> dict[str, SearchParam]:
    """The family's search space, with every key and both ends of every range validated.

    Raises:
        ConfigError: no space for the family, an unknown key, or a range whose ends are not
            valid values of the parameter — before any trial runs.
    """
    space = params.tune.space.get(family)
    if not space:
        raise ConfigError(
            f"params.yaml: tune.space has no entry for '{family}'; add its search space"
        )
    for key, dim in space.items():
        ends = dim.choices if dim.kind == "categorical" else [dim.low, dim.high]
        for value in ends:
            if dim.kind == "int":
                value = int(value)
            try:
                with_overrides(params, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"params.yaml: tune.space.{family}: {exc}") from None
    return space


def suggest(trial: optuna.Trial, space: dict[str, SearchParam]) -> dict[str, object]:
    """One value per dimension, named by its params key."""
    values: dict[str, object] = {}
    for key, dim in space.items():
        if dim.kind == "float":
            values[key] = trial.suggest_float(key, dim.low, dim.high, log=dim.log)
        elif dim.kind == "int":
            values[key] = trial.suggest_int(key, int(dim.low), int(dim.high), log=dim.log)
        else:
            values[key] = trial.suggest_categorical(key, dim.choices)
    return values


def make_storage(url: str | None, journal_path: Path) -> optuna.storages.BaseStorage:
    """A journal file (default) or an RDB storage for ``url``.

    Raises:
        ConfigError: the URL is malformed, names a database driver that is not installed,
            or its server cannot be reached (the message hides the password).
    """
    if url:
        from sqlalchemy.exc import ArgumentError, OperationalError

        where = f"tune storage {shown_url(url)} (WSIMIL_TUNE_STORAGE or tune.storage)"
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
        except ImportError as exc:  # Optuna wraps SQLAlchemy's ModuleNotFoundError
            missing = getattr(exc.__cause__, "name", None) or str(exc.__cause__ or exc)
            raise ConfigError(
                f"{where}: its database driver '{missing}' is not installed; name an "
                "installed one in the URL, e.g. postgresql+psycopg2://user:pass@host/optuna "
                "(SQLAlchemy 2.1 reads postgresql:// as psycopg 3)"
            ) from None
        except ArgumentError as exc:
            raise ConfigError(f"{where}: not a database URL ({exc})") from None
        except OperationalError as exc:
            first = str(exc.orig or exc).strip().splitlines()[0]
            raise ConfigError(
                f"{where}: cannot connect ({first}); check the host, port, database and "
                "password, and that the server is running"
            ) from None
    from optuna.storages.journal import JournalFileBackend

    journal_path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(journal_path)))


def shown_url(url: str | None) -> str | None:
    """``url`` with its password masked, for messages and logs."""
    if not url:
        return url
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def make_pruner(name: str, startup_trials: int) -> optuna.pruners.BasePruner:
    if name == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=2)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=1)
    return optuna.pruners.NopPruner()


def init_study(
    storage, study_name: str, *, experiment: str, sampler_seed: int, pruner: str, startup: int
) -> optuna.Study:
    """Create (or load) the study and its MLflow parent run; safe to call once per study."""
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=sampler_seed),
        pruner=make_pruner(pruner, startup),
    )
    if "mlflow_run_id" not in study.user_attrs:
        with start_top_run(experiment, f"tune-{study_name}") as run:
            mlflow.set_tags({"run_kind": "study", "study_name": study_name})
        study.set_user_attr("mlflow_run_id", run.info.run_id)
    return study


def _trial_callback(trial: optuna.Trial) -> Callable[[FoldResult], bool]:
    def on_fold(fold: FoldResult) -> bool:
        trial.report(fold.metrics["auc"], step=fold.fold)
        return not trial.should_prune()

    return on_fold


def run_study(
    family: str,
    params: Params,
    crossval_fn: Callable[..., CVResult],
    *,
    storage,
    study_name: str,
    out_dir: Path,
    n_trials: int,
    timeout_s: float | None = None,
) -> dict:
    """Run trials until the study holds ``n_trials`` finished ones; write the best.

    Args:
        crossval_fn: ``crossval_fn(params, out_dir=..., run_name=..., on_fold=...)`` runs one
            tracked cross-validation with the trial's params
            (:func:`wsimil.experiment.project.crossval_runner`).
        out_dir: ``<tune.out_dir>/<family>``; trials write ``trials/<number>/``.
    """
    space = check_space(params, family)
    study = optuna.load_study(
        study_name=study_name,
        storage=storage,
        sampler=optuna.samplers.TPESampler(seed=params.tune.sampler_seed),
        pruner=make_pruner(params.tune.pruner, params.tune.pruner_startup_trials),
    )
    parent_id = study.user_attrs["mlflow_run_id"]
    client = mlflow.MlflowClient()
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker)  # set first: a failed trial names its worker too
        overrides = suggest(trial, space)
        trial_params = with_overrides(params, overrides)
        with mlflow.start_run(run_id=parent_id):
            cv = crossval_fn(
                trial_params,
                out_dir=out_dir / "trials" / str(trial.number),
                run_name=f"{family}-trial{trial.number}",
                on_fold=_trial_callback(trial),
                trial=trial.number,
                leave=False,  # under the trials' bar
            )
        trial.set_user_attr("mlflow_run_id", cv.parent_run_id)
        client.set_tag(cv.parent_run_id, "trial_number", str(trial.number))
        client.set_tag(cv.parent_run_id, "worker", worker)
        if cv.stopped:
            client.set_tag(cv.parent_run_id, "trial_state", "pruned")
            raise optuna.TrialPruned(f"pruned after fold {cv.folds[-1].fold}")
        client.set_tag(cv.parent_run_id, "trial_state", "complete")
        return cv.summary["auc_mean"]

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    with progress.bar(n_trials, f"{family} tune", "trial") as bar:
        study.optimize(
            objective,
            n_trials=n_trials,
            timeout=timeout_s,
            callbacks=[
                optuna.study.MaxTrialsCallback(n_trials, states=finished),
                lambda study, trial: bar.update(),
            ],
            catch=(),
        )
    return write_best(study, family, out_dir, client, parent_id)


def write_best(study: optuna.Study, family: str, out_dir: Path, client, parent_id: str) -> dict:
    """best.json and best/ from the study's best trial; log them on the study's run."""
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(f"study {study.study_name}: no trial completed (all pruned or failed)")
    best = study.best_trial
    counts = {s.name.lower(): 0 for s in optuna.trial.TrialState}
    for t in study.trials:
        counts[t.state.name.lower()] += 1
    doc = {
        "family": family,
        "study_name": study.study_name,
        "value": best.value,
        "metric": "cv_auc_mean",
        "params": best.params,
        "trial_number": best.number,
        "mlflow_run_id": best.user_attrs.get("mlflow_run_id"),
        "trials": counts,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / "trials" / str(best.number)
    tmp = out_dir / f".best.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(out_dir / "best", ignore_errors=True)
    os.replace(tmp, out_dir / "best")
    write_text(out_dir / "best.json", json.dumps(doc, indent=1) + "\n")
    # Best params are tags, not params: MLflow params are write-once, and a later worker
    # may find a better trial.
    client.log_metric(parent_id, "best_value", best.value)
    for key, value in best.params.items():
        client.set_tag(parent_id, f"best.{key}", str(value))
    client.set_tag(parent_id, "best_trial_number", str(best.number))
    client.set_tag(parent_id, "best_trial_run_id", doc["mlflow_run_id"] or "")
    for state, n in counts.items():
        client.set_tag(parent_id, f"trials_{state}", str(n))
    client.log_artifact(parent_id, str(out_dir / "best.json"))
    return doc
