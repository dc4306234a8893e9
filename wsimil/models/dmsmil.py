"""DMSMIL: deformable attention + multi-scale MIL (DMSMIL §2.3-2.6; SPEC §4).

Per slide, K tiles at 10x (x¹, scale 0) and their K children at 20x (x², scale 1):

    h^s      = ReLU(Linear_s(x^s))                           per-scale projection
    x̂^{s,j}  = DeformAttn(h^s) on the tile grid              §2.4, Eq. 3-8
    x̂^s      = (1/K) Σ_j x̂^{s,j}                              Eq. 9
    a^s      = softmax_s(ωᵀ tanh(V x̂^s))                      Eq. 11
    g        = Σ_s a^s x̂^s;  ŷ = softmax(W g + b)             Eq. 10, 12
    D_i      = W₁(x̂^{1,·}, x̂^{2,·}), uniform weights          §2.3, Eq. 1
    L        = mean_i D_i + λ · CE                             Eq. 2, 13, 14

Switches (the paper's ablations, Tables 4-5): one scale = DAMIL (:mod:`wsimil.models.damil`);
``ot: off``; ``deformable: false`` (x̂^{s,j} = h^{s,j}). ``ot: sinkhorn`` swaps the exact
solver for POT's entropic one.

Choices where the paper is silent: OT compares the embeddings that enter the pooling of
Eq. 9 (``ot_features: attended``; ``projected`` compares h^s instead) — either way it has a
gradient. Eq. 11 has V inside the tanh as SPEC §4 writes it (the paper prints ωᵀ tanh(x^s)).
The paper's per-tile score is not defined further; two are given, both signed shares of the
decision logit (the log-odds W₁ − W₀ for two classes, the predicted class's logit otherwise):

- ``scores["attribution"]`` (the primary score: served and drawn first) is integrated
  gradients (Sundararajan et al., ICML 2017) of that logit, per instance and scale, on the
  straight path from the bag whose every tile is μ^s, the training mean the model
  standardises with, to the slide's bag: (x^{s,j} − μ^s) · mean_k ∂logit/∂x^{s,j} at m
  midpoints (``attribution_steps``). A tile that looks like the average training tile
  scores 0, and the scores of a slide sum to logit(x) − logit(μ) (completeness). It credits
  the tile whose *features* move the decision, wherever in the slide the deformable
  attention carried them. Computed in eval mode only (m forward and backward passes,
  :meth:`DMSMIL.attribution`). Plain gradient × input (m = 1 at x itself) was the score
  before: on the demo its 20× localisation fell to 0.83 where integrated gradients reach
  0.98, because the deformable attention and the scale softmax are far from linear between
  μ and x, so the gradient at x alone misranks whole slides (README, "Reproducibility").
- ``scores["contribution"]`` is a^s/K · w·x̂^{s,j}, the exact additive share of the logit of
  each *mixed* embedding x̂^{s,j}. It localises tumour little better than chance (demo
  localisation AUC 0.57-0.62 over two seeds and both scales, against 0.90-0.98 for
  ``attribution``; README, "Reproducibility"), and not because of its sign,
  the fusion weights or its scale: a^s/K is one positive factor per slide and scale, so it
  cannot change a slide's ranking, and the AUC is computed per slide. The cause is the
  deformable mixing: x̂^{s,j} is what tile j *gathered* from the points it samples, and the
  trained offsets leave its own cell only ~0.2 (10×) to ~0.5 (20×) of its sampling mass. A
  tile next to the tumour that samples it scores high; a tumour tile that samples its
  normal neighbours scores low. Per slide the AUC is then near 1 or near 0 depending on the
  tumour's shape, and the mean over the few tumour slides of a fold swings (0.49 to 0.97
  between runs, the difference once reported and never explained). It is kept as the
  share of each mixed embedding, for comparison in the cross-validation report.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsimil.config import DMSMILConfig, ModelConfig
from wsimil.models.base import Bags, MILModel, MILOutput, masked_mean, mlp
from wsimil.models.deformable import DeformableGridAttention
from wsimil.models.transport import batch_wasserstein1


def _clone(ts: tuple[Tensor, ...] | None) -> tuple[Tensor, ...] | None:
    """Copies that autograd may save (an ``inference_mode`` tensor may not be)."""
    return None if ts is None else tuple(t.clone() for t in ts)


class ScaleAttention(nn.Module):
    """Eq. 11: a^s = softmax_s(ωᵀ tanh(V x̂^s)) over the S pooled scale vectors."""

    def __init__(self, dim: int, fusion_dim: int) -> None:
        super().__init__()
        self.V = nn.Linear(dim, fusion_dim)
        self.omega = nn.Linear(fusion_dim, 1, bias=False)

    def forward(self, pooled: Tensor) -> Tensor:
        return torch.softmax(self.omega(torch.tanh(self.V(pooled))).squeeze(-1), dim=-1)


class DMSMIL(MILModel):
    """Two-scale model; the scales are ordered (10x, 20x)."""

    n_scales = 2
    config_key = "dmsmil"
    primary_score = "attribution"  # integrated gradients of the decision logit
    paper = "DMSMIL (deformable attention + multi-scale MIL with optimal transport)"

    @classmethod
    def needs_grid(cls, section: DMSMILConfig) -> bool:
        return section.deformable  # deformable attention samples the tile grid

    @classmethod
    def inference_config(cls, cfg: ModelConfig) -> ModelConfig:
        """L_ot is a training loss, not part of the logits: off when serving."""
        return cfg.model_copy(update={"dmsmil": cfg.dmsmil.model_copy(update={"ot": "off"})})

    def __init__(self, cfg: DMSMILConfig, in_dims: Sequence[int], n_classes: int) -> None:
        super().__init__(in_dims, n_classes)
        self.cfg = cfg
        S, d = self.n_scales, cfg.dim
        self.project = nn.ModuleList(mlp(D, [d], cfg.dropout) for D in self.in_dims)
        self.intra = (
            nn.ModuleList(
                DeformableGridAttention(d, cfg.heads, cfg.points, cfg.offset_scale)
                for _ in range(S)
            )
            if cfg.deformable
            else None
        )
        self.fusion = (
            ScaleAttention(d, cfg.fusion_dim) if S > 1 and cfg.fusion == "attention" else None
        )
        self.classifier = nn.Linear(d, n_classes)
        self.ot = cfg.ot if S > 1 else "off"

    def forward(
        self, bags: Bags, *, attribution: bool | None = None, transport: bool = True
    ) -> MILOutput:
        """Logits and instance scores; ``attribution`` (default: in eval mode) adds that score.

        ``transport=False`` skips L_ot's solver (the logits do not depend on it).
        """
        xs, masks = self.inputs(bags)
        if self.intra is not None and bags.grid is None:
            raise ValueError(
                f"{type(self).__name__} with deformable attention needs the tiles' grid "
                "positions (Bags.grid); none were given. Pass them, or set "
                "model.dmsmil.deformable: false"
            )
        logits, contribution, aux = self.head(self.pre_activation(xs), masks, bags, transport)
        scores = {"contribution": contribution}
        if attribution is None:
            attribution = not self.training and self.gradient_scores
        if attribution:
            scores["attribution"] = self.attribution(bags)
        return MILOutput(logits, scores=scores, aux=aux)

    def pre_activation(self, xs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """u^s = Linear_s(x^s) per scale: the per-scale projection before its ReLU."""
        return tuple(self.project[s][0](x) for s, x in enumerate(xs))

    def head(
        self, pre: tuple[Tensor, ...], masks: tuple[Tensor, ...], bags: Bags, transport: bool
    ) -> tuple[Tensor, tuple[Tensor, ...], dict[str, Tensor]]:
        """Everything after the per-scale Linear: ``pre[s] = Linear_s(x^s) (B, N_s, d)`` to
        the logits, the ``contribution`` score and ``aux`` (scale weights, L_ot's terms)."""
        embedded, ot_points, pooled = [], [], []
        for s, (u, mask) in enumerate(zip(pre, masks, strict=True)):
            h = self.project[s][1:](u)  # (B, N_s, d): ReLU, dropout
            e = h
            if self.intra is not None:
                hw = bags.grid_hw[s] if bags.grid_hw is not None else None
                e = self.intra[s](h, bags.grid[s], mask, hw).out  # (B, N_s, d)
            embedded.append(e)
            ot_points.append(e if self.cfg.ot_features == "attended" else h)
            pooled.append(masked_mean(e, mask))  # (B, d), Eq. 9
        P = torch.stack(pooled, dim=1)  # (B, S, d)
        a = P.new_full(P.shape[:2], 1.0 / P.shape[1])  # (B, S) mean of the scales
        if self.fusion is not None:
            a = self.fusion(P)  # (B, S), Eq. 11
        g = (a.unsqueeze(-1) * P).sum(dim=1)  # (B, d), Eq. 10
        logits = self.classifier(g)  # (B, C), Eq. 12

        W = self.classifier.weight  # (C, d)
        if self.n_classes == 2:
            w = (W[1] - W[0]).expand(logits.shape[0], -1)  # (B, d) log-odds direction
        else:
            w = W[logits.argmax(dim=-1)]  # (B, d) predicted class
        contribution = tuple(
            (e @ w.unsqueeze(-1)).squeeze(-1)  # (B, N_s)
            * (a[:, s] / mask.sum(-1).clamp_min(1)).unsqueeze(-1)
            * mask
            for s, (e, mask) in enumerate(zip(embedded, masks, strict=True))
        )
        aux: dict[str, Tensor] = {"scale_weights": a}
        if self.ot != "off" and transport:
            for s, p in enumerate(ot_points):
                aux[f"ot_points{s}"] = p
            aux["ot_distance"] = batch_wasserstein1(
                ot_points[0],
                ot_points[1],
                masks[0],
                masks[1],
                method=self.ot,
                reg=self.cfg.sinkhorn_reg,
            )  # (B,), Eq. 1
        return logits, contribution, aux

    def attribution(self, bags: Bags) -> tuple[Tensor, ...]:
        """Integrated gradients of the decision logit: one ``(B, N_s)`` tensor per scale.

        Per instance, Σ_D (x − μ) · mean_k ∂logit/∂x at μ + α_k (x − μ), α_k = (k + ½)/m for
        k < m = ``attribution_steps`` (the midpoint rule), μ the standardisation mean; the
        logit is the log-odds for two classes and the predicted class's logit otherwise (see
        the module docstring). Padding scores 0. Works under ``no_grad`` and
        ``inference_mode`` (the inputs are copied into a graph of their own); the model's
        weights get no gradient.

        It is computed on u^s = Linear_s(x^s), the projection before its ReLU. The
        standardisation and Linear_s are affine, so the straight path in x is a straight path
        in u, from u(μ) = b_s (Linear_s's bias: μ standardises to 0) to u(x), and
        (x − μ) · ∂logit/∂x = (u(x) − b_s) · ∂logit/∂u exactly. The D × d matmul then runs
        once, not m times forward and backward.
        """
        steps = self.cfg.attribution_steps
        with torch.inference_mode(False), torch.enable_grad():
            xs, mask, grid = _clone(bags.x), _clone(bags.mask), _clone(bags.grid)
            copied = Bags(xs, mask, grid, bags.grid_hw)
            zs, masks = self.inputs(copied)
            with torch.no_grad():
                ends = self.pre_activation(zs)  # u(x)
            starts = tuple(
                self.project[s][0].bias.detach().expand_as(u) for s, u in enumerate(ends)
            )  # u(μ)

            def decision(path: tuple[Tensor, ...]) -> Tensor:
                logits = self.head(path, masks, copied, transport=False)[0]
                if self.n_classes == 2:
                    return (logits[:, 1] - logits[:, 0]).sum()  # bags are independent
                return logits.gather(1, logits.argmax(dim=-1, keepdim=True)).sum()

            # torch.func.grad, not autograd.grad: it also runs inside the served ensemble's
            # vmap over the fold models (wsimil/serve/one_pass.py). One step at a time, so
            # the memory is that of one pass whatever m is.
            total = tuple(torch.zeros_like(u) for u in ends)
            for k in range(steps):
                alpha = (k + 0.5) / steps
                path = tuple(b + alpha * (u - b) for u, b in zip(ends, starts, strict=True))
                grads = torch.func.grad(decision)(path)
                total = tuple(t + g for t, g in zip(total, grads, strict=True))
        return tuple(
            ((t / steps * (u - b)).sum(-1) * m).detach()  # (B, N_s)
            for u, t, b, m in zip(ends, total, starts, masks, strict=True)
        )

    def loss_tensors(self, out: MILOutput, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        ce = F.cross_entropy(out.logits, y)  # Eq. 13
        if "ot_distance" not in out.aux:
            return self.cfg.lam * ce, {"ce": ce}
        l_ot = out.aux["ot_distance"].mean()  # Eq. 2
        return l_ot + self.cfg.lam * ce, {"ce": ce, "ot": l_ot}  # Eq. 14
