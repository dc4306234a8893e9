"""Attention-based MIL pooling (Ilse, Tomczak & Welling, ICML 2018, §2.4 Eq. 8-9).

Shared by ABMIL and both tiers of DTFD-MIL:

    a_k = softmax_k( wᵀ (tanh(V h_k) ⊙ sigm(U h_k)) )      gated (Eq. 9)
    a_k = softmax_k( wᵀ tanh(V h_k) )                      plain (Eq. 8)
    z   = Σ_k a_k h_k
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wsimil.models.base import masked_softmax


class GatedAttention(nn.Module):
    """Attention scores and pooling over the instance axis (the one before the last)."""

    def __init__(self, in_dim: int, attention_dim: int, *, gated: bool = True) -> None:
        super().__init__()
        self.V = nn.Linear(in_dim, attention_dim)
        self.U = nn.Linear(in_dim, attention_dim) if gated else None
        self.w = nn.Linear(attention_dim, 1, bias=False)  # a bias cancels in the softmax

    def logits(self, h: Tensor) -> Tensor:
        """Unnormalised scores ``wᵀ(...)``: ``(..., N, L) -> (..., N)``."""
        g = torch.tanh(self.V(h))  # (..., N, D)
        if self.U is not None:
            g = g * torch.sigmoid(self.U(h))  # (..., N, D)
        return self.w(g).squeeze(-1)  # (..., N)

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Pool ``h (..., N, L)`` over the real instances -> ``z (..., L)``, ``a (..., N)``."""
        a = masked_softmax(self.logits(h), mask, dim=-1)  # (..., N), 0 at padding
        z = (a.unsqueeze(-1) * h).sum(dim=-2)  # (..., L)
        return z, a
