"""``wsimil evaluate``: a model's predictions on a held-out labelled cohort, with 95 % CIs.

Reads the ``predictions.csv`` that ``wsimil predict`` wrote and a label table (slide id,
label and, optionally, patient id columns), then reports ACC, F1 and AUC with two-sided
percentile bootstrap intervals (:func:`wsimil.train.metrics.bootstrap_ci`, label-stratified
resamples) at slide level and at patient level. A patient's probabilities are the mean over
its slides, its label is that of its slides (a patient whose slides disagree is an error),
and its predicted label uses the slides' threshold, as ``patients.csv`` does.

Writes ``metrics.json``, ``roc.png`` and ``calibration.png`` under the output folder and
logs them as one MLflow run tagged with the model's name, version and URI; the model
version gets the tag ``external_validation_<cohort>`` (AUC, its CI and the run id).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from wsimil.atomic import write_json
from wsimil.experiment.heatmaps import pyplot, save_figure
from wsimil.train.metrics import METRICS, bootstrap_ci

LEVELS = ("slide", "patient")


class EvaluateError(Exception):
    """A label table or predictions file that cannot be evaluated; names the file and fix."""


def labelled(
    predictions: pd.DataFrame,
    labels_csv: Path,
    *,
    slide_column: str = "slide_id",
    label_column: str = "label",
    patient_column: str | None = None,
) -> pd.DataFrame:
    """The predictions with a ``truth`` column (and ``patient_id`` from the labels, if named)."""
    try:
        table = pd.read_csv(labels_csv, dtype=str)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise EvaluateError(f"{labels_csv}: cannot read the label table ({exc})") from None
    wanted = [slide_column, label_column] + ([patient_column] if patient_column else [])
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        raise EvaluateError(
            f"{labels_csv}: no column {', '.join(missing)} (has {', '.join(table.columns)}); "
            "name the columns with --slide-column, --label-column, --patient-column"
        )
    dup = table[slide_column][table[slide_column].duplicated()].unique().tolist()
    if dup:
        raise EvaluateError(f"{labels_csv}: slides listed twice: {', '.join(dup)}")
    table = table.set_index(slide_column)
    unlabelled = sorted(set(predictions["slide_id"]) - set(table.index))
    if unlabelled:
        raise EvaluateError(
            f"{labels_csv}: no label for predicted slide(s) {', '.join(unlabelled[:20])}; "
            "add them or predict only the labelled slides"
        )
    out = predictions.copy()
    out["truth"] = table.loc[out["slide_id"], label_column].to_numpy()
    if patient_column:
        out["patient_id"] = table.loc[out["slide_id"], patient_column].to_numpy()
    return out


def level_tables(rows: pd.DataFrame, classes: list[str]) -> dict[str, pd.DataFrame]:
    """Slide rows and patient rows (mean probabilities), each with ``truth``."""
    cols = [f"p_{c}" for c in classes]
    conflict = rows.groupby("patient_id")["truth"].nunique()
    if (conflict > 1).any():
        raise EvaluateError(
            "patients whose slides carry different labels: "
            f"{', '.join(conflict[conflict > 1].index[:20])}; patient-level metrics need one "
            "label per patient"
        )
    patients = rows.groupby("patient_id").agg({**dict.fromkeys(cols, "mean"), "truth": "first"})
    return {"slide": rows, "patient": patients.reset_index()}


def metrics_with_ci(
    table: pd.DataFrame, classes: list[str], threshold: float | None, *, resamples: int, seed: int
) -> dict:
    unknown = sorted(set(table["truth"]) - set(classes))
    if unknown:
        raise EvaluateError(
            f"labels {', '.join(unknown)} are not classes of this model ({', '.join(classes)})"
        )
    y = table["truth"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    proba = table[[f"p_{c}" for c in classes]].to_numpy(dtype=np.float64)
    doc = bootstrap_ci(y, proba, threshold, resamples=resamples, seed=seed)
    return {"n": len(table), **doc}


def evaluate(
    predictions_csv: Path,
    labels_csv: Path,
    out_dir: Path,
    *,
    cohort: str,
    slide_column: str = "slide_id",
    label_column: str = "label",
    patient_column: str | None = None,
    resamples: int = 2000,
    seed: int = 0,
    experiment: str = "wsimil-evaluate",
    track: bool = True,
) -> dict:
    """Compute, plot, write and (``track``) log the external validation; return metrics."""
    try:
        predictions = pd.read_csv(predictions_csv, dtype={"slide_id": str, "patient_id": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise EvaluateError(f"{predictions_csv}: cannot read predictions ({exc})") from None
    classes = [c[2:] for c in predictions.columns if c.startswith("p_")]
    if len(classes) < 2 or "threshold" not in predictions.columns:
        raise EvaluateError(
            f"{predictions_csv}: not a `wsimil predict` predictions.csv (p_<class> and "
            "threshold columns)"
        )
    rows = labelled(
        predictions,
        labels_csv,
        slide_column=slide_column,
        label_column=label_column,
        patient_column=patient_column,
    )
    threshold = float(rows["threshold"].iloc[0]) if len(classes) == 2 else None
    tables = level_tables(rows, classes)
    doc = {
        "cohort": cohort,
        "model_uri": str(rows["model_uri"].iloc[0]),
        "model_name": str(rows["model_name"].fillna("").iloc[0]),
        "model_version": str(rows["model_version"].fillna("").iloc[0]).removesuffix(".0"),
        "classes": classes,
        "threshold": threshold,
        "bootstrap": {"resamples": resamples, "confidence": 0.95, "seed": seed},
        **{
            level: metrics_with_ci(t, classes, threshold, resamples=resamples, seed=seed)
            for level, t in tables.items()
        },
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", doc)
    plot_roc(tables, classes, doc, out_dir / "roc.png")
    plot_calibration(tables["slide"], classes, out_dir / "calibration.png")
    if track:
        doc["run_id"] = log_evaluation(doc, out_dir, experiment)
        write_json(out_dir / "metrics.json", doc)
    return doc


def _positive_score(table: pd.DataFrame, classes: list[str]):
    y = (table["truth"] == classes[-1]).to_numpy().astype(int)
    return y, table[f"p_{classes[-1]}"].to_numpy(dtype=np.float64)


def plot_roc(tables: dict, classes: list[str], doc: dict, path: Path) -> None:
    """ROC of the last class's probability at slide and patient level, AUC and CI in the legend."""
    from sklearn.metrics import roc_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for level, table in tables.items():
        y, score = _positive_score(table, classes)
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, score)
        a = doc[level]["auc"]
        ax.plot(fpr, tpr, label=f"{level}: AUC {a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}]")
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel(f"true positive rate ({classes[-1]})")
    ax.set_title(f"{doc['cohort']}: ROC, 95 % bootstrap CI", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def plot_calibration(table: pd.DataFrame, classes: list[str], path: Path, bins: int = 10):
    """Reliability diagram of the last class's slide probability (equal-width bins)."""
    plt = pyplot()
    y, score = _positive_score(table, classes)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(score, edges) - 1, 0, bins - 1)
    used = [b for b in range(bins) if (which == b).any()]
    mean_p = [score[which == b].mean() for b in used]
    share = [y[which == b].mean() for b in used]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls=":", c="grey", label="perfectly calibrated")
    ax.plot(mean_p, share, marker="o", label=f"slides (n = {len(y)})")
    ax.set_xlabel(f"mean predicted p({classes[-1]})")
    ax.set_ylabel(f"share that is {classes[-1]}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    save_figure(fig, path)


def log_evaluation(doc: dict, out_dir: Path, experiment: str) -> str:
    """One MLflow run with the metrics and plots; a tag on the evaluated model version."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_experiment(experiment)
    tags = {
        "wsimil.stage": "evaluate",
        "cohort": doc["cohort"],
        "model_uri": doc["model_uri"],
        "model_name": doc["model_name"],
        "model_version": doc["model_version"],
    }
    with mlflow.start_run(run_name=f"evaluate {doc['cohort']}", tags=tags) as run:
        mlflow.log_params({"resamples": doc["bootstrap"]["resamples"], "cohort": doc["cohort"]})
        for level in LEVELS:
            mlflow.log_metric(f"{level}_n", doc[level]["n"])
            for m in METRICS:
                v = doc[level][m]
                for part in ("value", "low", "high"):
                    if np.isfinite(v[part]):
                        key = f"{level}_{m}" if part == "value" else f"{level}_{m}_ci_{part}"
                        mlflow.log_metric(key, v[part])
        for name in ("metrics.json", "roc.png", "calibration.png"):
            mlflow.log_artifact(str(out_dir / name))
        run_id = run.info.run_id
    if doc["model_name"] and doc["model_version"]:
        a = doc["slide"]["auc"]
        MlflowClient().set_model_version_tag(
            doc["model_name"],
            doc["model_version"],
            f"external_validation_{doc['cohort']}",
            f"slide AUC {a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}] on "
            f"{doc['slide']['n']} slides; run {run_id}",
        )
    return run_id
