"""The one contract every wsimil MIL model follows.

Input, :class:`Bags`: a batch of B bags, one tensor per scale.

- ``x[s]``     ``(B, N_s, D_s)`` instance features of scale ``s``;
- ``mask[s]``  ``(B, N_s)`` bool, True = a real instance, False = padding (``None``: all real);
- ``grid[s]``  ``(B, N_s, 2)`` long tile grid position ``(col, row)`` (``None``: no geometry);
- ``grid_hw[s]`` the grid extent ``(rows, cols)``, optional: derived from ``grid`` when not
  given; callers that must avoid data-dependent shapes (``torch.func.vmap``) pass it.

Single-scale models (ABMIL, DTFD-MIL, DAMIL) take one scale; DMSMIL takes two, ordered
``(10x, 20x)``. A model states how many it needs in ``n_scales``.

Output, :class:`MILOutput`: ``logits (B, C)``; ``scores``, per-instance scores by name, each
a tuple with one ``(B, N_s)`` tensor per scale (0 at padding); ``aux``, what the model's
loss needs and what is worth logging.

Each model owns its loss: ``loss_tensors(out, y)`` returns the differentiable total and its
named parts; ``loss(out, y)`` is the same with the parts as floats, for logging. In eval mode
``softmax(logits)`` is the model's class probability (:meth:`MILModel.predict_proba`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from wsimil.config import ModelConfig, Section


@dataclass(frozen=True)
class Bags:
    """A padded batch of bags, one tensor per scale (see the module docstring)."""

    x: tuple[Tensor, ...]
    mask: tuple[Tensor, ...] | None = None
    grid: tuple[Tensor, ...] | None = None
    grid_hw: tuple[tuple[int, int], ...] | None = None

    @property
    def n_scales(self) -> int:
        return len(self.x)

    @property
    def batch_size(self) -> int:
        return self.x[0].shape[0]

    def masks(self) -> tuple[Tensor, ...]:
        """The padding masks, all True where none were given."""
        if self.mask is not None:
            return self.mask
        return tuple(torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) for x in self.x)

    def to(self, device: torch.device | str) -> Bags:
        def move(ts: tuple[Tensor, ...] | None) -> tuple[Tensor, ...] | None:
            return None if ts is None else tuple(t.to(device) for t in ts)

        return Bags(move(self.x), move(self.mask), move(self.grid), self.grid_hw)


@dataclass
class MILOutput:
    """What a model's forward returns (see the module docstring)."""

    logits: Tensor
    scores: dict[str, tuple[Tensor, ...]]
    aux: dict[str, Tensor] = field(default_factory=dict)


def collate(
    bags: Sequence[Sequence[Tensor]], grids: Sequence[Sequence[Tensor]] | None = None
) -> Bags:
    """Pad a list of bags into one :class:`Bags`.

    Args:
        bags: per bag, one ``(N_s, D_s)`` tensor per scale.
        grids: per bag, one ``(N_s, 2)`` ``(col, row)`` tensor per scale, or None.
    """
    n_scales = len(bags[0])
    xs, masks, gs = [], [], []
    for s in range(n_scales):
        n_max = max(b[s].shape[0] for b in bags)
        first = bags[0][s]
        x = first.new_zeros(len(bags), n_max, first.shape[1])  # (B, N, D)
        m = torch.zeros(len(bags), n_max, dtype=torch.bool, device=first.device)  # (B, N)
        g = torch.zeros(len(bags), n_max, 2, dtype=torch.long, device=first.device)
        for i, b in enumerate(bags):
            n = b[s].shape[0]
            x[i, :n], m[i, :n] = b[s], True
            if grids is not None:
                g[i, :n] = grids[i][s]
        xs.append(x)
        masks.append(m)
        gs.append(g)
    return Bags(tuple(xs), tuple(masks), tuple(gs) if grids is not None else None)


