"""DAMIL: the single-scale deformable-attention MIL of DMSMIL §3.2.1 (DAMIL_10x / DAMIL_20x).

DMSMIL (:mod:`wsimil.models.dmsmil`) with one scale: projection, deformable attention on the
tile grid, mean pooling (Eq. 9), linear classifier, L = λ·CE. It reads the ``dmsmil``
section; ``ot`` and ``fusion`` have nothing to act on and are unused. With
``deformable: false`` it is the first row of the paper's Tables 4-5 (projection + mean).
"""

from __future__ import annotations

from collections.abc import Sequence

from wsimil.config import ModelConfig
from wsimil.models.dmsmil import DMSMIL


class DAMIL(DMSMIL):
    """DMSMIL on one scale."""

    n_scales = 1

    @classmethod
    def from_config(cls, cfg: ModelConfig, in_dims: Sequence[int], n_classes: int) -> DAMIL:
        return cls(cfg.dmsmil, in_dims, n_classes)
