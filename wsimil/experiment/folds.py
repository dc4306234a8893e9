"""One fold of a cross-validation, fitted here or in a worker process (no tracking).

:func:`run_fold` fits and scores one fold; :func:`fold_results` runs several at once, a
process each. The workers import this module and what it needs (torch, the models, the
fit), never MLflow or the figures (an import contract checks it), and they fork from one
forkserver that imported all of that once, so a worker starts in well under a second instead
of re-importing for ~10 s, and a tuner's later trials reuse the same forkserver.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from wsimil.config import ModelConfig, TrainConfig
from wsimil.experiment.workers import start as start_forkserver
from wsimil.models import MODELS, build_model
from wsimil.seeding import FitSeeds
from wsimil.train.fit import SlideBag, fit, predict, resolve_device, sub_bag_proba
from wsimil.train.metrics import choose_threshold, predict_labels, pseudo_bag_auc, slide_metrics


@dataclass
class FoldResult:
    fold: int
    metrics: dict  # on the fold's test slides (DTFD-MIL: + auc_tier1, its pseudo-bags')
    val_metrics: dict
    threshold: float | None
    best_epoch: int
    predictions: pd.DataFrame
    history: list[dict]
    state_dict: dict
    scores: dict[str, dict[str, tuple[np.ndarray, ...]]] = field(default_factory=dict)


@dataclass
class CVResult:
    family: str
    folds: list[FoldResult]
    summary: dict
    classes: list[str]
    in_dims: tuple[int, ...]
    parent_run_id: str | None = None
    stopped: bool = False


def model_scales(family: str, model_cfg: ModelConfig) -> tuple[str, ...]:
    """The cache scales a family reads: DMSMIL (10x, 20x); the others ``model.scale``."""
    return MODELS[family].scales(model_cfg)


def run_fold(
    family: str,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    fold: dict,
    bags: dict[str, SlideBag],
    classes: list[str],
    on_epoch=None,
    trial: int | None = None,
) -> FoldResult:
    """Fit and score one fold (no tracking); seeded by (train.seed, fold, trial) alone."""
    pick = lambda ids: [bags[s] for s in ids if s in bags]  # noqa: E731
    train, val, test = pick(fold["train"]), pick(fold["val"]), pick(fold["test"])
    in_dims = tuple(x.shape[1] for x in train[0].x)
    seeds = FitSeeds(train_cfg.seed, fold=fold["fold"], trial=trial)
    model = build_model(family, model_cfg, in_dims, len(classes), seed=seeds.init)
    result = fit(model, train, val, train_cfg, seeds=seeds, on_epoch=on_epoch)
    device = resolve_device(train_cfg.device)
    val_proba, _, _ = predict(model, val, device, gradient_scores=False)
    y_val = np.array([b.label for b in val])
    binary = len(classes) == 2
    threshold = choose_threshold(y_val, val_proba[:, 1]) if binary else None
    test_proba, test_scores, _ = predict(model, test, device)
    y_test = np.array([b.label for b in test])
    metrics = slide_metrics(y_test, test_proba, threshold)
    tier1 = sub_bag_proba(model, test, device)  # DTFD-MIL's pseudo-bags; None for the others
    if tier1 is not None:
        metrics["auc_tier1"] = pseudo_bag_auc(y_test, tier1)
    preds = pd.DataFrame(
        {
            "slide_id": [b.slide_id for b in test],
            "fold": fold["fold"],
            "label": [classes[b.label] for b in test],
            **{f"p_{c}": test_proba[:, i] for i, c in enumerate(classes)},
        }
    )
    preds["pred"] = [classes[i] for i in predict_labels(test_proba, threshold)]
    return FoldResult(
        fold=fold["fold"],
        metrics=metrics,
        val_metrics=slide_metrics(y_val, val_proba, threshold),
        threshold=threshold,
        best_epoch=result.best_epoch,
        predictions=preds,
        history=result.history,
        state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        scores={b.slide_id: s for b, s in zip(test, test_scores, strict=True)},
    )


def fold_workers(setting: int | str, n_folds: int, device: str) -> int:
    """``crossval.parallel_folds`` as a process count: ``auto`` is 1 on a GPU (the folds
    would share it) and, on CPU, the fewest workers that finish soonest (:func:`makespan`):
    5 folds on 2 cores take 3 workers (2.5 fold-times, against 3 with 2), 10 folds take 2."""
    if setting != "auto":
        return max(1, min(int(setting), n_folds))
    if resolve_device(device).type != "cpu":
        return 1
    cores = max(1, len(os.sched_getaffinity(0)))
    return min(range(1, n_folds + 1), key=lambda w: (makespan(n_folds, w, cores), w))


def makespan(n_folds: int, workers: int, cores: int) -> float:
    """Fold-times until ``n_folds`` equal folds are done by ``workers`` one-thread processes
    sharing ``cores`` cores: each wave of ``min(workers, left)`` folds runs at
    ``min(1, cores / wave)`` speed."""
    time, left = 0.0, n_folds
    while left > 0:
        wave = min(workers, left)
        time += max(1.0, wave / cores)
        left -= wave
    return time


def fold_results(
    family: str,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    folds: list[dict],
    bags: dict[str, SlideBag],
    classes: list[str],
    *,
    workers: int,
    trial: int | None = None,
) -> Iterator[FoldResult]:
    """Each fold's :func:`run_fold`, in fold order, with up to ``workers`` processes at once.

    Every fold is seeded by (train.seed, fold, trial) alone and fits with
    ``train.cpu_threads`` threads, so a fold's weights and metrics are the same bytes
    whether it runs here or in a fresh (spawned) process. Closing the iterator early (a
    pruned trial) cancels the folds not started yet.
    """
    ctx = start_forkserver()
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = []
        for fold in folds:
            ids = [*fold["train"], *fold["val"], *fold["test"]]
            mine = {s: bags[s] for s in ids if s in bags}
            futures.append(
                pool.submit(run_fold, family, model_cfg, train_cfg, fold, mine, classes,
                            trial=trial)
            )  # fmt: skip
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()