def masked_softmax(logits: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over ``dim`` where only ``mask`` entries compete; masked entries get exactly 0.

    A row with no True entry returns all zeros (no NaN), so an empty pseudo-bag or an empty
    padded bag is harmless.
    """
    filled = torch.where(mask, logits, torch.finfo(logits.dtype).min)  # broadcasts
    return torch.softmax(filled, dim=dim) * mask


def masked_mean(h: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``h (B, N, D)`` over the real instances of each bag -> ``(B, D)``."""
    m = mask.unsqueeze(-1).to(h.dtype)  # (B, N, 1)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)  # (B, D)


def mlp(in_dim: int, widths: Sequence[int], dropout: float) -> nn.Sequential:
    """``Linear -> ReLU -> Dropout`` per width (identity for no widths)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = width
    return nn.Sequential(*layers)


def glorot_init_(module: nn.Module) -> None:
    """Glorot-normal weights and zero biases on every Linear (Ilse et al. 2018, §5)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MILModel(nn.Module, ABC):
    """Base of every model in :data:`wsimil.models.MODELS`.

    A model class carries its own facts, and everything else (cross-validation, tuning, the
    CLI's ``wsimil models``, flow parameter types, the model card, serving) reads them here:
    ``n_scales`` and :meth:`scales`; ``config_key``, the section of
    :class:`wsimil.config.ModelConfig` it reads; ``primary_score``, the instance score its
    paper ranks tiles by (served and drawn first); ``paper``; :meth:`needs_grid`;
    :meth:`inference_config`.
    """

    n_scales: ClassVar[int] = 1
    #: False: eval-mode forwards skip the instance scores that cost extra passes (DMSMIL's
    #: attribution); the fit loop's per-epoch validation needs only the logits.
    gradient_scores: bool = True
    config_key: ClassVar[str]
    primary_score: ClassVar[str]
    paper: ClassVar[str]

    @classmethod
    def section(cls, cfg: ModelConfig) -> Section:
        """This model's section of the ``model`` config (DAMIL reads DMSMIL's)."""
        return getattr(cfg, cls.config_key)

    @classmethod
    def scales(cls, cfg: ModelConfig) -> tuple[str, ...]:
        """The feature-cache scales it reads: (10x, 20x) for two, else ``model.scale``."""
        return ("10x", "20x") if cls.n_scales == 2 else (cfg.scale,)

    @classmethod
    def from_config(cls, cfg: ModelConfig, in_dims: Sequence[int], n_classes: int) -> MILModel:
        return cls(cls.section(cfg), in_dims, n_classes)

    @classmethod
    def needs_grid(cls, section: Section) -> bool:
        """Whether the model places instances on the tile grid (so a bag must carry it)."""
        return False

    @classmethod
    def inference_config(cls, cfg: ModelConfig) -> ModelConfig:
        """The config a served model is rebuilt with (a loss-only term switched off)."""
        return cfg

    def __init__(self, in_dims: Sequence[int], n_classes: int) -> None:
        super().__init__()
        if len(in_dims) != self.n_scales:
            raise ValueError(
                f"{type(self).__name__} reads {self.n_scales} scale(s) but got input "
                f"dimensions for {len(in_dims)}: {tuple(in_dims)}"
            )
        if n_classes < 2:
            raise ValueError(f"n_classes must be at least 2, got {n_classes}")
        self.in_dims = tuple(int(d) for d in in_dims)
        self.n_classes = n_classes
        # Instance-feature standardisation, fitted on the training bags by the fit loop
        # (identity until then). Buffers, so they are saved and served with the weights.
        for s, d in enumerate(self.in_dims):
            self.register_buffer(f"feature_mean_{s}", torch.zeros(d))
            self.register_buffer(f"feature_scale_{s}", torch.ones(d))

    @torch.no_grad()
    def set_feature_stats(self, means: Sequence[Tensor], scales: Sequence[Tensor]) -> None:
        """Standardise scale ``s`` inputs as ``(x - means[s]) / scales[s]`` from now on."""
        for s, (mean, scale) in enumerate(zip(means, scales, strict=True)):
            getattr(self, f"feature_mean_{s}").copy_(mean)
            getattr(self, f"feature_scale_{s}").copy_(scale)

    def inputs(self, bags: Bags) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Check ``bags`` against the model; return features (zero at padding) and masks."""
        if bags.n_scales != self.n_scales:
            raise ValueError(
                f"{type(self).__name__} reads {self.n_scales} scale(s); the bags have "
                f"{bags.n_scales}"
            )
        masks = bags.masks()
        xs = []
        for s, (x, m) in enumerate(zip(bags.x, masks, strict=True)):
            if x.shape[-1] != self.in_dims[s]:
                raise ValueError(
                    f"{type(self).__name__} was built for {self.in_dims[s]}-D features at "
                    f"scale {s}; the bags have {x.shape[-1]}-D"
                )
            mean, scale = getattr(self, f"feature_mean_{s}"), getattr(self, f"feature_scale_{s}")
            x = (x - mean) / scale  # (B, N, D) standardised
            xs.append(x.masked_fill(~m.unsqueeze(-1), 0.0))  # padding rows may hold anything
        return tuple(xs), masks

    @abstractmethod
    def forward(self, bags: Bags) -> MILOutput: ...

    def sub_bag_logits(self, out: MILOutput) -> tuple[Tensor, Tensor] | None:
        """Predictions the model makes besides the slide's, each scored against the slide's
        label: logits ``(B, K, C)`` and which of the K are real ``(B, K)`` (DTFD-MIL's tier-1
        pseudo-bags). None (the default): the model makes none."""
        return None

    @abstractmethod
    def loss_tensors(self, out: MILOutput, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loss for labels ``y (B,)`` and its named, unweighted parts."""

    def loss(self, out: MILOutput, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The training loss and its parts as floats (for logging)."""
        total, parts = self.loss_tensors(out, y)
        return total, {k: float(v.detach()) for k, v in parts.items()}

    @torch.no_grad()
    def predict_proba(self, bags: Bags) -> Tensor:
        """Class probabilities ``(B, C)`` in eval mode; the training mode is restored."""
        was_training = self.training
        self.eval()
        try:
            return torch.softmax(self(bags).logits, dim=-1)
        finally:
            self.train(was_training)
