"""Instance scores pooled over the two scales' tiles that cover the same tissue.

A 20x tile lies inside the 10x tile that holds its centre (its parent). Two-scale models
score each scale's tiles separately, so the evidence of one region is split between the
parent's score and its children's. The *region* score of a tile adds the other scale's
share of its region: a 10x tile gets the sum of its children's scores, a 20x tile its
parent's score divided among the parent's children. Both maps then sum to the slide's
total, so an additive score (DMSMIL's integrated gradients, which sum to the logit above
the mean bag) stays additive.
"""

from __future__ import annotations

import numpy as np


def parents(coords10: np.ndarray, size10: float, coords20: np.ndarray, size20: float) -> np.ndarray:
    """Row of the 10x tile holding each 20x tile's centre, or -1 where none does.

    Args:
        coords10, coords20: (N, 2) top-left (x, y) at level-0 pixels.
        size10, size20: tile sides at level-0 pixels.
    """
    centres = np.asarray(coords20, dtype=np.float64) + size20 / 2.0  # (N20, 2)
    lo = np.asarray(coords10, dtype=np.float64)[None]  # (1, N10, 2)
    out = np.full(len(centres), -1, dtype=np.int64)
    for start in range(0, len(centres), 1024):  # (1024, N10) at a time: whole-tissue bags
        c = centres[start : start + 1024, None, :]
        inside = ((c >= lo) & (c < lo + size10)).all(-1)
        out[start : start + 1024] = np.where(inside.any(1), inside.argmax(1), -1)
    return out


def region_scores(
    scores: tuple[np.ndarray, np.ndarray],
    coords: tuple[np.ndarray, np.ndarray],
    tile_level0: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Per-scale region scores (see the module docstring) from (10x, 20x) tile scores."""
    s10, s20 = (np.asarray(s, dtype=np.float64) for s in scores)
    parent = parents(coords[0], tile_level0[0], coords[1], tile_level0[1])
    has = parent >= 0
    children = np.bincount(parent[has], minlength=len(s10))  # (N10,)
    r10 = s10 + np.bincount(parent[has], weights=s20[has], minlength=len(s10))
    r20 = s20.copy()
    r20[has] += s10[parent[has]] / children[parent[has]]
    return r10, r20
