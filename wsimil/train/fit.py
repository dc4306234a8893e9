"""Fit one MIL model on one split. Knows nothing of MLflow, Prefect or the CLI.

One generic loop for every model (each model owns its loss): Adam, an optional step
schedule (DTFD reference: lr × 0.2 at half the epochs), gradient-norm clipping per
parameter group (DTFD clips each tier-1 module and tier 2 separately; a model lists
its groups in ``clip_groups()``), the best epoch by validation AUC (ties: lower
validation loss), optional early stopping. Seeded: the same seed on CPU gives
bit-identical weights and metrics.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from wsimil import device as devices
from wsimil.config import TrainConfig
from wsimil.extract.instances import SlideBag
from wsimil.models import Bags, MILModel, collate
from wsimil.seeding import FitSeeds, torch_rng, use_deterministic_algorithms
from wsimil.train.metrics import slide_metrics

# train.device → a torch device, by the one rule in wsimil.device (crossval imports it here)
resolve_device = functools.partial(devices.resolve_device, setting="train.device")


@dataclass
class FitResult:
    best_epoch: int
    best_val_auc: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def batches(bags: Sequence[SlideBag], batch_size: int, order: np.ndarray) -> list[list[SlideBag]]:
    return [[bags[i] for i in order[j : j + batch_size]] for j in range(0, len(order), batch_size)]


def to_model_input(batch: Sequence[SlideBag], device: torch.device) -> tuple[Bags, Tensor]:
    has_grid = all(b.grid is not None for b in batch)
    bags = collate([b.x for b in batch], [b.grid for b in batch] if has_grid else None)
    y = torch.tensor([b.label for b in batch], dtype=torch.long)
    return bags.to(device), y.to(device)


# A feature whose std over the training instances is below this is constant there (a dead
# ReLU channel of a CNN extractor, a sparse descriptor never set): it is centred, not scaled.
# Dividing by a floored std instead turned a value never seen in training into ~1e6 times
# itself: the demo's ResNet-18 has 2-14 channels per fold and scale that are zero on every
# training slide and fire on a test slide (z up to 4,132); the Tiger MIL benchmark's test
# features reached 7e7.
CONSTANT_STD = 1e-6


def feature_scale(std: Tensor) -> Tensor:
    """The divisor of z-scoring: ``std``, and 1 where the feature is constant (CONSTANT_STD)."""
    return torch.where(std < CONSTANT_STD, torch.ones_like(std), std)


def feature_stats(bags: Sequence[SlideBag]) -> tuple[list[Tensor], list[Tensor]]:
    """Per-scale mean and scale (:func:`feature_scale` of the std) of every training instance.

    Two passes over the bags in float64, one bag at a time: memory stays one bag's, not the
    fold's (270 slides x 8,000 x 1024-D would be 18 GB as one float64 matrix).
    """
    means, scales = [], []
    for s in range(len(bags[0].x)):
        n = sum(len(b.x[s]) for b in bags)
        mean = sum(b.x[s].double().sum(0) for b in bags) / n  # (D,)
        sq = sum(((b.x[s].double() - mean) ** 2).sum(0) for b in bags)  # (D,)
        means.append(mean.float())
        scales.append(feature_scale((sq / max(1, n - 1)).sqrt()).float())
    return means, scales


ADAM_IMPLEMENTATIONS = ("fused", "foreach")


def adam(
    model: torch.nn.Module, cfg: TrainConfig, implementation: str = "fused"
) -> torch.optim.Adam:
    """The fit's optimiser: Adam with ``cfg``'s rate and weight decay, on the model's device.

    ``fused`` (the default) updates every parameter in one kernel per step; ``foreach``,
    what fits used before, makes about ten passes over the parameters and their moments.
    The rule is the same and only the rounding differs: two float32 roundings after one
    step, 1.5e-8 after 50 (tests/test_train.py). Measured on 2 CPU cores: a DMSMIL demo
    fold at d = 512 (2.3 M parameters, 48 + 48 tiles) trained 1.4x faster fused, and a
    paper-scale DMSMIL epoch runs 1.16x faster (``python benchmarks/train_epoch.py --adam
    foreach fused`` prints both). Both are deterministic, on any thread count.
    """
    if implementation not in ADAM_IMPLEMENTATIONS:
        raise ValueError(
            f"Adam implementation {implementation!r}: use one of {ADAM_IMPLEMENTATIONS}"
        )
    return torch.optim.Adam(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **{implementation: True}
    )


def clip_groups(model: MILModel) -> list[list[Tensor]]:
    groups = getattr(model, "clip_groups", None)
    return groups() if callable(groups) else [list(model.parameters())]


def train_step(
    model: MILModel,
    batch: Sequence[SlideBag],
    optimiser: torch.optim.Optimizer,
    groups: list[list[Tensor]],
    grad_clip: float | None,
    device: torch.device,
) -> tuple[float, dict[str, float]]:
    """One optimiser step on one batch (the model's own loss); the loss and its parts."""
    inputs, y = to_model_input(batch, device)
    loss, parts = model.loss(model(inputs), y)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        for params in groups:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimiser.step()
    return float(loss.detach()), parts


@torch.no_grad()
def predict(
    model: MILModel,
    bags: Sequence[SlideBag],
    device: torch.device,
    batch_size: int = 1,
    *,
    gradient_scores: bool = True,
) -> tuple[np.ndarray, list[dict[str, tuple[np.ndarray, ...]]], float]:
    """Eval-mode class probabilities ``(n, C)``, per-slide instance scores and mean loss.

    ``gradient_scores=False`` leaves out the scores that cost extra passes (the
    probabilities and the loss are the same).
    """
    model.eval()
    before, model.gradient_scores = model.gradient_scores, gradient_scores
    try:
        return _predict(model, bags, device, batch_size)
    finally:
        model.gradient_scores = before


def _predict(model, bags, device, batch_size):
    probs, scores, losses = [], [], []
    for batch in batches(bags, batch_size, np.arange(len(bags))):
        inputs, y = to_model_input(batch, device)
        out = model(inputs)
        losses.append(float(model.loss(out, y)[0].detach()) * len(batch))
        probs.append(torch.softmax(out.logits.float(), dim=-1).cpu().numpy())
        masks = inputs.masks()
        for i in range(len(batch)):
            scores.append(
                {
                    name: tuple(
                        s[i][masks[k][i]].float().cpu().numpy() for k, s in enumerate(per_scale)
                    )
                    for name, per_scale in out.scores.items()
                }
            )
    return np.concatenate(probs), scores, sum(losses) / max(1, len(bags))


@torch.no_grad()
def sub_bag_proba(
    model: MILModel, bags: Sequence[SlideBag], device: torch.device
) -> list[np.ndarray] | None:
    """Per slide, the eval-mode class probabilities ``(K, C)`` of the model's sub-bag
    predictions (:meth:`MILModel.sub_bag_logits`: DTFD-MIL's tier-1 pseudo-bags, every
    evaluation partition's); None for a model that makes none. Changes no weight or RNG."""
    model.eval()
    out = []
    for bag in bags:
        inputs, _ = to_model_input([bag], device)
        sub = model.sub_bag_logits(model(inputs))
        if sub is None:
            return None
        logits, valid = sub  # (1, K, C), (1, K)
        out.append(torch.softmax(logits[0][valid[0]].float(), dim=-1).cpu().numpy())
    return out


def _val_auc(model, val, device, batch_size) -> tuple[float, float]:
    proba, _, loss = predict(model, val, device, batch_size, gradient_scores=False)
    y = np.array([b.label for b in val])
    auc = slide_metrics(y, proba, threshold=0.5)["auc"]
    return (0.0 if math.isnan(auc) else auc), loss


def fit(
    model: MILModel,
    train: Sequence[SlideBag],
    val: Sequence[SlideBag],
    cfg: TrainConfig,
    *,
    seeds: FitSeeds | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> FitResult:
    """Train ``model`` in place and leave it holding the best epoch's weights.

    Args:
        model: a freshly built model (``build_model(..., seed=seeds.init)``).
        train: training bags.
        val: validation bags; choose the best epoch (AUC) and early stopping.
        cfg: the model family's train section.
        seeds: the fit's seeds (default: ``cfg.seed``, fold 0, no trial); the slide order
            and dropout draw from ``seeds.train``, not from the global RNG.
        on_epoch: called with (epoch, metrics) after every epoch (for tracking).
    """
    seeds = seeds or FitSeeds(cfg.seed)
    device = resolve_device(cfg.device)
    if device.type == "cpu" and cfg.cpu_threads:
        # One slide per step is a chain of small ops: thread hand-offs cost more than they
        # save, and several folds or trials may run side by side.
        torch.set_num_threads(cfg.cpu_threads)
    use_deterministic_algorithms(cfg.deterministic)
    with torch_rng(seeds.train):
        return _fit(model, train, val, cfg, device, np.random.default_rng(seeds.train), on_epoch)


def _fit(model, train, val, cfg, device, rng, on_epoch) -> FitResult:
    if cfg.standardize:
        model.set_feature_stats(*feature_stats(train))
    model.to(device)
    optimiser = adam(model, cfg)
    milestone = max(1, int(round(cfg.epochs * cfg.step_at))) if cfg.schedule == "step" else None
    scheduler = (
        torch.optim.lr_scheduler.MultiStepLR(optimiser, [milestone], gamma=cfg.step_factor)
        if milestone
        else None
    )
    groups = clip_groups(model)
    best = FitResult(best_epoch=-1, best_val_auc=-1.0)
    best_key = (-1.0, math.inf)
    best_state = copy.deepcopy(model.state_dict())
    start, stale = time.perf_counter(), 0
    for epoch in range(cfg.epochs):
        model.train()
        total, parts_sum = 0.0, {}
        for batch in batches(train, cfg.batch_size, rng.permutation(len(train))):
            loss, parts = train_step(model, batch, optimiser, groups, cfg.grad_clip, device)
            total += loss * len(batch)
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v * len(batch)
        lr = optimiser.param_groups[0]["lr"]  # the rate this epoch trained with
        if scheduler:
            scheduler.step()
        val_auc, val_loss = _val_auc(model, val, device, cfg.batch_size)
        metrics = {"train_loss": total / len(train), "val_loss": val_loss, "val_auc": val_auc}
        metrics["lr"] = lr
        metrics.update({f"train_{k}": v / len(train) for k, v in parts_sum.items()})
        best.history.append({"epoch": epoch, **metrics})
        if on_epoch:
            on_epoch(epoch, metrics)
        if (val_auc, -val_loss) > (best_key[0], -best_key[1]):
            best_key, stale = (val_auc, val_loss), 0
            best.best_epoch, best.best_val_auc = epoch, val_auc
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if cfg.early_stopping_patience and stale >= cfg.early_stopping_patience:
                break
    model.load_state_dict(best_state)
    best.seconds = time.perf_counter() - start
    return best
