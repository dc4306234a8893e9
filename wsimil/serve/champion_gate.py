"""The champion gate: is the challenger better than the champion, at a stated confidence?

Both fold ensembles were scored on the same test folds (``splits.json``), each test slide
once, so they are compared *paired*, on their pooled test predictions
(``report/predictions.csv`` of their cross-validation). The difference is always
challenger − champion, in the AUC of :func:`wsimil.train.metrics.auc` (binary; one-vs-rest macro
for more classes), and ``c`` is ``registry.champion_gate.confidence``:

- ``bootstrap`` (default): Δ is the difference in pooled test AUC. The slides are resampled
  with replacement B times, within each label (stratified, as pROC does, so that every
  resample holds every class), with a fixed seed; each resample scores both models on the
  same slides. The bounds are the (1 − c) and c quantiles of the B differences.
- ``folds``: Δ is the mean over folds of the per-fold test AUC difference d_k (so, the
  difference of the CV AUC means). Bounds: Δ ∓ t_{c, K−1} · s_d · √(1/K + 1/(K − 1)), the
  corrected resampled t of Nadeau & Bengio (Machine Learning 52, 2003): the folds' training
  sets overlap, so the d_k are correlated and the plain paired t is too narrow.

``champion`` moves only when the lower bound exceeds ``registry.champion_margin``; a
one-sided test at level c. Identical predictions give Δ = 0 in every resample, so an equal
model never moves it. Versions scored on other test folds (another slide set, fold
assignment or labels: :attr:`Evidence.folds_sha256`) are not compared; the champion stays.
Knows nothing of MLflow.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from wsimil.config import ChampionGateConfig
from wsimil.train.metrics import auc, paired_folds, resampled_auc, stratified_draws

SEED = 0  # fixed, so the same two models always get the same verdict (and it cannot be re-rolled)


class EvidenceError(Exception):
    """Test predictions that cannot be used; the message names the file."""


@dataclass(frozen=True)
class Evidence:
    """A version's pooled test predictions, one row per test slide, sorted by slide id."""

    slide_ids: np.ndarray  # (n,) str
    folds: np.ndarray  # (n,) the test fold of each slide
    y: np.ndarray  # (n,) class index into ``classes``
    proba: np.ndarray  # (n, C)
    classes: tuple[str, ...]

    @classmethod
    def read(cls, path: Path, classes: list[str]) -> Evidence:
        """Read a cross-validation's ``predictions.csv`` (slide_id, fold, label, p_<class>).

        Raises:
            EvidenceError: a column is missing, a slide repeats or a label is unknown.
        """
        df = pd.read_csv(path, dtype={"slide_id": str, "label": str})
        need = ["slide_id", "fold", "label", *(f"p_{c}" for c in classes)]
        missing = [c for c in need if c not in df.columns]
        if missing:
            raise EvidenceError(f"{path}: missing column(s) {', '.join(missing)}")
        if df["slide_id"].duplicated().any():
            dup = df.loc[df["slide_id"].duplicated(), "slide_id"].iloc[0]
            raise EvidenceError(f"{path}: slide {dup} is in more than one test fold")
        unknown = sorted(set(df["label"]) - set(classes))
        if unknown:
            raise EvidenceError(f"{path}: label(s) {unknown} are not among classes {classes}")
        df = df.sort_values("slide_id", kind="stable")
        return cls(
            slide_ids=df["slide_id"].to_numpy(),
            folds=df["fold"].to_numpy(),
            y=df["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(),
            proba=df[[f"p_{c}" for c in classes]].to_numpy(np.float64),
            classes=tuple(classes),
        )

    @property
    def folds_sha256(self) -> str:
        """A hash of the test folds scored: (slide, fold, label) rows, not the predictions."""
        rows = zip(self.slide_ids, self.folds, self.y, strict=True)
        text = "\n".join(f"{s},{f},{self.classes[k]}" for s, f, k in rows)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def fold_aucs(self) -> dict[int, float]:
        """The test AUC of each fold (what cross-validation reports per fold)."""
        return {
            int(f): auc(self.y[self.folds == f], self.proba[self.folds == f])
            for f in np.unique(self.folds)
        }


@dataclass(frozen=True)
class Bootstrap:
    diff: float  # on the slides as they are
    low: float
    high: float
    diffs: np.ndarray  # (B,) one per resample


def paired_bootstrap(
    y: np.ndarray,
    proba_new: np.ndarray,
    proba_old: np.ndarray,
    *,
    resamples: int,
    confidence: float,
    seed: int = SEED,
) -> Bootstrap:
    """AUC(new) − AUC(old) on the same slides and its one-sided ``confidence`` bounds.

    Each resample draws, within each label, as many slides as it has, with replacement.
    """
    draws = stratified_draws(y, resamples, seed)
    if proba_new.shape[1] == 2 and len(np.unique(y)) == 2:
        diffs = resampled_auc(y, proba_new[:, 1], draws) - resampled_auc(y, proba_old[:, 1], draws)
    else:
        diffs = np.array([auc(y[i], proba_new[i]) - auc(y[i], proba_old[i]) for i in draws])
    low, high = np.quantile(diffs, [1 - confidence, confidence])
    return Bootstrap(auc(y, proba_new) - auc(y, proba_old), float(low), float(high), diffs)


@dataclass(frozen=True)
class Comparison:
    """Challenger − champion, paired, with one-sided bounds at ``confidence``."""

    test: str
    diff: float
    low: float
    high: float
    confidence: float
    margin: float
    n: int  # slides (bootstrap) or folds
    resamples: int | None

    def describe(self) -> str:
        """The evidence in words, e.g. for a verdict line."""
        what = "pooled test AUC" if self.test == "bootstrap" else "mean per-fold test AUC"
        how = (
            f"paired bootstrap over {self.n} slides, {self.resamples} resamples"
            if self.test == "bootstrap"
            else f"corrected paired t over {self.n} folds"
        )
        central = round(100 * (2 * self.confidence - 1))
        return (
            f"{what} difference {self.diff:+.3f}, one-sided {self.confidence:.0%} lower bound "
            f"{self.low:+.3f} ({central}% interval {self.low:+.3f} … {self.high:+.3f}; {how})"
        )


def rule_text(gate: ChampionGateConfig, margin: float) -> str:
    """The rule a verdict applied, in one line (a version tag and the model card say it)."""
    how = (
        f"paired bootstrap of the pooled test AUC ({gate.resamples} label-stratified slide "
        f"resamples, seed {SEED})"
        if gate.test == "bootstrap"
        else "mean per-fold test AUC difference, Nadeau-Bengio corrected paired t"
    )
    return (
        f"{how}; champion moves when the one-sided {gate.confidence:.0%} lower bound of "
        f"challenger - champion exceeds the margin {margin}"
    )


def compare(new: Evidence, old: Evidence, gate: ChampionGateConfig, margin: float) -> Comparison:
    """Compare two versions scored on the same test folds (check that first)."""
    if gate.test == "bootstrap":
        b = paired_bootstrap(
            new.y, new.proba, old.proba, resamples=gate.resamples, confidence=gate.confidence
        )
        diff, low, high, n, resamples = b.diff, b.low, b.high, len(new.y), gate.resamples
    else:
        diff, low, high, n = paired_folds(
            new.fold_aucs(), old.fold_aucs(), confidence=gate.confidence
        )
        resamples = None
    return Comparison(gate.test, diff, low, high, gate.confidence, margin, n, resamples)


@dataclass(frozen=True)
class Verdict:
    """What the gate decided for a new version, and why (one line)."""

    moved: bool
    decision: str  # first champion | moved | stayed | not compared | no auc
    reason: str
    rule: str
    vs_version: str | None = None
    comparison: Comparison | None = None

    def tags(self) -> dict[str, str]:
        """``champion_gate_*`` version tags."""
        tags = {
            "champion_gate_decision": self.decision,
            "champion_gate_reason": self.reason,
            "champion_gate_rule": self.rule,
            "champion_gate_vs_version": self.vs_version or "none",
        }
        c = self.comparison
        if c is not None:
            tags.update(
                {
                    "champion_gate_test": c.test,
                    "champion_gate_diff": f"{c.diff:.6f}",
                    "champion_gate_ci_low": f"{c.low:.6f}",
                    "champion_gate_ci_high": f"{c.high:.6f}",
                    "champion_gate_confidence": f"{c.confidence}",
                    "champion_gate_margin": f"{c.margin}",
                    "champion_gate_n": str(c.n),
                }
            )
        return tags


def decide(
    new: Evidence | None,
    old: Evidence | None,
    *,
    new_auc: float,
    champion: str | None,
    gate: ChampionGateConfig,
    margin: float,
) -> Verdict:
    """Whether a new version takes ``champion`` from version ``champion`` (None: no champion).

    Args:
        new: the new version's test predictions (None: it has none).
        old: the champion's (None: it has none, or there is no champion).
        new_auc: the new version's CV AUC; a version without a finite one never takes it.
    """
    rule = rule_text(gate, margin)
    if not math.isfinite(new_auc):
        stays = "no champion" if champion is None else f"champion stays version {champion}"
        return Verdict(False, "no auc", f"{stays}: its CV AUC is not a number", rule, champion)
    if champion is None:
        return Verdict(True, "first champion", "takes champion: there is none yet", rule)
    stays = f"champion stays version {champion}"
    if new is None:
        why = "the challenger has no test predictions (report/predictions.csv beside models/)"
        return Verdict(False, "not compared", f"{stays}: {why}", rule, champion)
    if old is None:
        why = (
            "it carries no readable test predictions (registered before the gate, or its "
            "test_predictions artifact is gone), so it cannot be compared; move the alias by "
            "hand if the challenger should take it"
        )
        return Verdict(False, "not compared", f"{stays}: {why}", rule, champion)
    if new.folds_sha256 != old.folds_sha256:
        why = (
            f"the challenger was scored on other test folds (test folds {new.folds_sha256} vs "
            f"{old.folds_sha256}); only versions scored on the same splits are compared"
        )
        return Verdict(False, "not compared", f"{stays}: {why}", rule, champion)
    c = compare(new, old, gate, margin)
    if not math.isfinite(c.low):
        why = (
            "the pooled test AUC is undefined (a class has no test slide)"
            if c.test == "bootstrap"
            else f"{c.n} fold(s) have a test AUC in both versions; the paired t needs two"
        )
        return Verdict(False, "not compared", f"{stays}: {why}", rule, champion, c)
    if c.low > margin:
        reason = f"takes champion from version {champion}: {c.describe()} exceeds margin {margin}"
        return Verdict(True, "moved", reason, rule, champion, c)
    reason = f"{stays}: {c.describe()} does not exceed margin {margin}"
    return Verdict(False, "stayed", reason, rule, champion, c)
