"""Slide-level metrics (SPEC §6): ACC, F1, AUC per fold and their mean ± std.

- Binary: the positive class is the second of the sorted class names (e.g. "tumour" over
  "normal"); ACC and F1 use a threshold on its probability chosen on *validation* data
  (Youden's J), never on the data being scored.
- More than two classes: prediction is the arg-max, F1 is macro, AUC is one-vs-rest macro.
- Spread over folds is the population std (ddof=0), as in the MIL literature's tables.
- Confidence intervals on one cohort (:func:`bootstrap_ci`): percentile intervals over
  label-stratified resamples of the slides (or patients), the same draws the champion gate
  uses; AUC, ACC and binary F1 are computed for all resamples at once.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score, roc_curve

METRICS = ("acc", "f1", "auc")
# Read-outs some models add to a fold's metrics (summarised when every fold has them):
# auc_tier1, DTFD-MIL's pseudo-bag AUC (:func:`pseudo_bag_auc`).
EXTRA_METRICS = ("auc_tier1",)


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


def pseudo_bag_auc(y_true: np.ndarray, sub_proba: list[np.ndarray]) -> float:
    """AUC of sub-bag predictions, each labelled with its slide's label (DTFD-MIL tier 1).

    Pools every pseudo-bag of every slide (every evaluation partition's), as the DTFD-MIL
    reference scores its "First-Tier" AUC: ``test_attention_DTFD_preFeat_MultipleMean`` in
    hrzhang1123/DTFD-MIL ``Main_DTFD_MIL.py`` concatenates each pseudo-bag's prediction
    (``gPred_0``) with its slide's label (``gt_0``) over all ``num_MeanInference`` repeats,
    rather than averaging them per slide.
    """
    labels = np.concatenate([np.full(len(p), y) for y, p in zip(y_true, sub_proba, strict=True)])
    return auc(labels, np.concatenate(sub_proba))


def summarize(per_fold: list[dict]) -> dict:
    """``{metric}_mean`` and ``{metric}_std`` over folds (NaN folds ignored); the
    :data:`EXTRA_METRICS` too where every fold has them."""
    out = {}
    extra = [m for m in EXTRA_METRICS if per_fold and all(m in f for f in per_fold)]
    for m in (*METRICS, *extra):
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


def stratified_draws(y: np.ndarray, resamples: int, seed: int) -> list[np.ndarray]:
    """``resamples`` index arrays; each draws, within each label, as many rows as it has."""
    rng = np.random.default_rng(seed)
    strata = [np.flatnonzero(y == k) for k in np.unique(y)]
    return [
        np.concatenate([rng.choice(s, size=len(s), replace=True) for s in strata])
        for _ in range(resamples)
    ]


def _counts(draws: list[np.ndarray], n: int) -> np.ndarray:
    return np.stack([np.bincount(idx, minlength=n) for idx in draws]).astype(float)  # (B, n)


def resampled_auc(y: np.ndarray, score: np.ndarray, draws: list[np.ndarray]) -> np.ndarray:
    """The binary AUC of each resample (Mann–Whitney: ties count one half), all at once.

    Equal to ``roc_auc_score`` on ``y[idx], score[idx]`` for each ``idx`` of ``draws``: a
    resample's AUC is the count-weighted share of (positive, negative) pairs ranked right.
    """
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    wins = (score[pos, None] > score[None, neg]) + 0.5 * (score[pos, None] == score[None, neg])
    counts = _counts(draws, len(y))
    cp, cn = counts[:, pos], counts[:, neg]  # (B, P), (B, N)
    return np.einsum("bp,pn,bn->b", cp, wins, cn) / (cp.sum(1) * cn.sum(1))


def bootstrap_ci(
    y_true: np.ndarray,
    proba: np.ndarray,
    threshold: float | None,
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """ACC, F1 and AUC with two-sided percentile bootstrap intervals.

    Returns:
        ``{metric: {"value": on the rows as they are, "low": ..., "high": ...}}``; the
        interval is NaN when fewer than two labels are present.
    """
    y_true = np.asarray(y_true)
    proba = np.asarray(proba, dtype=np.float64)
    point = slide_metrics(y_true, proba, threshold)
    if len(np.unique(y_true)) < 2:
        return {m: {"value": point[m], "low": np.nan, "high": np.nan} for m in METRICS}
    draws = stratified_draws(y_true, resamples, seed)
    pred = predict_labels(proba, threshold)
    if proba.shape[1] == 2 and len(np.unique(y_true)) == 2:
        counts = _counts(draws, len(y_true))
        right = (pred == y_true).astype(float)
        tp = counts @ ((pred == 1) & (y_true == 1)).astype(float)
        fp = counts @ ((pred == 1) & (y_true == 0)).astype(float)
        fn = counts @ ((pred == 0) & (y_true == 1)).astype(float)
        denom = 2 * tp + fp + fn
        values = {
            "acc": counts @ right / counts.sum(1),
            "f1": np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0),
            "auc": resampled_auc(y_true, proba[:, 1], draws),
        }
    else:
        per = [slide_metrics(y_true[i], proba[i], threshold) for i in draws]
        values = {m: np.array([p[m] for p in per]) for m in METRICS}
    tail = (1 - confidence) / 2
    out = {}
    for m in METRICS:
        low, high = np.nanquantile(values[m], [tail, 1 - tail])
        out[m] = {"value": point[m], "low": float(low), "high": float(high)}
    return out
