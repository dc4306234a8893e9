"""Registered models and what they score: ``register``, ``predict``, ``evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wsimil.cli.options import (
    ModelOption,
    ParamsOption,
    PresetOption,
    SetOption,
    fail,
    failing,
    family,
    project,
    warn,
)


def register(
    model: ModelOption = None,
    sets: SetOption = None,
    preset: PresetOption = None,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """Register the tuned fold ensemble of one family in MLflow; gate the champion alias."""
    params, root = project(params_path, sets, preset)
    name = family(params, model)
    from wsimil.extract.replay import ExtractionError
    from wsimil.serve.publish import register_tuned
    from wsimil.serve.registry import RegistryError
    from wsimil.train.manifest import EnsembleError

    with failing(EnsembleError, ExtractionError, RegistryError):
        record, out = register_tuned(params, root, name, warn=warn)
    typer.echo(
        f"{record['name']} version {record['version']} (CV AUC {record['cv_auc_mean']:.3f}) is "
        f"challenger; {record['champion']['reason']} -> {out}"
    )


def predict(
    model_uri: Annotated[
        str, typer.Option("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/…")
    ],
    out: Annotated[Path, typer.Option("--out", help="folder for predictions and pictures")],
    slides: Annotated[
        Path | None,
        typer.Option("--slides", help="a folder of slide files or a slides.csv (patient_id kept)"),
    ] = None,
    features: Annotated[
        Path | None,
        typer.Option("--features", help="feature caches <DIR>/<scale>/<slide>.h5 (no slides read)"),
    ] = None,
    labels: Annotated[
        Path | None, typer.Option("--labels", help="a label table: also run `wsimil evaluate`")
    ] = None,
    montage_k: Annotated[int, typer.Option(min=0, help="tiles in each top-k montage")] = 8,
    cohort: Annotated[str, typer.Option(help="the cohort's name (with --labels)")] = "external",
    label_column: Annotated[str, typer.Option(help="with --labels")] = "label",
    slide_column: Annotated[str, typer.Option(help="with --labels")] = "slide_id",
    patient_column: Annotated[str | None, typer.Option(help="with --labels")] = None,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """Score slides offline with a registered model, as its server would; heatmaps, GeoJSON."""
    from wsimil.runtime import apply_runtime_defaults
    from wsimil.serve.batch import PredictError, predict_cohort, slide_inputs

    apply_runtime_defaults(params_path.resolve().parent)
    if slides is None and features is None:
        fail("give --slides DIR|slides.csv or --features DIR")
    with failing(PredictError):
        items = slide_inputs(slides, features)
        report = predict_cohort(model_uri, items, out, montage_k=montage_k, warn=warn)
    for slide_id, error in report.failed:
        typer.echo(f"error: slide {slide_id}: {error}", err=True)
    typer.echo(
        f"predict: {len(items)} slides, {len(report.predictions)} scored, "
        f"{len(report.failed)} failed; {len(report.patients)} patients -> {out}"
    )
    if labels is not None and len(report.predictions):
        _evaluate(out / "predictions.csv", labels, out / "evaluation", cohort,
                  slide_column, label_column, patient_column)  # fmt: skip
    if report.failed:
        raise typer.Exit(1)


def evaluate(
    predictions: Annotated[
        Path, typer.Option("--predictions", help="the predictions.csv `wsimil predict` wrote")
    ],
    labels: Annotated[Path, typer.Option("--labels", help="the held-out cohort's label table")],
    out: Annotated[Path, typer.Option("--out", help="folder for metrics.json and plots")],
    cohort: Annotated[str, typer.Option(help="the cohort's name (run and version tag)")] = (
        "external"
    ),
    label_column: Annotated[str, typer.Option()] = "label",
    slide_column: Annotated[str, typer.Option()] = "slide_id",
    patient_column: Annotated[
        str | None, typer.Option(help="default: predictions.csv's patient_id")
    ] = None,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """External validation: ACC, F1, AUC with bootstrap 95 % CIs per slide and patient."""
    from wsimil.runtime import apply_runtime_defaults

    apply_runtime_defaults(params_path.resolve().parent)
    _evaluate(predictions, labels, out, cohort, slide_column, label_column, patient_column)


def _evaluate(predictions, labels, out, cohort, slide_column, label_column, patient_column):
    import re

    from wsimil.serve.evaluate import EvaluateError
    from wsimil.serve.evaluate import evaluate as run_evaluation

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", cohort):
        fail(f"--cohort {cohort!r}: use letters, digits, '_', '-' or '.' (it names a tag)")
    with failing(EvaluateError):
        doc = run_evaluation(
            predictions, labels, out, cohort=cohort, slide_column=slide_column,
            label_column=label_column, patient_column=patient_column,
        )  # fmt: skip
    for level in ("slide", "patient"):
        d = doc[level]
        parts = [f"{m.upper()} {d[m]['value']:.3f} [{d[m]['low']:.3f}, {d[m]['high']:.3f}]"
                 for m in ("acc", "f1", "auc")]  # fmt: skip
        typer.echo(f"{cohort} {level} level (n = {d['n']}): {'  '.join(parts)}")
    typer.echo(f"95 % bootstrap CIs; MLflow run {doc['run_id']}; {out / 'metrics.json'}")
