"""Metrics: threshold from validation data, binary and multi-class ACC/F1/AUC."""

import numpy as np
import pytest

from wsimil.train.metrics import choose_threshold, slide_metrics, summarize


def test_threshold_separates_validation_data():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.35, 0.8, 0.9])
    t = choose_threshold(y, p)
    assert 0.3 < t <= 0.35
    proba = np.stack([1 - p, p], axis=1)
    m = slide_metrics(y, proba, t)
    assert m == {"acc": 1.0, "f1": 1.0, "auc": 1.0}
    # The default 0.5 would misclassify the 0.35 positive.
    assert slide_metrics(y, proba, 0.5)["acc"] == pytest.approx(5 / 6)


def test_multiclass_uses_argmax_macro_f1_and_ovr_auc():
    y = np.array([0, 1, 2, 2])
    proba = np.array([[0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]])
    m = slide_metrics(y, proba, threshold=None)
    assert m["acc"] == 0.75
    assert 0 < m["f1"] < 1 and 0.5 < m["auc"] <= 1


def test_summary_mean_and_population_std():
    s = summarize([{"acc": 1.0, "f1": 0.5, "auc": 0.8}, {"acc": 0.5, "f1": 0.5, "auc": 0.6}])
    assert s["acc_mean"] == 0.75 and s["acc_std"] == 0.25 and s["f1_std"] == 0.0
