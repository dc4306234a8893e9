"""Bags for training: the cohort table joined with the feature cache.

A single-scale model reads one scale's file per slide (``model.scale``); DMSMIL reads the
10x and 20x files, paired by ``parent_index``. Labels become integer class indices in the
sorted order of the class names (the order ``splits.json`` records).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from wsimil.extract.cache import SCALE_NAMES, BagError, bag_path, read_bag, read_pair
from wsimil.extract.instances import SlideBag


class CohortError(Exception):
    """The cohort table or its caches cannot be used; the message names what to fix."""


REQUIRED_COLUMNS = ("slide_id", "patient_id", "label")


def read_cohort(csv: Path) -> pd.DataFrame:
    """``slides.csv`` with its required columns checked (unknown columns are kept)."""
    csv = Path(csv)
    if not csv.exists():
        raise CohortError(f"{csv}: no cohort table; run `wsimil synth` or point to your slides.csv")
    table = pd.read_csv(csv, dtype={"slide_id": str, "patient_id": str, "label": str})
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise CohortError(f"{csv}: missing column(s) {', '.join(missing)}")
    dupes = table["slide_id"][table["slide_id"].duplicated()].tolist()
    if dupes:
        raise CohortError(f"{csv}: duplicated slide_id {dupes[:3]}")
    return table


def load_bags(
    table: pd.DataFrame, features_root: Path, scales: tuple[str, ...], classes: list[str]
) -> tuple[dict[str, SlideBag], dict[str, str]]:
    """Every slide's bag at ``scales`` (("20x",), ("10x",) or ("10x", "20x")).

    Returns:
        bags by slide id, and the slides that could not be loaded with the reason (a slide
        whose extraction failed is reported, not fatal).
    """
    for s in scales:
        if s not in SCALE_NAMES:
            raise CohortError(f"unknown scale {s!r}; use one of {SCALE_NAMES}")
    index = {c: i for i, c in enumerate(classes)}
    bags, failed = {}, {}
    for row in table.itertuples():
        sid = str(row.slide_id)
        if row.label not in index:
            failed[sid] = f"label {row.label!r} is not one of the split's classes {classes}"
            continue
        try:
            if scales == SCALE_NAMES:
                parts = read_pair(features_root, sid)
            else:
                parts = tuple(read_bag(bag_path(features_root, sid, s)) for s in scales)
        except BagError as exc:
            failed[sid] = str(exc)
            continue
        if any(len(p) == 0 for p in parts):
            failed[sid] = "empty bag"
            continue
        bags[sid] = SlideBag.from_arrays(
            sid,
            index[row.label],
            [p.features for p in parts],
            [p.grid for p in parts],
            [p.coords for p in parts],
            [p.tile_size_level0 for p in parts],
        )
    return bags, failed
