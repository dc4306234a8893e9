"""The command line: one short command per pipeline stage.

This is the only module that reads ``params.yaml``. Every command takes ``--params`` and
``-S KEY=VALUE``; :func:`project` validates the file once, makes its paths absolute under
the project root (the folder holding it, :meth:`wsimil.config.Params.under`), and the
command calls one function of its stage, then prints what it did.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer

from wsimil import progress
from wsimil.config import ConfigError, Params, as_written, load_params

app = typer.Typer(
    help="wsimil: slides → tiles → features → MIL models → cross-validated, tracked runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOption = Annotated[
    Path, typer.Option("--params", "-p", help="the params file; its folder is the project root")
]


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-S",
        help="override a params.yaml key for this run only: KEY=VALUE, e.g. "
        "-S model.dtfd.n_pseudo_bags=8 (DVC users: `dvc exp run -S` instead)",
    ),
]


def parse_sets(sets: list[str] | None) -> dict[str, object]:
    """``["a.b=1", "c=[1, 2]"]`` → ``{"a.b": 1, "c": [1, 2]}`` (values read as YAML)."""
    import yaml

    out = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"--set {item!r}: expected KEY=VALUE, e.g. model.dmsmil.lam=0.5")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            fail(
                f"--set {item!r}: {value!r} is not valid YAML ({problem}); give a YAML value, "
                "e.g. KEY=0.5, KEY=[1, 2] or KEY='some text'"
            )
    return out


PresetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--preset",
        help="merge a params overlay over params.yaml: a name in presets/ (dtfd-mil, "
        "dmsmil-paper; see `wsimil presets`) or a YAML file; --set still wins",
    ),
]


def project(
    params_path: Path, sets: list[str] | None = None, presets: list[str] | None = None
) -> tuple[Params, Path]:
    """Validate params.yaml (plus ``--preset`` overlays, then ``--set``); runtime defaults.

    Returns:
        The params with every path absolute under the project root, and the root.

    Exits with one clear line when the file, a key or a value is bad.
    """
    from wsimil.config import with_overrides
    from wsimil.presets import preset_file
    from wsimil.runtime import apply_runtime_defaults

    root = params_path.resolve().parent
    try:
        overlays = [preset_file(root, name) for name in presets or []]
        params = load_params(params_path, allow_empty=False, overlays=overlays)
        if sets:
            params = with_overrides(params, parse_sets(sets))
    except ConfigError as exc:
        fail(str(exc))
    apply_runtime_defaults(root)
    check_progress_setting()
    return params.under(root), root


def check_progress_setting() -> None:
    """A bad ``WSIMIL_PROGRESS`` is one line here, not a traceback inside a flow."""
    try:
        progress.enabled()
    except ValueError as exc:
        fail(str(exc))


def warn(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


@app.command()
def doctor(
    sets: SetOption = None,
    preset: PresetOption = None,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """Check params.yaml and print versions, device and where runs are tracked."""
    params, root = project(params_path, sets, preset)
    import os

    import torch

    from wsimil import __version__

    typer.echo(f"wsimil {__version__}  python {sys.version.split()[0]}  torch {torch.__version__}")
    cuda = torch.cuda.is_available()
    typer.echo(f"device: {'cuda (' + torch.cuda.get_device_name(0) + ')' if cuda else 'cpu'}")
    typer.echo(f"project root: {root}")
    typer.echo(f"params: {params_path} ({len(type(params).model_fields)} sections, valid)")
    typer.echo(f"MLflow tracking: {os.environ['MLFLOW_TRACKING_URI']}")


@app.command()
def synth(
    sets: SetOption = None,
    preset: PresetOption = None,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """Write the synthetic demo cohort: pyramidal TIFF slides, masks and slides.csv."""
    import os

    params, _ = project(params_path, sets, preset)
    from wsimil.synth import write_cohort

    out_dir = params.synth.out_dir
    table = write_cohort(params.synth, out_dir, n_jobs=os.cpu_count() or 1)
    n_pos = int((table["label"] != "normal").sum())
    typer.echo(f"wrote {len(table)} slides ({n_pos} with tumour) to {out_dir}")


DaskOption = Annotated[
    str | None,
    typer.Option(
        "--dask",
        envvar="WSIMIL_DASK_ADDRESS",
        show_envvar=True,
        help="run the slide tasks on Dask: a scheduler address (tcp://10.0.0.5:8786) or "
        "local:N (a cluster of N worker processes here); default: concurrent_slides threads",
    ),
]


@app.command()
def tiles(
    dask: DaskOption = None,
    sets: SetOption = None,
    preset: PresetOption = None,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """Select the densest 10x tiles and one 20x child each, per slide (Prefect flow)."""
    params, _ = project(params_path, sets, preset)
    _run_extraction("tiles", params, dask)


@app.command()
def features(
    dask: DaskOption = None,
    sets: SetOption = None,
    preset: PresetOption = None,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """Embed the selected tiles into per-slide 10x/20x HDF5 feature caches (Prefect flow)."""
    params, _ = project(params_path, sets, preset)
    _run_extraction("features", params, dask)


def _run_extraction(which: str, params: Params, dask: str | None) -> None:
    """Run an extraction flow (wsimil.extract.flows); print failures; exit 1 if one failed."""
    import logging
    import os

    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # a local cluster's chatter
    from wsimil.extract import flows, runners

    try:
        cluster = runners.parse_dask(dask)
        if isinstance(cluster, str):
            runners.check_scheduler(cluster)
    except runners.DaskSpecError as exc:
        fail(str(exc))

    if "PREFECT_API_URL" not in os.environ:
        # Prefect's temporary server, stopped at exit, can log a traceback for events it is
        # still flushing; nothing is lost that matters, so it stays quiet.
        os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("wsimil").setLevel(logging.INFO)
    from wsimil.extract.slide import SlideError, read_slide_table
    from wsimil.runtime import prefect_api

    try:  # a bad table is one line here, before any Prefect server starts
        read_slide_table(params.tiles.slides_csv)
    except SlideError as exc:
        fail(str(exc))
    with prefect_api():  # a temporary server, if one is needed, dies with this process
        state = flows.run(which, params.tiles, params.features, dask=cluster)
        if not state.is_completed():
            fail(state.message or f"the {which} flow did not complete")
        outcomes = state.result()
    failed = [o for o in outcomes if o.status == "failed"]
    for o in outcomes:
        if o.note:
            typer.echo(f"warning: {o.note}", err=True)
    for o in failed:
        typer.echo(f"error: {o.error}", err=True)
    n = {s: sum(o.status == s for o in outcomes) for s in ("done", "cached")}
    report = (params.tiles if which == "tiles" else params.features).report
    typer.echo(
        f"{which}: {len(outcomes)} slides, {n['done']} computed, {n['cached']} up to date, "
        f"{len(failed)} failed; report {report}"
    )
    if failed:
        raise typer.Exit(1)


@app.command()
def splits(
    sets: SetOption = None,
    preset: PresetOption = None,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """Write the patient-grouped, stratified folds every model family shares."""
    params, root = project(params_path, sets, preset)
    from wsimil.train.bags import CohortError
    from wsimil.train.labels import LabelError
    from wsimil.train.splits import SplitError, split_cohort

    cfg = params.crossval
    with _failing(SplitError, CohortError, LabelError):
        doc = split_cohort(cfg, params.synth, root, warn=warn)
    sizes = ", ".join(f"{len(f['train'])}/{len(f['val'])}/{len(f['test'])}" for f in doc["folds"])
    shown = as_written(cfg.splits_path, root)
    typer.echo(f"wrote {cfg.n_folds} folds (train/val/test slides: {sizes}) to {shown}")


ModelOption = Annotated[
    str | None,
    typer.Option("--model", "-m", help="a model family (default model.name); see `wsimil models`"),
]


def _family(params: Params, model: str | None) -> str:
    from wsimil.models import MODELS

    family = model or params.model.name
    if family not in MODELS:
        fail(f"unknown model '{family}'; choose one of {', '.join(MODELS)}")
    return family


def _summary_line(name: str, s: dict) -> str:
    return (
        f"{name}: ACC {s['acc_mean']:.3f} ± {s['acc_std']:.3f}  F1 {s['f1_mean']:.3f} ± "
        f"{s['f1_std']:.3f}  AUC {s['auc_mean']:.3f} ± {s['auc_std']:.3f}"
    )


@app.command()
def crossval(
    model: ModelOption = None,
    trial: Annotated[
        int | None,
        typer.Option(
            "--trial",
            min=0,
            help="seed the folds as tuning trial N does (and record trial.number): reruns "
            "that trial given its params, as `wsimil reproduce` does",
        ),
    ] = None,
    sets: SetOption = None,
    preset: PresetOption = None,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """Cross-validate one model family on the shared folds; track it in MLflow."""
    params, root = project(params_path, sets, preset)
    family = _family(params, model)
    from wsimil.experiment.project import crossval_runner
    from wsimil.train.bags import CohortError
    from wsimil.train.splits import SplitError

    with _failing(CohortError, SplitError):
        run = crossval_runner(params, root, family, warn=warn)
    result = run(params, trial=trial)
    typer.echo(f"{_summary_line(family, result.summary)}  (MLflow run {result.parent_run_id})")


@app.command()
def tune(
    model: ModelOption = None,
    n_trials: Annotated[
        int | None, typer.Option(help="this worker's study budget (default tune.n_trials)")
    ] = None,
    init_only: Annotated[
        bool, typer.Option("--init-only", help="create the study, start no trial")
    ] = False,
    sets: SetOption = None,
    preset: PresetOption = None,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """Optuna study over cross-validation for one model family (several workers may share it)."""
    import os

    params, root = project(params_path, sets, preset)
    family = _family(params, model)
    from wsimil.experiment.project import prepare_study
    from wsimil.train.bags import CohortError
    from wsimil.train.splits import SplitError

    with _failing(ConfigError, CohortError, SplitError):
        study = prepare_study(
            params,
            root,
            family,
            storage_url=os.environ.get("WSIMIL_TUNE_STORAGE") or params.tune.storage,
            load=not init_only,
            warn=warn,
        )
    if init_only:
        typer.echo(f"study {study.name} ready in {study.location}")
        return
    doc = study.run(n_trials)
    typer.echo(
        f"{family}: best CV AUC {doc['value']:.3f} (trial {doc['trial_number']}; "
        f"{doc['trials']['complete']} complete, {doc['trials']['pruned']} pruned) "
        f"params {doc['params']} -> {study.out_dir / 'best.json'}"
    )


@app.command()
def ablate(
    model: Annotated[
        str, typer.Option("--model", "-m", help="dmsmil or dtfd (the named grids' family)")
    ] = "dmsmil",
    grid: Annotated[
        str | None,
        typer.Option(
            "--grid",
            "-g",
            help="a named grid (dmsmil: tables, lambda; dtfd: distill), an ablate.grids "
            "entry, or a grid YAML file; default: tables (dmsmil), distill (dtfd)",
        ),
    ] = None,
    sets: SetOption = None,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """Cross-validate every cell of an ablation grid on the shared folds; table + plot."""
    import time

    params, root = project(params_path, sets)
    family = _family(params, model)
    from wsimil.experiment.ablate import resolve_grid, run_grid
    from wsimil.experiment.project import crossval_runner
    from wsimil.train.bags import CohortError
    from wsimil.train.splits import SplitError

    start = time.perf_counter()
    with _failing(ConfigError, CohortError, SplitError):
        name, spec = resolve_grid(params, family, grid)
        doc = run_grid(
            params,
            family,
            name,
            spec,
            lambda p, fam: crossval_runner(p, root, fam, warn=warn),
            say=typer.echo,
        )
    typer.echo((doc["out_dir"] / "table.md").read_text().rstrip())
    typer.echo(
        f"grid {name}: {len(doc['ran'])} cells run, {len(doc['skipped'])} skipped (finished) "
        f"in {time.perf_counter() - start:.0f} s; MLflow run {doc['parent_run_id']}; "
        f"table and plot in {as_written(doc['out_dir'], root)}"
    )


@app.command()
def register(
    model: ModelOption = None,
    sets: SetOption = None,
    preset: PresetOption = None,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """Register the tuned fold ensemble of one family in MLflow; gate the champion alias."""
    params, root = project(params_path, sets, preset)
    family = _family(params, model)
    from wsimil.extract.replay import ExtractionError
    from wsimil.serve.publish import register_tuned
    from wsimil.serve.registry import RegistryError
    from wsimil.train.manifest import EnsembleError

    with _failing(EnsembleError, ExtractionError, RegistryError):
        record, out = register_tuned(params, root, family, warn=warn)
    typer.echo(
        f"{record['name']} version {record['version']} (CV AUC {record['cv_auc_mean']:.3f}) is "
        f"challenger; {record['champion']['reason']} -> {out}"
    )


@app.command()
def models(
    sets: SetOption = None,
    preset: PresetOption = None,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """List the model families --model takes: scales, config section, instance score, paper."""
    params, _ = project(params_path, sets, preset)
    from wsimil.models import MODELS

    rows = [("family", "scales", "config", "primary score", "paper")]
    for name, cls in MODELS.items():
        scales = "+".join(cls.scales(params.model))
        rows.append((name, scales, f"model.{cls.config_key}", cls.primary_score, cls.paper))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for *cols, paper in rows:
        typer.echo("  ".join([*(c.ljust(w) for c, w in zip(cols, widths, strict=True)), paper]))
    typer.echo(f"default: {params.model.name} (model.name); pick one with --model")


@app.command()
def presets(
    name: Annotated[str | None, typer.Argument(help="a preset: print its keys")] = None,
    dvc: Annotated[
        bool, typer.Option("--dvc", help="print them as `dvc exp run` -S arguments, one line")
    ] = False,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """List the presets (a paper's protocol as a params overlay), or show one.

    `wsimil crossval --preset dtfd-mil` runs with one; for a DVC experiment:
    `dvc exp run $(wsimil presets dtfd-mil --dvc)`.
    """
    from wsimil import presets as known
    from wsimil.config import read_mapping

    root = params_path.resolve().parent
    if name is None:
        for preset in known.names(root):
            first = (root / known.PRESETS_DIR / f"{preset}.yaml").read_text().splitlines()[:1]
            typer.echo(f"{preset:16s} {first[0].lstrip('# ') if first else ''}")
        return
    try:
        path = known.preset_file(root, name)
        if dvc:
            typer.echo(" ".join(known.dvc_set_args(path)))
            return
        for key, value in known.flatten(read_mapping(path, allow_empty=False)).items():
            typer.echo(f"{key}={value}")
    except ConfigError as exc:
        fail(str(exc))


@app.command()
def extractors(
    sets: SetOption = None,
    preset: PresetOption = None,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """List the foundation-model recipes features.extractor takes, and whether their weights
    are on this machine (the local Hugging Face cache, or features.weights)."""
    params, _ = project(params_path, sets, preset)
    from wsimil.extract.recipes import listing

    rows = listing(params.features)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for *cols, licence in rows:
        typer.echo("  ".join([*(c.ljust(w) for c, w in zip(cols, widths, strict=True)), licence]))
    typer.echo("any other name is built by timm (features.extractor: resnet18, ...)")


@app.command()
def reproduce(
    model_or_run: Annotated[
        str, typer.Argument(help="models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID")
    ],
    allow_dirty: Annotated[
        bool,
        typer.Option("--allow-dirty", help="rerun a run made from a dirty tree (its commit)"),
    ] = False,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """Rerun a tracked cross-validation from its lineage (commit, data, params, seed); compare.

    Exits 0 only when every fold metric, weight hash and params match the recorded run.
    """
    import os

    from wsimil.experiment.reproduce import ReproduceError, format_rows
    from wsimil.experiment.reproduce import reproduce as rerun
    from wsimil.runtime import apply_runtime_defaults

    root = params_path.resolve().parent
    apply_runtime_defaults(root)
    check_progress_setting()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        report = rerun(
            model_or_run,
            root,
            allow_dirty=allow_dirty,
            say=typer.echo,
            warn=lambda m: typer.echo(f"warning: {m}", err=True),
        )
    except ReproduceError as exc:
        fail(str(exc))
    for line in format_rows(report.rows):
        typer.echo(line)
    if not report.identical:
        fail(report.verdict(), code=1)
    typer.echo(report.verdict())


@app.command()
def init(
    target: Annotated[Path, typer.Argument(help="the new project folder")],
    slides: Annotated[Path, typer.Option("--slides", help="the folder holding the slide files")],
    labels: Annotated[
        Path, typer.Option("--labels", help="a CSV: one row per slide, its id and label")
    ],
    slide_column: Annotated[str, typer.Option(help="slide id (file name, suffix optional)")] = (
        "slide_id"
    ),
    label_column: Annotated[str, typer.Option()] = "label",
    patient_column: Annotated[
        str | None, typer.Option(help="patient id (default: each slide is its own patient)")
    ] = None,
    dvc_add: Annotated[
        bool,
        typer.Option(
            "--dvc-add", help="copy the slides into the project and track them with `dvc add`"
        ),
    ] = False,
) -> None:
    """Scaffold a project for your own slides: params.yaml, dvc.yaml, DVC remote, README."""
    import shutil

    from wsimil.experiment.scaffold import InitError, cohort_table, init_project

    dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    try:
        table = cohort_table(
            slides, labels, slide_column=slide_column, label_column=label_column,
            patient_column=patient_column,
        )  # fmt: skip
        where = init_project(target, table, dvc_add=dvc_add, dvc=dvc)
    except InitError as exc:
        for problem in exc.problems:
            typer.echo(f"error: {problem}", err=True)
        typer.echo("nothing written", err=True)
        raise typer.Exit(2) from None
    counts = table["label"].value_counts().sort_index()
    typer.echo(
        f"wrote {where}: {len(table)} slides ({', '.join(f'{k} {v}' for k, v in counts.items())})"
        f", {table['patient_id'].nunique()} patients; next: cd {target} && dvc repro"
    )


@app.command()
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
    with _failing(PredictError):
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


@app.command()
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
    with _failing(EvaluateError):
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


@contextlib.contextmanager
def _failing(*errors: type[Exception]):
    """A stage's expected errors (each names what to fix) as one ``error:`` line, exit 2."""
    try:
        yield
    except errors as exc:
        fail(str(exc))


def main() -> None:
    app()
