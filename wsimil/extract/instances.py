"""One slide's instances, ready for a model: the per-slide type every later stage passes.

The bags a model trains on (:mod:`wsimil.train.bags`, read from the feature caches) and
the bag of a slide sent to a served model (:func:`wsimil.extract.replay.slide_bag`,
embedded on request) are both a :class:`SlideBag`, defined here, in the stage that makes
instances, so that training and serving need not import each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class SlideBag:
    """One slide's instances (one entry per scale the model reads)."""

    slide_id: str
    label: int | None  # class index; None for a slide sent to be predicted
    x: tuple[Tensor, ...]  # one (N_s, D_s) float32 per scale
    grid: tuple[Tensor, ...] | None = None  # one (N_s, 2) long (col, row) per scale
    coords: tuple[np.ndarray, ...] | None = None  # one (N_s, 2) level-0 (x, y) per scale
    tile_level0: tuple[float, ...] | None = None  # tile side at level-0 pixels, per scale

    @classmethod
    def from_arrays(
        cls,
        slide_id: str,
        label: int | None,
        features: Sequence[np.ndarray],
        grid: Sequence[np.ndarray],
        coords: Sequence[np.ndarray],
        tile_level0: Sequence[float],
    ) -> SlideBag:
        """A bag from per-scale numpy arrays (a cache's or a fresh embedding's); no copies."""
        return cls(
            slide_id=slide_id,
            label=label,
            x=tuple(torch.from_numpy(np.ascontiguousarray(f, np.float32)) for f in features),
            grid=tuple(torch.from_numpy(np.asarray(g, np.int64)) for g in grid),
            coords=tuple(coords),
            tile_level0=tuple(float(t) for t in tile_level0),
        )
