"""ABMIL: attention-based deep MIL (Ilse, Tomczak & Welling, ICML 2018), the baseline (SPEC §5).

    h_k = f_ψ(x_k)                    instance MLP, Linear+ReLU+Dropout per width (§2.3)
    a_k = softmax_k(wᵀ(tanh(V h_k) ⊙ sigm(U h_k)))    gated attention (Eq. 9)
    z   = Σ_k a_k h_k                 MIL pooling (Eq. 7)
    ŷ   = softmax(W z + b)            classifier; cross-entropy loss

Choices where the paper leaves room: the bag probability is a C-way softmax (the paper's
sigmoid for C = 2 is the same model with one redundant logit), weights are Glorot-normal with
zero biases as in the paper's experiments, and the attention itself has no dropout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from wsimil.config import ABMILConfig
from wsimil.models.attention import GatedAttention
from wsimil.models.base import Bags, MILModel, MILOutput, glorot_init_, mlp


class ABMIL(MILModel):
    """Gated-attention MIL on one scale."""

    n_scales = 1
    config_key = "abmil"
    primary_score = "attention"
    paper = "ABMIL (Ilse et al., ICML 2018)"

    def __init__(self, cfg: ABMILConfig, in_dims: Sequence[int], n_classes: int) -> None:
        super().__init__(in_dims, n_classes)
        self.cfg = cfg
        self.embed = mlp(self.in_dims[0], cfg.hidden_dims, cfg.dropout)
        width = cfg.hidden_dims[-1] if cfg.hidden_dims else self.in_dims[0]
        self.attention = GatedAttention(width, cfg.attention_dim, gated=cfg.gated)
        self.classifier = nn.Linear(width, n_classes)
        glorot_init_(self)

    def forward(self, bags: Bags) -> MILOutput:
        (x,), (mask,) = self.inputs(bags)
        h = self.embed(x)  # (B, N, L)
        z, a = self.attention(h, mask)  # (B, L), (B, N)
        logits = self.classifier(z)  # (B, C)
        return MILOutput(logits, scores={"attention": (a,)})

    def loss_tensors(self, out: MILOutput, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        ce = F.cross_entropy(out.logits, y)
        return ce, {"ce": ce}
