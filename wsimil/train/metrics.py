"""Slide-level metrics (SPEC §6): ACC, F1, AUC per fold and their mean ± std.

- Binary: the positive class is the second of the sorted class names (e.g. "tumour" over
  "normal"); ACC and F1 use a threshold on its probability chosen on *validation* data
  (Youden's J), never on the data being scored.
- More than two classes: prediction is the arg-max, F1 is macro, AUC is one-vs-rest macro.
- Spread over folds is the population std (ddof=0), as in the MIL literature's tables.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score, roc_curve

METRICS = ("acc", "f1", "auc")


def choose_threshold(y_true: np.ndarray, p_pos: np.ndarray) -> float:
    """Youden's J-optimal threshold on the positive-class probability; 0.5 if undefined."""
    y_true = np.asarray(y_true)
    if len(np.unique(y_true)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(y_true, p_pos)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))


def predict_labels(proba: np.ndarray, threshold: float | None) -> np.ndarray:
    """Class indices from (n, C) probabilities; binary tasks use ``threshold``."""
    proba = np.asarray(proba)
    if proba.shape[1] == 2 and threshold is not None:
        return (proba[:, 1] >= threshold).astype(int)
    return proba.argmax(axis=1)


def slide_metrics(y_true: np.ndarray, proba: np.ndarray, threshold: float | None) -> dict:
    """ACC, F1 and AUC of (n, C) class probabilities against integer labels."""
    y_true = np.asarray(y_true)
    proba = np.asarray(proba, dtype=np.float64)
    pred = predict_labels(proba, threshold)
    n_classes = proba.shape[1]
    out = {"acc": float(accuracy_score(y_true, pred))}
    if n_classes == 2:
        out["f1"] = float(f1_score(y_true, pred, pos_label=1, zero_division=0))
    else:
        out["f1"] = float(f1_score(y_true, pred, average="macro", zero_division=0))
    out["auc"] = auc(y_true, proba)
    return out


def auc(y_true: np.ndarray, proba: np.ndarray) -> float:
    """ROC AUC of (n, C) class probabilities against integer labels; NaN if a class is absent.

    Binary: of the positive class's probability; more classes: one-vs-rest macro.
    """
    y_true = np.asarray(y_true)
    proba = np.asarray(proba, dtype=np.float64)
    if len(set(y_true.tolist())) < proba.shape[1]:
        return float("nan")
    if proba.shape[1] == 2:
        return float(roc_auc_score(y_true, proba[:, 1]))
    return float(roc_auc_score(y_true, proba, multi_class="ovr", average="macro"))


def summarize(per_fold: list[dict]) -> dict:
    """``{metric}_mean`` and ``{metric}_std`` over folds (NaN folds ignored)."""
    out = {}
    for m in METRICS:
        values = np.array([f[m] for f in per_fold], dtype=float)
        out[f"{m}_mean"] = float(np.nanmean(values))
        out[f"{m}_std"] = float(np.nanstd(values))
    return out


def paired_folds(
    auc_new: dict[int, float], auc_old: dict[int, float], *, confidence: float
) -> tuple[float, float, float, int]:
    """Mean per-fold difference new − old of one metric, its one-sided bounds, the folds used.

    The bounds are a paired t over the shared folds with the Nadeau-Bengio correction for
    overlapping training sets; a version against itself gives exactly (0, 0, 0). Folds
    where either value is NaN (an AUC on a test fold with one class) are left out of both.
    """
    from scipy.stats import t

    d = np.array([auc_new[f] - auc_old[f] for f in sorted(auc_new) if f in auc_old], dtype=float)
    d = d[np.isfinite(d)]
    k = len(d)
    if k < 2:
        return math.nan, math.nan, math.nan, k
    half = t.ppf(confidence, k - 1) * d.std(ddof=1) * math.sqrt(1 / k + 1 / (k - 1))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half), k
