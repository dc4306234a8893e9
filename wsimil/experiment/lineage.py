"""A tracked cross-validation read back from MLflow: its lineage and its numbers (SPEC §6).

``wsimil reproduce`` names a run by an MLflow URI: ``runs:/<id>``, or a registered version,
``models:/<name>/<version>`` or ``models:/<name>@<alias>``, whose ``source_run_id`` tag is
the cross-validation run (a tuning trial's) that made its fold models. It reads two
:class:`RunRecord` objects, the recorded run and its rerun, and :func:`compare` lines them
up fold by fold and metric by metric. The tags and artifacts read here are the ones
``wsimil.experiment.crossval.run_crossval`` writes (see ``wsimil.experiment.tracking``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from wsimil.experiment.tracking import RESOLVED_PARAMS

LINEAGE_TAGS = ("git_commit", "git_dirty", "data_version", "model_family", "seed")
LINEAGE_FILES = (RESOLVED_PARAMS, "lineage/dvc.lock", "lineage/splits.json")
METRICS_FILE = "crossval/metrics.json"
URI_FORMS = "models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID"
RUN_URI = re.compile(r"runs:/([^/\s]+)(/.*)?")
MODEL_URI = re.compile(r"models:/([^/@\s]+)(?:/(\d+)|@([\w-]+))")


class ReproduceError(Exception):
    """The run cannot be read, rebuilt or rerun; the message says why and what to do."""


@dataclass
class FoldRecord:
    run_id: str
    metrics: dict[str, float]
    weights_sha256: str | None


@dataclass
class RunRecord:
    """A cross-validation run: tags, params, summary metrics and one record per fold."""

    run_id: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    folds: dict[int, FoldRecord]

    @property
    def trial(self) -> int | None:
        """The tuning trial that seeded it (None outside a study)."""
        number = self.params.get("trial.number", self.tags.get("trial_number"))
        return None if number is None else int(number)


@dataclass
class Row:
    """One compared quantity: ``fold`` is a fold number, "all" (the run) or "param"."""

    fold: str
    name: str
    recorded: object
    reproduced: object

    @property
    def same(self) -> bool:
        a, b = self.recorded, self.reproduced
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return True
        return a is not None and a == b


def resolve(client: MlflowClient, uri: str) -> str:
    """The id of the cross-validation run behind ``uri`` (a fold run resolves to its parent).

    Raises:
        ReproduceError: a malformed URI, an unknown model, version, alias or run, or a run
            that is not a cross-validation (a study or a registration says which to use).
    """
    if m := MODEL_URI.fullmatch(uri):
        name, version, alias = m.groups()
        try:
            if version:
                mv = client.get_model_version(name, version)
            else:
                mv = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            raise ReproduceError(_unknown_model(client, name, version, alias)) from None
        run_id = mv.tags.get("source_run_id") or mv.tags.get("tune_trial_run_id")
        if not run_id or run_id == "None":
            raise ReproduceError(
                f"{uri} has no source_run_id tag, so no cross-validation run behind it: it "
                "was not registered by `wsimil register`; reproduce one of its runs:/ID"
            )
    elif m := RUN_URI.fullmatch(uri):
        run_id = m.group(1)
    else:
        raise ReproduceError(f"'{uri}' is not a model or run URI; pass {URI_FORMS}")
    tags = _run(client, run_id).data.tags
    kind = tags.get("run_kind")
    if kind == "fold" and tags.get("mlflow.parentRunId"):
        return tags["mlflow.parentRunId"]
    if kind == "study":
        raise ReproduceError(
            f"run {run_id} is a tuning study, not one cross-validation; reproduce one of "
            f"its trials, e.g. the best: runs:/{tags.get('best_trial_run_id', 'TRIAL_RUN_ID')}"
        )
    if kind == "register":
        raise ReproduceError(
            f"run {run_id} is a registration; reproduce the model it registered, "
            f"models:/{tags.get('registered_model', 'NAME')}/VERSION, or its source run "
            f"runs:/{tags.get('source_run_id', 'RUN_ID')}"
        )
    return run_id


def _run(client: MlflowClient, run_id: str):
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise ReproduceError(
            f"no run {run_id} in the MLflow store {client.tracking_uri}; check the id, "
            "or set MLFLOW_TRACKING_URI to the store that holds it"
        ) from None


def _unknown_model(client: MlflowClient, name: str, version: str | None, alias: str | None) -> str:
    store = client.tracking_uri  # a wsimil project's registry is its tracking store
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        known = [m.name for m in client.search_registered_models(max_results=20)]
        return (
            f"no registered model '{name}' in {store} (registered: "
            f"{', '.join(known) or 'none'}); check the name, or set MLFLOW_TRACKING_URI"
        )
    if version:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        shown = ", ".join(map(str, versions)) or "none"
        return f"model '{name}' has no version {version} (versions: {shown})"
    aliases = ", ".join(f"{a} → {v}" for a, v in sorted(model.aliases.items())) or "none"
    return f"model '{name}' has no alias '{alias}' (aliases: {aliases})"


def read_run(client: MlflowClient, run_id: str) -> RunRecord:
    """A cross-validation run and its nested fold runs (their latest metric values)."""
    run = _run(client, run_id)
    folds = {}
    children = client.search_runs(
        [run.info.experiment_id],
        f"tags.mlflow.parentRunId = '{run_id}' and tags.run_kind = 'fold'",
        max_results=1000,
    )
    for child in children:
        folds[int(child.data.tags["fold"])] = FoldRecord(
            child.info.run_id, dict(child.data.metrics), child.data.tags.get("weights_sha256")
        )
    return RunRecord(run_id, run.data.tags, run.data.params, dict(run.data.metrics), folds)


def check_lineage(record: RunRecord) -> None:
    """Raise :class:`ReproduceError` unless the run says which code and data made it."""
    tags, rid = record.tags, record.run_id
    missing = [t for t in LINEAGE_TAGS if t not in tags]
    if missing or tags.get("run_kind") != "crossval":
        what = f"no {', '.join(missing)} tag" if missing else "run_kind is not crossval"
        raise ReproduceError(
            f"run {rid} records no lineage ({what}): it was not made by `wsimil crossval` "
            "or `wsimil tune`, so there is nothing to rebuild it from"
        )
    if tags["git_commit"] == "unknown":
        raise ReproduceError(
            f"run {rid} was made outside a git repository (git_commit unknown), so its code "
            "cannot be rebuilt; commit the project and rerun the cross-validation"
        )
    if tags["data_version"] in ("untracked", "unknown"):
        raise ReproduceError(
            f"run {rid} read features that DVC does not track (data_version "
            f"{tags['data_version']}), so they cannot be restored; make them with a DVC "
            "stage (`dvc repro`) and rerun the cross-validation"
        )


def download_lineage(client: MlflowClient, run_id: str, dest: Path) -> dict[str, Path]:
    """The run's lineage files and metrics.json, downloaded under ``dest``; keyed by name."""
    out = {}
    for artifact in (*LINEAGE_FILES, METRICS_FILE):
        try:
            path = Path(client.download_artifacts(run_id, artifact, str(dest)))
        except (MlflowException, OSError):
            if artifact == METRICS_FILE:
                continue
            raise ReproduceError(
                f"run {run_id} has no artifact {artifact}: it was made before wsimil "
                "recorded it, or did not finish; rerun the cross-validation (or the tuning "
                "trial) to make a run that can be reproduced"
            ) from None
        out[Path(artifact).name] = path
    return out


def compare(recorded: RunRecord, reproduced: RunRecord) -> list[Row]:
    """Per fold every metric and the weights' sha256, then the run's metrics, then params.

    Params appear only where they differ (they are many, and equal in a faithful rerun).
    """
    rows = []
    for fold in sorted(recorded.folds.keys() | reproduced.folds.keys()):
        a, b = recorded.folds.get(fold), reproduced.folds.get(fold)
        ma, mb = (a.metrics if a else {}), (b.metrics if b else {})
        rows += [Row(str(fold), k, ma.get(k), mb.get(k)) for k in sorted(ma.keys() | mb.keys())]
        if a is None or a.weights_sha256:
            rows.append(
                Row(str(fold), "weights_sha256", a and a.weights_sha256, b and b.weights_sha256)
            )
    names = sorted(recorded.metrics.keys() | reproduced.metrics.keys())
    rows += [Row("all", k, recorded.metrics.get(k), reproduced.metrics.get(k)) for k in names]
    for key in sorted(recorded.params.keys() | reproduced.params.keys()):
        row = Row("param", key, recorded.params.get(key), reproduced.params.get(key))
        if not row.same:
            rows.append(row)
    return rows
