"""Slide-level metrics (SPEC §6): ACC, F1, AUC per fold and their mean ± std.

- Binary: the positive class is the second of the sorted class names (e.g. "tumour" over
  "normal"); ACC and F1 use a threshold on its probability chosen on *validation* data
  (Youden's J), never on the data being scored.
- More than two classes: prediction is the arg-max, F1 is macro, AUC is one-vs-rest macro.
- Spread over folds is the population std (ddof=0), as in the MIL literature's tables.
"""

from __future__ import annotations

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
