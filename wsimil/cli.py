"""The command line: one short command per pipeline stage.

This is the only module that reads ``params.yaml``. Each command validates its section,
resolves paths against the project root (the folder holding params.yaml) and calls one
function of the package.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from wsimil.config import ConfigError, Params, load_params

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
        out[key.strip()] = yaml.safe_load(value)
    return out


def project(params_path: Path, sets: list[str] | None = None) -> tuple[Params, Path]:
    """Validate params.yaml (plus ``--set`` overrides) and apply the runtime defaults.

    Exits with one clear line when the file, a key or a value is bad.
    """
    from wsimil.config import with_overrides
    from wsimil.runtime import apply_runtime_defaults

    try:
        params = load_params(params_path)
        if sets:
            params = with_overrides(params, parse_sets(sets))
    except ConfigError as exc:
        fail(str(exc))
    root = params_path.resolve().parent
    apply_runtime_defaults(root)
    return params, root


@app.command()
def doctor(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Check params.yaml and print versions, device and where runs are tracked."""
    params, root = project(params_path)
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
def synth(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Write the synthetic demo cohort: pyramidal TIFF slides, masks and slides.csv."""
    params, root = project(params_path)
    from wsimil.synth import write_cohort

    cfg = params.synth
    out_dir = root / cfg.out_dir
    import os

    table = write_cohort(cfg, out_dir, n_jobs=os.cpu_count() or 1)
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
    dask: DaskOption = None, sets: SetOption = None, params_path: ParamsOption = Path("params.yaml")
) -> None:
    """Select the densest 10x tiles and one 20x child each, per slide (Prefect flow)."""
    params, root = project(params_path, sets)
    _run_extraction("tiles", params, root, dask)


@app.command()
def features(
    dask: DaskOption = None, sets: SetOption = None, params_path: ParamsOption = Path("params.yaml")
) -> None:
    """Embed the selected tiles into per-slide 10x/20x HDF5 feature caches (Prefect flow)."""
    params, root = project(params_path, sets)
    _run_extraction("features", params, root, dask)


def _run_extraction(which: str, params: Params, root: Path, dask: str | None) -> None:
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
    tiles_cfg = _under_root(params.tiles, root, "slides_csv", "out_dir", "report")
    feats_cfg = _under_root(params.features, root, "out_dir", "report")
    for key in ("extractor", "weights"):  # a relative file name: under the project root
        if (root / getattr(feats_cfg, key)).is_file():
            feats_cfg = feats_cfg.model_copy(update={key: str(root / getattr(feats_cfg, key))})
    from wsimil.runtime import prefect_api

    with prefect_api():  # a temporary server, if one is needed, dies with this process
        state = flows.run(which, tiles_cfg, feats_cfg, dask=cluster)
        if not state.is_completed():
            fail(state.message or f"the {which} flow did not complete")
        outcomes = state.result()
    failed = [o for o in outcomes if o.status == "failed"]
    for o in failed:
        typer.echo(f"error: {o.error}", err=True)
    n = {s: sum(o.status == s for o in outcomes) for s in ("done", "cached")}
    report = (tiles_cfg if which == "tiles" else feats_cfg).report
    typer.echo(
        f"{which}: {len(outcomes)} slides, {n['done']} computed, {n['cached']} up to date, "
        f"{len(failed)} failed; report {report}"
    )
    if failed:
        raise typer.Exit(1)


def _under_root(cfg, root: Path, *fields: str):
    """``cfg`` with the named (relative) path fields made absolute under the project root."""
    return cfg.model_copy(update={f: root / getattr(cfg, f) for f in fields})


@app.command()
def splits(sets: SetOption = None, params_path: ParamsOption = Path("params.yaml")) -> None:
    """Write the patient-grouped, stratified folds every model family shares."""
    params, root = project(params_path, sets)
    import pandas as pd

    from wsimil.train.splits import SplitError, make_splits, write_splits

    cfg = params.crossval
    csv = root / cfg.cohort_csv
    if not csv.exists():
        fail(f"{csv}: no cohort table; run `wsimil synth` or point crossval.cohort_csv at one")
    table = pd.read_csv(csv)
    try:
        doc = make_splits(table, cfg.n_folds, cfg.val_folds, cfg.seed)
    except SplitError as exc:
        fail(f"{csv}: {exc}")
    write_splits(doc, root / cfg.splits_path)
    sizes = ", ".join(f"{len(f['train'])}/{len(f['val'])}/{len(f['test'])}" for f in doc["folds"])
    typer.echo(f"wrote {cfg.n_folds} folds (train/val/test slides: {sizes}) to {cfg.splits_path}")


ModelOption = Annotated[
    str | None, typer.Option("--model", "-m", help="abmil | dtfd | damil | dmsmil")
]


def _family(params: Params, model: str | None) -> str:
    from wsimil.models import MODELS

    family = model or params.model.name
    if family not in MODELS:
        fail(f"unknown model '{family}'; choose one of {', '.join(MODELS)}")
    return family


def _crossval_runner(params: Params, root: Path, family: str):
    """Load the cohort, splits and bags once; return ``run(params, **overrides)``."""
    from wsimil.experiment.crossval import model_scales, run_crossval
    from wsimil.experiment.tracking import dvc_out_hash
    from wsimil.extract.cache import features_dir
    from wsimil.train.bags import CohortError, load_bags, read_cohort
    from wsimil.train.splits import SplitError, read_splits

    cfg = params.crossval
    try:
        table = read_cohort(root / cfg.cohort_csv)
        splits_doc = read_splits(root / cfg.splits_path, table)
    except (CohortError, SplitError) as exc:
        fail(str(exc))
    features_root = root / features_dir(params.features.out_dir, params.features.extractor)
    scales = model_scales(family, params.model)
    bags, failed = load_bags(table, features_root, scales, splits_doc["classes"])
    for sid, why in failed.items():
        typer.echo(f"warning: slide {sid} left out of cross-validation: {why}", err=True)
    if len(bags) < len(table) // 2:
        fail(
            f"only {len(bags)} of {len(table)} slides have {'+'.join(scales)} features under "
            f"{features_root}; run `wsimil features` (or `dvc repro`) first"
        )
    lineage = {
        "data_version": dvc_out_hash(root, params.features.out_dir.as_posix()),
        "features_dir": str(features_root.relative_to(root)),
        "extractor": params.features.extractor,
        "excluded_slides": ",".join(sorted(failed)) or "none",
    }

    def run(p: Params, **kwargs):
        kwargs.setdefault("out_dir", root / cfg.out_dir / family)
        kwargs.setdefault("n_heatmaps", cfg.n_heatmaps)
        return run_crossval(
            family,
            p.model,
            getattr(p.train, family),
            splits_doc,
            bags,
            table=table,
            cohort_dir=(root / cfg.cohort_csv).parent,
            experiment=cfg.experiment,
            lineage=lineage,
            root=root,
            lineage_files=tuple(root / f for f in ("params.yaml", "dvc.lock", cfg.splits_path)),
            **kwargs,
        )

    return run


def _summary_line(name: str, s: dict) -> str:
    return (
        f"{name}: ACC {s['acc_mean']:.3f} ± {s['acc_std']:.3f}  F1 {s['f1_mean']:.3f} ± "
        f"{s['f1_std']:.3f}  AUC {s['auc_mean']:.3f} ± {s['auc_std']:.3f}"
    )


@app.command()
def crossval(
    model: ModelOption = None,
    sets: SetOption = None,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """Cross-validate one model family on the shared folds; track it in MLflow."""
    params, root = project(params_path, sets)
    family = _family(params, model)
    result = _crossval_runner(params, root, family)(params)
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
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """Optuna study over cross-validation for one model family (several workers may share it)."""
    import os

    params, root = project(params_path, sets)
    family = _family(params, model)
    from wsimil.experiment.tune import check_space, init_study, make_storage, run_study, shown_url

    cfg = params.tune
    out_dir = root / cfg.out_dir / family
    url = os.environ.get("WSIMIL_TUNE_STORAGE") or cfg.storage
    try:
        check_space(params, family)
        storage = make_storage(url, out_dir / "journal.log")
    except ConfigError as exc:
        fail(str(exc))
    study_name = cfg.study_name or f"{params.crossval.experiment}-{family}"
    init_study(
        storage,
        study_name,
        experiment=params.crossval.experiment,
        sampler_seed=cfg.sampler_seed,
        pruner=cfg.pruner,
        startup=cfg.pruner_startup_trials,
    )
    if init_only:
        typer.echo(f"study {study_name} ready in {shown_url(url) or out_dir / 'journal.log'}")
        return
    run = _crossval_runner(params, root, family)
    doc = run_study(
        family,
        params,
        lambda p, **kw: run(p, n_heatmaps=0, **kw),
        storage=storage,
        study_name=study_name,
        out_dir=out_dir,
        n_trials=n_trials or cfg.n_trials,
        timeout_s=cfg.timeout_s,
    )
    typer.echo(
        f"{family}: best CV AUC {doc['value']:.3f} (trial {doc['trial_number']}; "
        f"{doc['trials']['complete']} complete, {doc['trials']['pruned']} pruned) "
        f"params {doc['params']} -> {out_dir / 'best.json'}"
    )


@app.command()
def register(model: ModelOption = None, params_path: ParamsOption = Path("params.yaml")) -> None:
    """Register the tuned fold ensemble of one family in MLflow; gate the champion alias."""
    import json

    params, root = project(params_path)
    family = _family(params, model)
    from wsimil.experiment.tracking import dvc_out_hash, git_state
    from wsimil.extract.cache import features_dir
    from wsimil.extract.replay import ExtractionError, recorded_extraction
    from wsimil.serve.fold_ensemble import EnsembleError, read_manifest
    from wsimil.serve.registry import RegistryError
    from wsimil.serve.registry import register as publish

    cfg = params.registry
    source = root / cfg.source_dir / family
    name = f"{cfg.name_prefix}{family}"
    try:
        doc = read_manifest(source / "best" / "models")
        feats = root / features_dir(params.features.out_dir, params.features.extractor)
        try:
            extraction = recorded_extraction(feats, tuple(doc["scales"]))
        except ExtractionError as exc:
            if cfg.include_extractor:
                raise
            typer.echo(f"warning: {exc}; registering without extraction settings", err=True)
            extraction = None
        record = publish(
            source / "best" / "models",
            name,
            experiment=params.crossval.experiment,
            extraction=extraction,
            serve_config=params.serve.model_dump(mode="json"),
            champion_margin=cfg.champion_margin,
            champion_gate=cfg.champion_gate,
            lineage={
                **git_state(root),
                "data_version": dvc_out_hash(root, params.features.out_dir.as_posix()),
            },
            carry_extractor=cfg.include_extractor,
            extra_tags=_registry_tags(source / "best.json", root / params.crossval.splits_path),
        )
    except (EnsembleError, ExtractionError, RegistryError) as exc:
        fail(str(exc))
    out = root / cfg.out_dir / f"{family}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    typer.echo(
        f"{name} version {record['version']} (CV AUC {record['cv_auc_mean']:.3f}) is challenger; "
        f"{record['champion']['reason']} -> {out}"
    )


def _registry_tags(best_json: Path, splits_path: Path) -> dict[str, str]:
    """Version tags from the tuning result and the folds: trial, study, slide count."""
    import json

    tags = {}
    if best_json.is_file():
        best = json.loads(best_json.read_text())
        tags.update(
            {
                "tune_study": str(best.get("study_name")),
                "tune_trial": str(best.get("trial_number")),
                "tune_trial_run_id": str(best.get("mlflow_run_id")),
            }
        )
    if splits_path.is_file():
        folds = json.loads(splits_path.read_text()).get("folds", [])
        tags["n_slides"] = str(len({s for f in folds for s in f.get("test", [])}))
    return tags


def main() -> None:
    app()
