"""Inter-scale optimal transport (DMSMIL §2.3, Eq. 1-2; SPEC §4).

D_i = W₁ between the uniform empirical distributions of slide i's 10x and 20x instance
embeddings, Euclidean ground cost. POT's torch backend (``ot.emd2``, exact network simplex;
``ot.sinkhorn2``, entropic, log-domain) returns a value whose gradient flows back into the
embeddings, so L_ot = mean_i D_i trains the model.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def wasserstein1(
    p: Tensor, q: Tensor, *, method: Literal["exact", "sinkhorn"] = "exact", reg: float = 0.1
) -> Tensor:
    """W₁ between the uniform distributions on the rows of ``p (n, d)`` and ``q (m, d)``."""
    import ot  # here, not at the top: POT pulls in scikit-learn (1-4 s per process), and
    # only a DMSMIL fit with ot on needs it, not every process that imports the models

    cost = torch.cdist(p, q)  # (n, m) Euclidean ground cost
    a = torch.full((p.shape[0],), 1.0 / p.shape[0], dtype=p.dtype, device=p.device)
    b = torch.full((q.shape[0],), 1.0 / q.shape[0], dtype=q.dtype, device=q.device)
    if method == "exact":
        return ot.emd2(a, b, cost, numItermax=10_000_000)
    return ot.sinkhorn2(a, b, cost, reg, method="sinkhorn_log")


def batch_wasserstein1(
    x1: Tensor,
    x2: Tensor,
    mask1: Tensor,
    mask2: Tensor,
    *,
    method: Literal["exact", "sinkhorn"] = "exact",
    reg: float = 0.1,
) -> Tensor:
    """Per-slide W₁ between the real instances of ``x1 (B, N1, d)`` and ``x2 (B, N2, d)``.

    Returns ``(B,)``; a slide with no instance at either scale gets 0.
    """
    out = []
    for b in range(x1.shape[0]):
        p, q = x1[b][mask1[b]], x2[b][mask2[b]]  # (n1, d), (n2, d)
        if p.shape[0] == 0 or q.shape[0] == 0:
            out.append(x1.new_zeros(()))
        else:
            out.append(wasserstein1(p, q, method=method, reg=reg))
    return torch.stack(out)  # (B,)
