"""Folds, cross-validation, tuning, ablation and reruns: ``splits``, ``crossval``, ``tune``,
``ablate``, ``reproduce``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wsimil.cli.options import (
    ModelOption,
    ParamsOption,
    PresetOption,
    SetOption,
    check_progress_setting,
    fail,
    failing,
    family,
    project,
    warn,
)
from wsimil.config import ConfigError, as_written


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
    with failing(SplitError, CohortError, LabelError):
        doc = split_cohort(cfg, params.synth, root, warn=warn)
    sizes = ", ".join(f"{len(f['train'])}/{len(f['val'])}/{len(f['test'])}" for f in doc["folds"])
    shown = as_written(cfg.splits_path, root)
    typer.echo(f"wrote {cfg.n_folds} folds (train/val/test slides: {sizes}) to {shown}")


def _summary_line(name: str, s: dict) -> str:
    return (
        f"{name}: ACC {s['acc_mean']:.3f} ± {s['acc_std']:.3f}  F1 {s['f1_mean']:.3f} ± "
        f"{s['f1_std']:.3f}  AUC {s['auc_mean']:.3f} ± {s['auc_std']:.3f}"
    )


def _prestart_fold_workers(params) -> None:
    """Folds may run in worker processes: start their forkserver before the slow imports."""
    if params.crossval.parallel_folds != 1:
        from wsimil.experiment import workers

        workers.start()


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
    _prestart_fold_workers(params)
    name = family(params, model)
    from wsimil.experiment.project import crossval_runner
    from wsimil.train.bags import CohortError
    from wsimil.train.splits import SplitError

    with failing(CohortError, SplitError):
        run = crossval_runner(params, root, name, warn=warn)
    result = run(params, trial=trial)
    typer.echo(f"{_summary_line(name, result.summary)}  (MLflow run {result.parent_run_id})")


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
    if not init_only:
        _prestart_fold_workers(params)
    name = family(params, model)
    from wsimil.experiment.project import prepare_study
    from wsimil.train.bags import CohortError
    from wsimil.train.splits import SplitError

    with failing(ConfigError, CohortError, SplitError):
        study = prepare_study(
            params,
            root,
            name,
            storage_url=os.environ.get("WSIMIL_TUNE_STORAGE") or params.tune.storage,
            load=not init_only,
            warn=warn,
        )
    if init_only:
        typer.echo(f"study {study.name} ready in {study.location}")
        return
    doc = study.run(n_trials)
    typer.echo(
        f"{name}: best CV AUC {doc['value']:.3f} (trial {doc['trial_number']}; "
        f"{doc['trials']['complete']} complete, {doc['trials']['pruned']} pruned) "
        f"params {doc['params']} -> {study.out_dir / 'best.json'}"
    )


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
    name = family(params, model)
    from wsimil.experiment.ablate import resolve_grid, run_grid
    from wsimil.experiment.project import crossval_runner
    from wsimil.train.bags import CohortError
    from wsimil.train.splits import SplitError

    start = time.perf_counter()
    with failing(ConfigError, CohortError, SplitError):
        grid_name, spec = resolve_grid(params, name, grid)
        doc = run_grid(
            params,
            name,
            grid_name,
            spec,
            lambda p, fam: crossval_runner(p, root, fam, warn=warn),
            say=typer.echo,
        )
    typer.echo((doc["out_dir"] / "table.md").read_text().rstrip())
    typer.echo(
        f"grid {grid_name}: {len(doc['ran'])} cells run, {len(doc['skipped'])} skipped "
        f"(finished) in {time.perf_counter() - start:.0f} s; MLflow run {doc['parent_run_id']}; "
        f"table and plot in {as_written(doc['out_dir'], root)}"
    )


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
