"""The champion gate's statistics and decisions, on predictions small enough to check by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from wsimil.config import ChampionGateConfig
from wsimil.serve.champion_gate import (
    Evidence,
    EvidenceError,
    decide,
    paired_bootstrap,
    paired_folds,
)

CLASSES = ["normal", "tumour"]


def proba(p_tumour) -> np.ndarray:
    p = np.asarray(p_tumour, dtype=float)
    return np.stack([1 - p, p], axis=1)


def test_bootstrap_matches_the_hand_computed_distribution():
    """Two normals, two tumours; the old model ranks normal n1 above tumour t0.

    A resample draws each label's two slides with replacement; the new model's AUC is
    always 1 and the old one's is 1 - (#n1 drawn)(#t0 drawn)/4. Both counts are
    Binomial(2, 1/2), so the difference is 0, 1/4, 1/2 or 1 with probabilities 7/16, 4/16,
    4/16 and 1/16: its 10% quantile is 0 and, as P(<= 1/4) = 11/16 < 0.9 < P(<= 1/2) =
    15/16, its 90% one is 1/2.
    """
    y = np.array([0, 0, 1, 1])
    new = proba([0.1, 0.2, 0.8, 0.9])
    old = proba([0.1, 0.85, 0.8, 0.9])
    b = paired_bootstrap(y, new, old, resamples=1000, confidence=0.9)
    assert b.diff == pytest.approx(1 - 0.75)
    values, counts = np.unique(b.diffs, return_counts=True)
    assert values.tolist() == [0.0, 0.25, 0.5, 1.0]
    freq = counts / len(b.diffs)  # within 3 standard errors (0.016 at most) of the hand values
    assert freq == pytest.approx([7 / 16, 4 / 16, 4 / 16, 1 / 16], abs=0.05)
    assert (b.low, b.high) == (0.0, 0.5)

    again = paired_bootstrap(y, new, old, resamples=1000, confidence=0.9)
    assert np.array_equal(again.diffs, b.diffs)  # seeded: the same verdict every time
    other = paired_bootstrap(y, new, old, resamples=100, confidence=0.9, seed=1)
    assert not np.array_equal(other.diffs, b.diffs[:100])


def test_bootstrap_of_identical_predictions_is_exactly_zero():
    rng = np.random.default_rng(0)
    y, p = np.arange(30) % 3, rng.dirichlet(np.ones(3), size=30)  # three classes: macro OvR
    b = paired_bootstrap(y, p, p.copy(), resamples=200, confidence=0.9)
    assert (b.diff, b.low, b.high) == (0.0, 0.0, 0.0) and not b.diffs.any()


def test_folds_use_the_corrected_paired_t():
    """d = (0.1, 0, 0.1): mean 1/15, s = 0.057735; t(0.95, 2) = 2.919986 (tables);
    half width = t * s * sqrt(1/3 + 1/2) = 0.153897. Fold 3 has no AUC and is left out."""
    new = {0: 0.9, 1: 0.8, 2: 0.7, 3: math.nan}
    old = {0: 0.8, 1: 0.8, 2: 0.6, 3: 0.5}
    diff, low, high, k = paired_folds(new, old, confidence=0.95)
    half = 2.919986 * 0.057735 * math.sqrt(1 / 3 + 1 / 2)
    assert k == 3 and diff == pytest.approx(1 / 15)
    assert (low, high) == pytest.approx((1 / 15 - half, 1 / 15 + half), abs=1e-5)
    assert math.isnan(paired_folds({0: 0.9}, {0: 0.8}, confidence=0.95)[1])  # one fold: no bound


def write_predictions(path, p_tumour, folds, labels=None):
    n = len(p_tumour)
    labels = labels if labels is not None else [CLASSES[i % 2] for i in range(n)]
    pd.DataFrame(
        {
            "slide_id": [f"s{i}" for i in range(n)],
            "fold": folds,
            "label": labels,
            "p_normal": 1 - np.asarray(p_tumour),
            "p_tumour": p_tumour,
        }
    ).to_csv(path, index=False)
    return Evidence.read(path, CLASSES)


@pytest.mark.parametrize("test", ["bootstrap", "folds"])
def test_an_equal_model_never_moves_the_champion(tmp_path, test):
    p = np.random.default_rng(1).random(12)
    folds = np.arange(12) % 3
    a = write_predictions(tmp_path / "a.csv", p, folds)
    b = write_predictions(tmp_path / "b.csv", p, folds)
    gate = ChampionGateConfig(test=test, resamples=200)
    v = decide(b, a, new_auc=0.7, champion="3", gate=gate, margin=0.0)
    assert not v.moved and v.decision == "stayed"
    assert v.comparison.diff == v.comparison.low == v.comparison.high == 0.0
    assert v.tags()["champion_gate_vs_version"] == "3"
    assert v.reason.startswith("champion stays version 3: ")
    assert "does not exceed margin 0.0" in v.reason


def test_the_margin_is_the_minimum_gain(tmp_path):
    y = np.arange(40) % 2
    folds = np.arange(40) % 4
    old = write_predictions(tmp_path / "old.csv", np.random.default_rng(2).random(40), folds)
    new = write_predictions(tmp_path / "new.csv", 0.3 + 0.4 * y + 0.001 * np.arange(40), folds)
    gate = ChampionGateConfig(resamples=300)
    moved = decide(new, old, new_auc=1.0, champion="1", gate=gate, margin=0.0)
    assert moved.moved and moved.comparison.low > 0
    assert moved.reason.startswith("takes champion from version 1: pooled test AUC difference")
    held = decide(new, old, new_auc=1.0, champion="1", gate=gate, margin=moved.comparison.low)
    assert not held.moved and held.decision == "stayed"


def test_what_cannot_be_compared_leaves_the_champion(tmp_path):
    p = np.linspace(0.1, 0.9, 12)
    a = write_predictions(tmp_path / "a.csv", p, np.arange(12) % 3)
    b = write_predictions(tmp_path / "b.csv", p, (np.arange(12) + 1) % 3)  # other folds
    gate, kw = ChampionGateConfig(resamples=200), {"margin": 0.0}
    first = decide(b, None, new_auc=0.6, champion=None, gate=gate, **kw)
    assert first.moved and first.decision == "first champion"
    other = decide(b, a, new_auc=0.9, champion="2", gate=gate, **kw)
    assert not other.moved and other.decision == "not compared"
    assert "scored on other test folds" in other.reason and a.folds_sha256 in other.reason
    legacy = decide(b, None, new_auc=0.9, champion="2", gate=gate, **kw)
    assert not legacy.moved and "no readable test predictions" in legacy.reason
    nan = decide(b, b, new_auc=math.nan, champion=None, gate=gate, **kw)
    assert not nan.moved and nan.reason == "no champion: its CV AUC is not a number"


def test_evidence_refuses_a_slide_in_two_folds(tmp_path):
    path = tmp_path / "p.csv"
    write_predictions(path, [0.2, 0.8], [0, 1])
    df = pd.read_csv(path)
    pd.concat([df, df.iloc[:1]]).to_csv(path, index=False)
    with pytest.raises(EvidenceError, match="slide s0 is in more than one test fold"):
        Evidence.read(path, CLASSES)


def test_the_gate_settings_are_checked_where_they_are_written(tmp_path):
    from wsimil.config import ConfigError, load_params

    path = tmp_path / "params.yaml"
    path.write_text("registry:\n  champion_gate:\n    confidence: 1.0\n")
    with pytest.raises(ConfigError, match="registry.champion_gate.confidence"):
        load_params(path)
    path.write_text("registry:\n  champion_gate:\n    confidnce: 0.9\n")
    with pytest.raises(ConfigError, match="did you mean 'confidence'"):
        load_params(path)
    path.write_text("registry:\n  champion_gate:\n    test: folds\n")
    assert load_params(path).registry.champion_gate.test == "folds"
