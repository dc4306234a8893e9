"""Bags for training: the cohort table joined with the feature cache.

A single-scale model reads one scale's file per slide (``model.scale``); DMSMIL reads the
10x and 20x files, paired by ``parent_index``. Labels become integer class indices in the
sorted order of the class names (the order ``splits.json`` records).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from wsimil.extract.cache import SCALE_NAMES, BagError, bag_path, read_bag, read_pair
from wsimil.extract.instances import SlideBag


class CohortError(Exception):
    """The cohort table or its caches cannot be used; the message names what to fix."""


REQUIRED_COLUMNS = ("slide_id", "patient_id", "label")


def read_cohort(csv: Path) -> pd.DataFrame:
    """``slides.csv`` with its required columns checked (unknown columns are kept).

    Raises:
        CohortError: see :func:`wsimil.extract.tables.read_table` (empty, not UTF-8, no
            ``patient_id`` column, an empty label, a repeated or unsafe slide_id, ...).
    """
    from wsimil.extract.tables import TableError, read_table

    try:
        return read_table(
            Path(csv),
            REQUIRED_COLUMNS,
            missing_hint="no cohort table; run `wsimil synth` or point to your slides.csv",
        )
    except TableError as exc:
        raise CohortError(str(exc)) from None


def load_bags(
    table: pd.DataFrame, features_root: Path, scales: tuple[str, ...], classes: list[str]
) -> tuple[dict[str, SlideBag], dict[str, str]]:
    """Every slide's bag at ``scales`` (("20x",), ("10x",) or ("10x", "20x")).

    Returns:
        bags by slide id, and the slides that could not be loaded with the reason (a slide
        whose extraction failed, or whose bag is unreadable, empty, has NaN rows or features
        of another dimension than most of the cohort's, is reported with its file, not fatal).
    """
    for s in scales:
        if s not in SCALE_NAMES:
            raise CohortError(f"unknown scale {s!r}; use one of {SCALE_NAMES}")
    index = {c: i for i, c in enumerate(classes)}
    bags, failed, paths = {}, {}, {}
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
        empty = [p.path for p in parts if len(p) == 0]
        if empty:
            failed[sid] = f"{empty[0]}: empty bag (no tiles); run `wsimil features` again"
            continue
        bags[sid] = SlideBag.from_arrays(
            sid,
            index[row.label],
            [p.features for p in parts],
            [p.grid for p in parts],
            [p.coords for p in parts],
            [p.tile_size_level0 for p in parts],
        )
        paths[sid] = [p.path for p in parts]
    for sid, why in _other_dimension(bags, paths).items():
        failed[sid] = why
        del bags[sid]
    return bags, failed


def grid_cells(grid) -> int:
    """The extent (cols x rows) of the tile grid a bag's ``(N, 2)`` positions span."""
    grid = np.asarray(grid)  # a tensor's numpy view, or an array
    if len(grid) == 0:
        return 0
    span = grid.max(axis=0) - grid.min(axis=0) + 1  # (cols, rows)
    return int(span[0]) * int(span[1])


def too_wide_grids(bags: dict[str, SlideBag], max_cells: int, key: str) -> dict[str, str]:
    """Slides whose tile grid at some scale spans more than ``max_cells`` cells.

    A grid model (DMSMIL, DAMIL) lays each scale out densely, so its memory grows with the
    extent, not with the number of tiles; ``key`` is the setting that bounds it.
    """
    out = {}
    for sid, bag in bags.items():
        for s, grid in enumerate(bag.grid or ()):
            cells = grid_cells(grid)
            if cells > max_cells:
                out[sid] = (
                    f"slide {sid}: its scale-{s} tile grid spans {cells} cells, more than "
                    f"{key}={max_cells}; raise {key} if the memory allows, or tile coarser"
                )
                break
    return out


def _other_dimension(bags: dict[str, SlideBag], paths: dict[str, list[Path]]) -> dict[str, str]:
    """Slides whose features at some scale are not as wide as most of the cohort's."""
    out = {}
    n_scales = len(next(iter(bags.values())).x) if bags else 0
    for s in range(n_scales):
        dims = Counter(int(b.x[s].shape[1]) for b in bags.values())
        usual, n = dims.most_common(1)[0]
        for sid, b in bags.items():
            dim = int(b.x[s].shape[1])
            if dim != usual and sid not in out:
                out[sid] = (
                    f"{paths[sid][s]}: {dim}-D features, but {n} of the {len(bags)} bags are "
                    f"{usual}-D; recompute it with the cohort's extractor (`wsimil features`)"
                )
    return out
