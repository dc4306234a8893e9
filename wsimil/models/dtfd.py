"""DTFD-MIL: double-tier feature distillation MIL (Zhang et al., CVPR 2022, arXiv 2203.12081).

SPEC §3. One slide = N instance features x_k; h_k = Linear+ReLU(x_k) (§3.1).

    pseudo-bags  shuffle, split into M parts (np.array_split); each inherits the label (§3.2)
    tier 1       a_k = gated attention inside pseudo-bag m; F_m = Σ a_k h_k;
                 pseudo-bag logits = W F_m + b; Loss₁ = mean CE over the M pseudo-bags
    instance p   L_k^c = a_k · (W_c · h_k)  (Grad-CAM with GAP = attention pooling, bias
                 excluded, §3.1 Eq. 4-6); p_k = softmax_c(L_k^c)
    distill      MaxS: argmax_k p_k;  MaxMinS: argmax and argmin;  MAS: argmax_k a_k;
                 AFS: F_m (§3.3)
    tier 2       gated attention + linear classifier over the M (2M for MaxMinS) distilled
                 vectors, which are **detached**: tier 1 gets no tier-2 gradient; Loss₂ = CE

Choices where the paper and the reference code leave room:

- Ranking class: binary tasks rank by p_k of class 1; more classes rank by the probability
  of the instance's pseudo-bag's predicted class (SPEC §3). ``scores["instance_prob"]`` is
  that ranking probability.
- The partition is a pure function of (seed, set of instances): instances are put in a
  canonical order (by a fixed random projection of their features) before the seeded random
  keys are assigned, so a permuted bag gets the same pseudo-bags. Training draws fresh keys
  per forward from the model's generator (seeded by ``partition_seed``); evaluation uses
  ``n_eval_repeats`` partitions seeded from ``partition_seed``, identical for every
  call and every bag, and averages the softmax: eval ``logits = log(mean_r softmax)``.
- A slide with fewer than M instances has empty pseudo-bags; they are masked out of both
  tiers and of Loss₁.
- The dimension reduction has a bias (the reference's has none); all Linear layers are
  Glorot-initialised like ABMIL.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsimil.config import DTFDConfig
from wsimil.models.attention import GatedAttention
from wsimil.models.base import Bags, MILModel, MILOutput, glorot_init_, masked_softmax, mlp


def pseudo_bag_ids(keys: Tensor, mask: Tensor, n_bags: int) -> Tensor:
    """``np.array_split`` of the real instances sorted by ``keys``: ``(..., N) -> (..., N)`` ids.

    Padding gets an id too (clamped to ``n_bags - 1``); callers mask it out.
    """
    keys = keys.masked_fill(~mask, float("inf"))
    rank = keys.argsort(dim=-1, stable=True).argsort(dim=-1)  # (..., N) position after shuffle
    n = mask.sum(dim=-1, keepdim=True)  # (..., 1)
    q, rem = n // n_bags, n % n_bags  # the first `rem` parts hold q + 1
    big = rem * (q + 1)
    ids = torch.where(rank < big, rank // (q + 1), rem + (rank - big) // q.clamp_min(1))
    return ids.clamp_max(n_bags - 1)  # (..., N)


class DTFD(MILModel):
    """DTFD-MIL on one scale; see the module docstring."""

    n_scales = 1
    config_key = "dtfd"
    primary_score = "instance_prob"  # Grad-CAM instance probability (DTFD-MIL §3.1)
    paper = "DTFD-MIL (Zhang et al., CVPR 2022)"

    def __init__(self, cfg: DTFDConfig, in_dims: Sequence[int], n_classes: int) -> None:
        super().__init__(in_dims, n_classes)
        self.cfg = cfg
        self.reduce = mlp(self.in_dims[0], cfg.hidden_dims, cfg.dropout)
        width = cfg.hidden_dims[-1] if cfg.hidden_dims else self.in_dims[0]
        self.attention1 = GatedAttention(width, cfg.attention_dim)
        self.classifier1 = nn.Linear(width, n_classes)
        self.attention2 = GatedAttention(width, cfg.attention_dim)
        self.classifier2 = nn.Linear(width, n_classes)
        glorot_init_(self)
        probe = torch.randn(self.in_dims[0], generator=torch.Generator().manual_seed(0))
        self.register_buffer("order_probe", probe, persistent=False)
        self._train_gen = torch.Generator().manual_seed(cfg.partition_seed)

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Gradient-norm clip groups, as ``Main_DTFD_MIL.py`` clips them (SPEC §3).

        Each tier-1 module on its own (dimension reduction, attention, classifier), then
        tier 2 as one group.
        """
        tier1 = [self.reduce, self.attention1, self.classifier1]
        tier2 = [*self.attention2.parameters(), *self.classifier2.parameters()]
        return [*(list(m.parameters()) for m in tier1), tier2]

    # --- pseudo-bags ----------------------------------------------------------------------

    def _partition_keys(self, x: Tensor, mask: Tensor) -> Tensor:
        """Random keys ``(R, B, N)``, assigned to instances in canonical order."""
        B, N = mask.shape
        proj = (x @ self.order_probe).masked_fill(~mask, float("inf"))  # (B, N)
        canon = proj.argsort(dim=-1, stable=True).argsort(dim=-1)  # (B, N) canonical rank
        if self.training:
            u = torch.rand(1, B, N, generator=self._train_gen)  # fresh partition per visit
        else:
            seeds = np.random.SeedSequence(self.cfg.partition_seed).generate_state(
                self.cfg.n_eval_repeats
            )  # one per repeat; drawn row by row so a key never depends on N
            rows = [torch.rand(N, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
            u = torch.stack(rows)[:, None, :].expand(-1, B, -1)  # (R, B, N), same per bag
        u = u.to(x.device, x.dtype)
        return u.gather(-1, canon.unsqueeze(0).expand(u.shape[0], -1, -1))  # (R, B, N)

    # --- distillation ---------------------------------------------------------------------

    @staticmethod
    def _pick(h: Tensor, score: Tensor, member: Tensor) -> Tensor:
        """Per pseudo-bag, the h of the member with the highest score -> ``(R, B, M, L)``."""
        s = torch.where(member, score.unsqueeze(2), float("-inf"))  # (R, B, M, N)
        idx = s.argmax(dim=-1)  # (R, B, M)
        R, B, M = idx.shape
        hr = h.unsqueeze(0).expand(R, -1, -1, -1)  # (R, B, N, L)
        return hr.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, h.shape[-1]))  # (R, B, M, L)

    def _distill(
        self, h: Tensor, feats: Tensor, a: Tensor, p: Tensor, member: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor]:
        kind = self.cfg.distill
        if kind == "afs":
            return feats, valid  # (R, B, M, L)
        if kind == "mas":
            return self._pick(h, a, member), valid
        top = self._pick(h, p, member)  # (R, B, M, L)
        if kind == "maxs":
            return top, valid
        low = self._pick(h, -p, member)  # (R, B, M, L)
        return torch.cat([top, low], dim=2), torch.cat([valid, valid], dim=2)  # 2M vectors

    # --- forward --------------------------------------------------------------------------

    def forward(self, bags: Bags) -> MILOutput:
        (x,), (mask,) = self.inputs(bags)
        M, C = self.cfg.n_pseudo_bags, self.n_classes
        keys = self._partition_keys(x, mask)  # (R, B, N); R = 1 when training
        groups = pseudo_bag_ids(keys, mask, M)  # (R, B, N)
        member = F.one_hot(groups, M).permute(0, 1, 3, 2).bool() & mask[None, :, None, :]
        valid = member.any(dim=-1)  # (R, B, M) non-empty pseudo-bags

        # tier 1
        h = self.reduce(x)  # (B, N, L)
        a = masked_softmax(self.attention1.logits(h)[:, None, :], member)  # (R, B, M, N)
        feats = torch.einsum("rbmn,bnl->rbml", a, h)  # (R, B, M, L) pseudo-bag features
        pseudo_logits = self.classifier1(feats)  # (R, B, M, C)

        # instance probabilities, Grad-CAM derivation: L_k^c = a_k W_c·h_k
        a_inst = a.sum(dim=2)  # (R, B, N) attention inside the instance's own pseudo-bag
        cam = a_inst.unsqueeze(-1) * (h @ self.classifier1.weight.T).unsqueeze(0)  # (R,B,N,C)
        p = torch.softmax(cam, dim=-1)  # (R, B, N, C)
        if C == 2:
            p_rank = p[..., 1]  # (R, B, N)
        else:
            pred = pseudo_logits.argmax(dim=-1).gather(-1, groups)  # (R, B, N) bag's class
            p_rank = p.gather(-1, pred.unsqueeze(-1)).squeeze(-1)  # (R, B, N)

        # tier 2 on detached distilled vectors
        distilled, d_valid = self._distill(h, feats, a_inst, p_rank, member, valid)
        z, a2 = self.attention2(distilled.detach(), d_valid)  # (R, B, L), (R, B, K)
        logits_r = self.classifier2(z)  # (R, B, C)
        if self.training:
            logits = logits_r[0]  # (B, C)
        else:
            probs = torch.softmax(logits_r, dim=-1).mean(dim=0)  # (B, C) mean over partitions
            logits = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()

        m = mask.to(h.dtype)
        return MILOutput(
            logits,
            scores={"attention": (a_inst.mean(0) * m,), "instance_prob": (p_rank.mean(0) * m,)},
            aux={
                "pseudo_bag": groups,  # (R, B, N) pseudo-bag id of every instance
                "pseudo_logits": pseudo_logits,  # (R, B, M, C)
                "pseudo_valid": valid,  # (R, B, M)
                "distilled": distilled,  # (R, B, K, L) tier-2 input
                "distilled_valid": d_valid,  # (R, B, K)
                "tier2_attention": a2,  # (R, B, K)
                "partition_logits": logits_r,  # (R, B, C) tier 2, one per partition
            },
        )

    def sub_bag_logits(self, out: MILOutput) -> tuple[Tensor, Tensor]:
        """Tier 1's pseudo-bag logits ``(B, R·M, C)``, every partition's, and their validity."""
        pl, valid = out.aux["pseudo_logits"], out.aux["pseudo_valid"]  # (R,B,M,C), (R,B,M)
        R, B, M, C = pl.shape
        return pl.transpose(0, 1).reshape(B, R * M, C), valid.transpose(0, 1).reshape(B, R * M)

    def loss_tensors(self, out: MILOutput, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        pl, valid = out.aux["pseudo_logits"], out.aux["pseudo_valid"]  # (R,B,M,C), (R,B,M)
        R, B, M, C = pl.shape
        targets = y[None, :, None].expand(R, B, M)  # every pseudo-bag inherits its label
        ce = F.cross_entropy(pl.reshape(-1, C), targets.reshape(-1), reduction="none")
        ce = ce.view(R, B, M) * valid
        tier1 = (ce.sum(-1) / valid.sum(-1).clamp_min(1)).mean()  # mean over pseudo-bags
        tier2 = F.cross_entropy(out.logits, y)
        return tier1 + tier2, {"tier1": tier1, "tier2": tier2}
