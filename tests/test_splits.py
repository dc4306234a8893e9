"""Cross-validation splits: patient-grouped, label-stratified, written once, reused."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from wsimil.train.splits import SplitError, make_splits, read_splits, write_splits


def cohort(n_patients: int = 30, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = "tumour" if p % 3 == 0 else "normal"
        for s in range(int(rng.integers(1, 4))):  # 1-3 slides per patient
            rows.append({"slide_id": f"s{p}-{s}", "patient_id": f"p{p}", "label": label})
    return pd.DataFrame(rows)


def test_no_patient_in_two_sets_and_every_slide_tested_once():
    table = cohort()
    splits = make_splits(table, n_folds=5, val_folds=4, seed=1)
    patient = dict(zip(table["slide_id"], table["patient_id"], strict=True))
    tested = []
    for fold in splits["folds"]:
        sets = {k: {patient[s] for s in fold[k]} for k in ("train", "val", "test")}
        assert not sets["train"] & sets["val"]
        assert not sets["train"] & sets["test"]
        assert not sets["val"] & sets["test"]
        assert len(fold["train"]) + len(fold["val"]) + len(fold["test"]) == len(table)
        tested += fold["test"]
    assert sorted(tested) == sorted(table["slide_id"])
    # Every patient is tested in exactly one fold.
    test_patients = [patient[s] for f in splits["folds"] for s in set(f["test"])]
    per_fold = [{patient[s] for s in f["test"]} for f in splits["folds"]]
    assert sum(len(p) for p in per_fold) == len(set(test_patients))


def test_folds_are_stratified():
    table = cohort(60)
    splits = make_splits(table, n_folds=5, val_folds=4, seed=0)
    label = dict(zip(table["slide_id"], table["label"], strict=True))
    overall = (table["label"] == "tumour").mean()
    for fold in splits["folds"]:
        share = np.mean([label[s] == "tumour" for s in fold["test"]])
        assert abs(share - overall) < 0.2
        assert {label[s] for s in fold["val"]} == {"normal", "tumour"}


def test_deterministic_and_seed_dependent():
    table = cohort()
    assert make_splits(table, 5, 4, seed=3) == make_splits(table, 5, 4, seed=3)
    assert make_splits(table, 5, 4, seed=3)["folds"] != make_splits(table, 5, 4, seed=4)["folds"]


def test_written_once_and_checked_against_the_cohort(tmp_path):
    table = cohort()
    path = tmp_path / "splits.json"
    write_splits(make_splits(table, 5, 4, seed=0), path)
    assert read_splits(path, table)["n_folds"] == 5
    changed = table.assign(label=np.where(table["label"] == "tumour", "normal", "tumour"))
    with pytest.raises(SplitError, match="another cohort"):
        read_splits(path, changed)
    with pytest.raises(SplitError, match="no splits file"):
        read_splits(tmp_path / "missing.json", table)


def test_too_few_patients_is_a_clear_error():
    table = cohort(6)
    with pytest.raises(SplitError, match="fewer than crossval.n_folds=5"):
        make_splits(table, n_folds=5, val_folds=4, seed=0)
