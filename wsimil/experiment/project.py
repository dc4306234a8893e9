"""A project's experiments: cross-validate or tune one model family from its params.

``wsimil crossval`` and ``wsimil tune`` are each one call here. The params come from
:meth:`wsimil.config.Params.under`, every path absolute under the project ``root``. The
cohort, its splits and the bags are loaded once per command; every run (one
cross-validation, or each tuning trial) reuses them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from wsimil.config import Params, as_written
from wsimil.experiment.crossval import run_crossval
from wsimil.experiment.folds import CVResult, fold_workers, model_scales
from wsimil.experiment.tracking import dvc_out_hash
from wsimil.experiment.tune import check_space, init_study, make_storage, run_study, shown_url
from wsimil.extract.cache import features_dir
from wsimil.models import MODELS
from wsimil.train.bags import CohortError, load_bags, read_cohort, too_wide_grids
from wsimil.train.splits import read_splits

Warn = Callable[[str], None]
CrossvalRun = Callable[..., CVResult]


def crossval_runner(params: Params, root: Path, family: str, *, warn: Warn) -> CrossvalRun:
    """Load the cohort, splits and bags once; return ``run(params, **overrides)``.

    ``run`` cross-validates ``family`` with the given params (a tuning trial's, or these)
    on the loaded bags; keyword overrides go to :func:`run_crossval`.

    Args:
        warn: told about each slide left out (its bag is missing or unreadable).

    Raises:
        CohortError: the cohort table is unusable, or fewer than half its slides have bags.
        SplitError: the splits file is missing or belongs to another cohort.
    """
    cfg = params.crossval
    table = read_cohort(cfg.cohort_csv)
    splits_doc = read_splits(cfg.splits_path, table)
    features_root = features_dir(params.features.out_dir, params.features.extractor)
    scales = model_scales(family, params.model)
    bags, failed = load_bags(table, features_root, scales, splits_doc["classes"])
    if MODELS[family].needs_grid(MODELS[family].section(params.model)):
        limit = getattr(params.train, family).max_grid_cells
        for sid, why in too_wide_grids(bags, limit, f"train.{family}.max_grid_cells").items():
            failed[sid] = why
            del bags[sid]
    for sid, why in failed.items():
        warn(f"slide {sid} left out of cross-validation: {why}")
    if len(bags) < len(table) // 2:
        raise CohortError(
            f"only {len(bags)} of {len(table)} slides have {'+'.join(scales)} features under "
            f"{features_root}; run `wsimil features` (or `dvc repro`) first"
        )
    lineage = {
        "data_version": dvc_out_hash(root, params.features.out_dir),
        "features_dir": str(features_root.relative_to(root)),
        "extractor": as_written(params.features.extractor, root),
        "excluded_slides": ",".join(sorted(failed)) or "none",
    }

    def run(p: Params, **kwargs) -> CVResult:
        kwargs.setdefault("out_dir", cfg.out_dir / family)
        kwargs.setdefault("n_heatmaps", cfg.n_heatmaps)
        train_cfg = getattr(p.train, family)
        n_folds = len(splits_doc["folds"])
        kwargs.setdefault(
            "parallel_folds", fold_workers(p.crossval.parallel_folds, n_folds, train_cfg.device)
        )
        return run_crossval(
            family,
            p.model,
            getattr(p.train, family),
            splits_doc,
            bags,
            table=table,
            cohort_dir=cfg.cohort_csv.parent,
            experiment=cfg.experiment,
            lineage=lineage,
            root=root,
            lineage_files=(root / "params.yaml", root / "dvc.lock", cfg.splits_path),
            resolved_params=p.relative_to(root).model_dump(mode="json"),
            **kwargs,
        )

    return run


@dataclass(frozen=True)
class Tuning:
    """An Optuna study made ready by :func:`prepare_study`; :meth:`run` adds trials to it."""

    family: str
    params: Params
    name: str
    storage: object
    location: str  # the storage URL (password hidden) or the journal file
    out_dir: Path
    runner: CrossvalRun | None  # None: the bags were not loaded (``--init-only``)

    def run(self, n_trials: int | None = None) -> dict:
        """This worker's trials (default ``tune.n_trials``); the best trial's document."""
        if self.runner is None:
            raise RuntimeError("prepare_study(load_bags=False) gives a study to initialise only")
        runner, cfg = self.runner, self.params.tune
        return run_study(
            self.family,
            self.params,
            lambda p, **kw: runner(p, n_heatmaps=0, **kw),
            storage=self.storage,
            study_name=self.name,
            out_dir=self.out_dir,
            n_trials=n_trials or cfg.n_trials,
            timeout_s=cfg.timeout_s,
        )


def prepare_study(
    params: Params,
    root: Path,
    family: str,
    *,
    storage_url: str | None,
    load: bool = True,
    warn: Warn,
) -> Tuning:
    """Check the search space, open the storage, create (or load) the study.

    Args:
        storage_url: an RDB URL, or None for the journal file in ``tune.out_dir/<family>``.
        load: also load the bags (:func:`crossval_runner`), so that trials can run.

    Raises:
        ConfigError: a bad search space or storage, before anything is created.
        CohortError, SplitError: as :func:`crossval_runner` (the study exists by then).
    """
    cfg = params.tune
    out_dir = cfg.out_dir / family
    check_space(params, family)
    storage = make_storage(storage_url, out_dir / "journal.log")
    name = cfg.study_name or f"{params.crossval.experiment}-{family}"
    init_study(
        storage,
        name,
        experiment=params.crossval.experiment,
        sampler_seed=cfg.sampler_seed,
        pruner=cfg.pruner,
        startup=cfg.pruner_startup_trials,
    )
    location = str(shown_url(storage_url) or out_dir / "journal.log")
    runner = crossval_runner(params, root, family, warn=warn) if load else None
    return Tuning(family, params, name, storage, location, out_dir, runner)
