"""k-fold cross-validation of one model family, tracked in MLflow (SPEC §6).

Per fold: fit on ``train``, pick the best epoch and the decision threshold on ``val``, score
``test`` (the held-out patients). The parent MLflow run holds ``cv_<metric>_mean/std``,
the pooled predictions, ROC and confusion images, heatmaps and lineage; one nested run per
fold holds its per-epoch curves and final metrics. The fold models are kept (state dicts
in safetensors + a JSON config): together they are the fold ensemble that ``register``
publishes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import yaml

from wsimil import progress
from wsimil.config import ModelConfig, TrainConfig
from wsimil.experiment.folds import (
    CVResult,
    FoldResult,
    fold_results,
    model_scales,
    run_fold,
)
from wsimil.experiment.heatmaps import localisation_auc, save_heatmap, tile_tumour_share
from wsimil.experiment.regions import region_scores
from wsimil.experiment.tracking import (
    RESOLVED_PARAMS,
    flatten,
    git_state,
    log_history,
    start_top_run,
)
from wsimil.experiment.workers import start as start_forkserver
from wsimil.extract.ids import under
from wsimil.models import MODELS
from wsimil.train.fit import SlideBag
from wsimil.train.manifest import Manifest
from wsimil.train.metrics import summarize

# --- artifacts ------------------------------------------------------------------------------


def _roc_points(preds: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    from sklearn.metrics import roc_curve

    if len(classes) != 2 or preds["label"].nunique() < 2:
        return pd.DataFrame({"fpr": [], "tpr": [], "threshold": []})
    fpr, tpr, thr = roc_curve(preds["label"] == classes[1], preds[f"p_{classes[1]}"])
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(thr, 1.0)})


def _plot_roc_and_confusion(preds, classes, roc: pd.DataFrame, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(4, 4))
    if len(roc):
        ax.plot(roc["fpr"], roc["tpr"], lw=2)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4, 4))
    ConfusionMatrixDisplay.from_predictions(
        preds["label"], preds["pred"], labels=classes, ax=ax, colorbar=False
    )
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=90)
    plt.close(fig)


def localisation(
    folds: list[FoldResult],
    bags: dict[str, SlideBag],
    table: pd.DataFrame,
    cohort_dir: Path,
    heatmap_dir: Path | None,
    n_heatmaps: int,
) -> dict[str, float]:
    """Mean per-slide localisation AUC of each instance score against the tumour masks.

    Only for cohorts with a ``mask_path`` column (the synthetic one). Two-scale scores are
    also pooled per region (``<name>_region``, :mod:`wsimil.experiment.regions`). Also
    draws heatmaps of every score for the first ``n_heatmaps`` tumour-bearing test slides.
    """
    if "mask_path" not in table.columns:
        return {}
    import openslide
    from PIL import Image

    rows = table.set_index("slide_id")
    per_score: dict[str, list[float]] = {}
    drawn = 0
    for fold in folds:
        for sid, scores in fold.scores.items():
            row = rows.loc[sid]
            mask = np.asarray(Image.open(cohort_dir / row["mask_path"])) > 0
            if not mask.any():
                continue
            bag = bags[sid]
            scores = with_regions(scores, bag)
            d = float(row.get("mask_downsample", 16))
            shares = [
                tile_tumour_share(c, t, mask, d)
                for c, t in zip(bag.coords, bag.tile_level0, strict=True)
            ]
            for name, per_scale in scores.items():
                for s, (sc, share) in enumerate(zip(per_scale, shares, strict=True)):
                    key = name if len(per_scale) == 1 else f"{name}_scale{s}"
                    auc = localisation_auc(sc, share)
                    if not np.isnan(auc):
                        per_score.setdefault(key, []).append(auc)
            if heatmap_dir is not None and drawn < n_heatmaps:
                slide = openslide.OpenSlide(cohort_dir / row["path"])
                thumb = np.asarray(slide.get_thumbnail((768, 768)).convert("RGB"))
                ds = slide.dimensions[0] / thumb.shape[1]
                slide.close()
                for name, per_scale in scores.items():
                    save_heatmap(
                        under(heatmap_dir, f"{sid}_{name}", ".png"),
                        thumb,
                        ds,
                        bag.coords[-1],
                        bag.tile_level0[-1],
                        per_scale[-1],
                        f"{sid} ({row['label']}): {name}",
                        mask=mask,
                        mask_downsample=d,
                    )
                drawn += 1
    return {f"loc_auc_{k}": float(np.mean(v)) for k, v in per_score.items()}


def with_regions(
    scores: dict[str, tuple[np.ndarray, ...]], bag: SlideBag
) -> dict[str, tuple[np.ndarray, ...]]:
    """``scores`` plus, for each two-scale score, its region-pooled ``<name>_region``."""
    out = dict(scores)
    for name, per_scale in scores.items():
        if len(per_scale) == 2:
            out[f"{name}_region"] = region_scores(per_scale, bag.coords, bag.tile_level0)
    return out


def weights_bytes(state_dict: dict) -> bytes:
    """A fold's weights as the bytes of its safetensors file (deterministic: sorted keys)."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state_dict.items()})


