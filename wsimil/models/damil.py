"""DAMIL: the single-scale deformable-attention MIL of DMSMIL §3.2.1 (DAMIL_10x / DAMIL_20x).

DMSMIL (:mod:`wsimil.models.dmsmil`) with one scale: projection, deformable attention on the
tile grid, mean pooling (Eq. 9), linear classifier, L = λ·CE. It reads the ``dmsmil``
section; ``ot`` and ``fusion`` have nothing to act on and are unused. With
``deformable: false`` it is the first row of the paper's Tables 4-5 (projection + mean).
"""

from __future__ import annotations

from wsimil.models.dmsmil import DMSMIL


class DAMIL(DMSMIL):
    """DMSMIL on one scale."""

    n_scales = 1
    paper = "DAMIL (DMSMIL's single-scale ablation)"
