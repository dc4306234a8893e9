"""Patient-grouped, label-stratified cross-validation splits, written once and reused.

Each fold holds three disjoint slide sets: ``test`` (the held-out fold, which is scored),
``val`` (carved from the remaining patients; picks the best epoch and the decision
threshold) and ``train``. No patient appears in two of them, and every patient is in
exactly one test fold. The split is a pure function of the cohort table and the seed;
``splits.json`` records both so every model family sees the same folds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from wsimil.atomic import write_text
from wsimil.config import CrossvalConfig, SynthConfig


class SplitError(Exception):
    """The cohort cannot be split as asked; the message says why and what to change."""


def cohort_fingerprint(table: pd.DataFrame) -> str:
    """A hash of (slide_id, patient_id, label): a splits file belongs to one cohort."""
    rows = table[["slide_id", "patient_id", "label"]].astype(str).sort_values("slide_id")
    return hashlib.sha256(rows.to_csv(index=False).encode()).hexdigest()[:16]


def _grouped_folds(
    labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int
) -> list[np.ndarray]:
    """Index arrays of ``n_splits`` patient-disjoint, label-stratified parts."""
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [part for _, part in sgkf.split(np.zeros(len(labels)), labels, groups)]


def split_cohort(cfg: CrossvalConfig, synth: SynthConfig, root: Path, *, warn) -> dict:
    """Split the cohort table ``cfg.cohort_csv`` (:func:`make_splits`); write ``cfg.splits_path``.

    The labels are checked first (:func:`wsimil.train.labels.check_labels`): against the
    declared classes when there are any, else ``warn`` hears of rare or look-alike labels.

    Raises:
        SplitError: there is no table, or it cannot be split as asked (the message names it).
        CohortError: the table cannot be read (the message names the file and line).
        LabelError: a label is not one of the declared classes.
    """
    from wsimil.train.bags import read_cohort
    from wsimil.train.labels import check_labels, declared_classes

    csv = Path(cfg.cohort_csv)
    if not csv.exists():
        raise SplitError(
            f"{csv}: no cohort table; run `wsimil synth` or point crossval.cohort_csv at one"
        )
    table = read_cohort(csv)
    declared, source = declared_classes(cfg, synth, root)
    for warning in check_labels(table, csv, declared, source=source, n_folds=cfg.n_folds):
        warn(warning)
    try:
        doc = make_splits(table, cfg.n_folds, cfg.val_folds, cfg.seed)
    except SplitError as exc:
        raise SplitError(f"{csv}: {exc}") from None
    write_splits(doc, cfg.splits_path)
    return doc


def make_splits(table: pd.DataFrame, n_folds: int, val_folds: int, seed: int) -> dict:
    """Build the splits document.

    Args:
        table: the cohort (``slide_id``, ``patient_id``, ``label``).
        n_folds: number of outer folds (each patient is tested once).
        val_folds: the validation set is 1/``val_folds`` of the remaining patients.
        seed: shuffling seed.
    """
    if n_folds < 2:
        raise SplitError(f"crossval.n_folds must be at least 2 (got {n_folds})")
    labels = table["label"].astype(str).to_numpy()
    groups = table["patient_id"].astype(str).to_numpy()
    ids = table["slide_id"].astype(str).to_numpy()
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise SplitError(f"the cohort has one label only ({classes[0]!r}); MIL needs two")
    per_class = pd.Series(groups).groupby(labels).nunique()
    if per_class.min() < n_folds:
        raise SplitError(
            f"label {per_class.idxmin()!r} has {per_class.min()} patients, fewer than "
            f"crossval.n_folds={n_folds}; lower n_folds or add patients"
        )
    folds = []
    for k, test_idx in enumerate(_grouped_folds(labels, groups, n_folds, seed)):
        rest = np.setdiff1d(np.arange(len(ids)), test_idx)
        inner = _grouped_folds(labels[rest], groups[rest], val_folds, seed + 1 + k)
        val_idx = rest[inner[0]]
        train_idx = np.setdiff1d(rest, val_idx)
        folds.append(
            {
                "fold": k,
                "train": sorted(ids[train_idx].tolist()),
                "val": sorted(ids[val_idx].tolist()),
                "test": sorted(ids[test_idx].tolist()),
            }
        )
    return {
        "cohort": cohort_fingerprint(table),
        "n_folds": n_folds,
        "val_folds": val_folds,
        "seed": seed,
        "classes": classes,
        "folds": folds,
    }


def write_splits(splits: dict, path: Path) -> None:
    write_text(path, json.dumps(splits, indent=1) + "\n")


def read_splits(path: Path, table: pd.DataFrame) -> dict:
    """Load a splits file and check it belongs to this cohort."""
    path = Path(path)
    if not path.exists():
        raise SplitError(f"{path}: no splits file; run `wsimil splits` (or `dvc repro`) first")
    try:
        splits = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno}, column {exc.colno}" if hasattr(exc, "lineno") else ""
        raise SplitError(
            f"{path}: not a splits file{where} ({getattr(exc, 'msg', exc)}); re-run `wsimil splits`"
        ) from None
    if not isinstance(splits, dict) or not isinstance(splits.get("folds"), list):
        raise SplitError(f"{path}: not a splits file (no 'folds' list); re-run `wsimil splits`")
    if splits.get("cohort") != cohort_fingerprint(table):
        raise SplitError(
            f"{path} was made for another cohort (slides, patients or labels changed); "
            "re-run `wsimil splits`"
        )
    return splits