def weights_sha256(state_dict: dict) -> str:
    """The sha256 of a fold's weights file: recorded per fold, checked by ``reproduce``."""
    return hashlib.sha256(weights_bytes(state_dict)).hexdigest()


def save_fold_models(result: CVResult, model_cfg: ModelConfig, scales, out: Path) -> None:
    """Fold state dicts (safetensors, no pickles) and the manifest needed to rebuild them."""
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    for f in result.folds:
        (models / f"fold{f.fold}.safetensors").write_bytes(weights_bytes(f.state_dict))
    Manifest(
        family=result.family,
        model=model_cfg.model_dump(mode="json"),
        scales=tuple(scales),
        in_dims=tuple(result.in_dims),
        classes=tuple(result.classes),
        thresholds=tuple(f.threshold for f in result.folds),
        folds=tuple(f.fold for f in result.folds),
        cv=result.summary,
        parent_run_id=result.parent_run_id,
    ).write(models)


# --- the tracked run ------------------------------------------------------------------------


def run_crossval(
    family: str,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    splits: dict,
    bags: dict[str, SlideBag],
    *,
    table: pd.DataFrame,
    cohort_dir: Path,
    out_dir: Path,
    experiment: str,
    lineage: dict[str, str],
    root: Path,
    n_heatmaps: int = 3,
    run_name: str | None = None,
    lineage_files: tuple[Path, ...] = (),
    resolved_params: dict | None = None,
    on_fold: Callable[[FoldResult], bool] | None = None,
    trial: int | None = None,
    leave: bool = True,
    parallel_folds: int = 1,
) -> CVResult:
    """Cross-validate ``family`` on ``splits``; track everything in MLflow; write ``out_dir``.

    Args:
        lineage: tags recording the data version and anything else about the inputs.
        root: the project root (for git state).
        lineage_files: files logged under ``lineage/`` (params.yaml, dvc.lock, splits.json).
        resolved_params: every params section as this run used it (``--set`` overrides and
            a trial's values applied), logged as ``lineage/resolved_params.yaml``: what
            ``wsimil reproduce`` reruns with.
        on_fold: called after each fold; returning False stops the cross-validation there
            (a tuner pruning a trial). The result then has ``stopped=True`` and no outputs.
        trial: the tuning trial's number (None outside a study); with the seed and the fold
            it seeds each fold's fit (:class:`wsimil.seeding.FitSeeds`); recorded as the
            param ``trial.number``.
        leave: keep the progress bar (epochs over all folds, :mod:`wsimil.progress`) on
            screen when done; a tuner's trials pass False.
        parallel_folds: folds fitted at once, each in its own process (1: one after the
            other, here). The results are the same bytes either way; only this process
            talks to MLflow (a fold's per-epoch curve is logged when the fold is done).
    """
    if parallel_folds > 1:
        start_forkserver()  # the workers' forkserver imports while MLflow sets up here
    classes = list(splits["classes"])
    scales = model_scales(family, model_cfg)
    tags = _run_tags(family, train_cfg, splits, scales, lineage, root)
    params = _run_params(family, model_cfg, train_cfg, splits, scales, trial)
    folds: list[FoldResult] = []
    epochs = train_cfg.epochs
    bar = progress.bar(len(splits["folds"]) * epochs, f"{family} crossval", "epoch", leave=leave)
    with bar, start_top_run(experiment, run_name or f"{family}-cv") as parent:
        mlflow.set_tags({**tags, "run_kind": "crossval"})
        mlflow.log_params(params)
        parallel = (
            fold_results(family, model_cfg, train_cfg, splits["folds"], bags, classes,
                         workers=parallel_folds, trial=trial)
            if parallel_folds > 1
            else None
        )  # fmt: skip
        for i, fold in enumerate(splits["folds"]):
            bar.set_postfix_str(f"fold {fold['fold']}")
            with mlflow.start_run(run_name=f"{family}-fold{fold['fold']}", nested=True):
                mlflow.set_tags({**tags, "run_kind": "fold", "fold": str(fold["fold"])})
                mlflow.log_params(params)
                if parallel is None:
                    result = run_fold(
                        family, model_cfg, train_cfg, fold, bags, classes,
                        on_epoch=lambda e, m: (mlflow.log_metrics(m, step=e), bar.update()),
                        trial=trial,
                    )  # fmt: skip
                else:
                    result = next(parallel)
                    log_history(result.history)
                _log_fold(result)
                folds.append(result)
            bar.update((i + 1) * epochs - bar.n)  # early stopping skips the fold's last epochs
            if on_fold is not None and not on_fold(result):
                break
        if parallel is not None:
            parallel.close()  # cancels the folds a pruned trial no longer needs
        summary = summarize([f.metrics for f in folds])
        in_dims = tuple(x.shape[1] for x in next(iter(bags.values())).x)
        cv = CVResult(family, folds, summary, classes, in_dims, parent.info.run_id)
        cv.stopped = len(folds) < len(splits["folds"])
        mlflow.log_metrics({f"cv_{k}": v for k, v in summary.items()})
        if cv.stopped:
            mlflow.set_tag("stopped_after_fold", str(folds[-1].fold))
            return cv
        _write_outputs(cv, model_cfg, scales, table, cohort_dir, bags, out_dir, n_heatmaps)
        for path in lineage_files:
            if Path(path).exists():
                mlflow.log_artifact(str(path), artifact_path="lineage")
        if resolved_params is not None:
            mlflow.log_text(yaml.safe_dump(resolved_params, sort_keys=False), RESOLVED_PARAMS)
    return cv


def _run_tags(family, train_cfg, splits, scales, lineage, root) -> dict[str, str]:
    """The lineage every run and fold of a cross-validation carries (SPEC §6)."""
    from wsimil import __version__, cpu_isa

    return {
        **git_state(root),
        **lineage,
        "cpu_kernels": cpu_isa.in_use(),
        "cpu_model": cpu_isa.cpu_model(),
        "seed": str(train_cfg.seed),
        "model_family": family,
        "wsimil_version": __version__,
        "cohort": splits["cohort"],
        "scales": ",".join(scales),
    }


def _run_params(family, model_cfg, train_cfg, splits, scales, trial) -> dict[str, object]:
    """The model and train sections (and the trial number), flattened to MLflow params."""
    return flatten(
        {
            "model": {
                "name": family,
                "scale": ",".join(scales),
                **MODELS[family].section(model_cfg).model_dump(),
            },
            "train": train_cfg.model_dump(),
            "crossval": {"n_folds": splits["n_folds"], "seed": splits["seed"]},
            **({} if trial is None else {"trial": {"number": trial}}),
        }
    )


def _log_fold(result: FoldResult) -> None:
    """A fold run's test and validation metrics, best epoch, threshold and weight hash."""
    mlflow.log_metrics(
        {
            **{f"test_{k}": v for k, v in result.metrics.items()},
            **{f"val_{k}_best": v for k, v in result.val_metrics.items()},
            "best_epoch": result.best_epoch,
            **({"threshold": result.threshold} if result.threshold is not None else {}),
        }
    )
    mlflow.set_tag("weights_sha256", weights_sha256(result.state_dict))


def _write_outputs(cv, model_cfg, scales, table, cohort_dir, bags, out_dir, n_heatmaps):
    """Write ``out_dir`` and log the same files as MLflow artifacts under ``crossval/``.

    Layout: ``metrics.json``, ``roc.csv``, ``loss.csv`` (DVC metrics and plots, small, kept
    in git), ``models/`` (fold ensemble) and ``report/`` (predictions, ROC and confusion
    images, heatmaps). Each entry is built in a temporary folder and moved into place.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".crossval-", dir=out_dir))
    try:
        report = tmp / "report"
        (report / "heatmaps").mkdir(parents=True)
        preds = pd.concat([f.predictions for f in cv.folds], ignore_index=True)
        preds.to_csv(report / "predictions.csv", index=False)
        roc = _roc_points(preds, cv.classes)
        roc.to_csv(tmp / "roc.csv", index=False)
        hist = pd.DataFrame([{"fold": f.fold, **h} for f in cv.folds for h in f.history])
        per_epoch = hist.groupby("epoch").mean(numeric_only=True).drop(columns="fold")
        per_epoch.reset_index().to_csv(tmp / "loss.csv", index=False)
        _plot_roc_and_confusion(preds, cv.classes, roc, report, f"{cv.family}: pooled test folds")
        loc = localisation(cv.folds, bags, table, cohort_dir, report / "heatmaps", n_heatmaps)
        if loc:
            mlflow.log_metrics(loc)
        per_fold = {f"fold{f.fold}": f.metrics for f in cv.folds}
        metrics = {**cv.summary, **loc, "folds": per_fold}
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        save_fold_models(cv, model_cfg, scales, tmp)
        mlflow.log_artifacts(str(tmp), artifact_path="crossval")
        for entry in sorted(tmp.iterdir()):
            dest = out_dir / entry.name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(entry, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
