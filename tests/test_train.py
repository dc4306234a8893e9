"""The generic fit loop: learns a real MIL signal, not a shuffled one, deterministically."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsimil.config import (
    ABMILConfig,
    DMSMILConfig,
    DTFDConfig,
    ModelConfig,
    TrainConfig,
)
from wsimil.models import MODELS, build_model, collate
from wsimil.train.fit import ADAM_IMPLEMENTATIONS, SlideBag, adam, feature_stats, fit, predict
from wsimil.train.metrics import slide_metrics

SMALL = ModelConfig(
    abmil=ABMILConfig(hidden_dims=(32,), attention_dim=16, dropout=0.0),
    dtfd=DTFDConfig(hidden_dims=(32,), attention_dim=16, n_pseudo_bags=3, n_eval_repeats=2),
    dmsmil=DMSMILConfig(dim=32, heads=4, points=2, fusion_dim=16),
)


def make_bags(n: int, n_scales: int, seed: int, *, d: int = 12, n_inst: int = 24):
    """Positive bags hold a few 'tumour' instances shifted along two feature axes."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_inst))) + 1
    bags = []
    for i in range(n):
        label = i % 2
        xs, grids = [], []
        for _ in range(n_scales):
            x = rng.normal(size=(n_inst, d)).astype(np.float32)
            if label:
                x[:4, :2] += 2.5
            cells = rng.choice(side * side, size=n_inst, replace=False)
            xs.append(torch.from_numpy(x))
            grids.append(torch.from_numpy(np.stack([cells % side, cells // side], 1)))
        bags.append(SlideBag(f"s{i}", label, tuple(xs), tuple(grids)))
    return bags


def train_cfg(epochs: int = 12) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=2e-3, weight_decay=1e-4, seed=3, device="cpu")


def run(family: str, *, shuffle_labels: bool = False, epochs: int = 12):
    n_scales = MODELS[family].n_scales
    train, val, test = (make_bags(n, n_scales, s) for n, s in ((40, 1), (12, 2), (40, 3)))
    if shuffle_labels:  # train and val: true validation labels would pick a lucky epoch
        rng = np.random.default_rng(0)

        def shuffled(bags):
            perm = rng.permutation([b.label for b in bags])
            return [
                SlideBag(b.slide_id, int(y), b.x, b.grid) for b, y in zip(bags, perm, strict=True)
            ]

        train, val = shuffled(train), shuffled(val)
    model = build_model(family, SMALL, [12] * n_scales, 2)
    if epochs:
        result = fit(model, train, val, train_cfg(epochs))
    else:  # the untrained model, standardised with the training bags' statistics
        result = model.set_feature_stats(*feature_stats(train))
    proba, _, _ = predict(model, test, torch.device("cpu"))
    y = np.array([b.label for b in test])
    return result, proba, slide_metrics(y, proba, 0.5)["auc"]


@pytest.mark.parametrize("family", sorted(MODELS))
def test_learns_the_signal_and_not_shuffled_labels(family):
    _, _, auc = run(family)
    assert auc > 0.9, f"{family} reached AUC {auc:.3f} on a separable MIL task"
    _, _, auc_shuffled = run(family, shuffle_labels=True)
    # A random-initialised attention model can already rank bags by their outlying
    # instances (DTFD at init seed 0: AUC 0.90): shuffled labels must not take it past 0.8
    # or, where the untrained model is already there, not more than 0.1 beyond it.
    bound = max(0.8, run(family, epochs=0)[2] + 0.1)
    assert auc_shuffled < bound, f"{family} reached AUC {auc_shuffled:.3f} on shuffled labels"


@pytest.mark.parametrize("family", ["abmil", "dtfd"])
def test_same_seed_same_history_and_predictions(family):
    a, pa, _ = run(family, epochs=3)
    b, pb, _ = run(family, epochs=3)
    assert a.history == b.history and a.best_epoch == b.best_epoch
    assert np.array_equal(pa, pb)


def test_best_epoch_weights_are_restored():
    family = "abmil"
    train, val = make_bags(20, 1, 1), make_bags(10, 1, 2)
    model = build_model(family, SMALL, [12], 2)
    result = fit(model, train, val, train_cfg(6))
    proba, _, _ = predict(model, val, torch.device("cpu"))
    auc = slide_metrics(np.array([b.label for b in val]), proba, 0.5)["auc"]
    assert auc == pytest.approx(result.best_val_auc)
    assert result.history[result.best_epoch]["val_auc"] == pytest.approx(result.best_val_auc)


def test_step_schedule_and_early_stopping():
    train, val = make_bags(10, 1, 1), make_bags(6, 1, 2)
    model = build_model("abmil", SMALL, [12], 2)
    # A learning rate too small to move float32 weights: validation never improves.
    cfg = TrainConfig(epochs=30, lr=1e-12, early_stopping_patience=2, seed=0, device="cpu")
    result = fit(model, train, val, cfg)
    assert len(result.history) == 3 and result.best_epoch == 0
    step = TrainConfig(epochs=4, lr=1e-3, schedule="step", step_at=0.5, step_factor=0.2, seed=0)
    lrs = [h["lr"] for h in fit(model, train, val, step).history]
    assert lrs == pytest.approx([1e-3, 1e-3, 2e-4, 2e-4])


def test_dtfd_clips_each_tier1_module_and_tier2_separately():
    from wsimil.train.fit import clip_groups

    model = build_model("dtfd", SMALL, [12], 2)
    groups = clip_groups(model)
    modules = [model.reduce, model.attention1, model.classifier1]
    tier2 = [*model.attention2.parameters(), *model.classifier2.parameters()]
    want = [{id(p) for p in m.parameters()} for m in modules] + [{id(p) for p in tier2}]
    assert [{id(p) for p in g} for g in groups] == want
    assert set().union(*want) == {id(p) for p in model.parameters()}
    assert len(clip_groups(build_model("abmil", SMALL, [12], 2))) == 1


def test_clipping_each_group_bounds_each_group_norm():
    """A tiny clip: every group's gradient norm is cut to it on its own, not jointly."""
    from wsimil.train.fit import clip_groups, train_step

    model = build_model("dtfd", SMALL, [12], 2)
    groups = clip_groups(model)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.0)
    train_step(model, make_bags(2, 1, 3)[:1], optimiser, groups, 1e-6, torch.device("cpu"))
    norms = [torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in g])) for g in groups]
    assert [float(n) for n in norms] == pytest.approx([1e-6] * 4, rel=1e-3)


def test_standardisation_is_fitted_on_training_bags_and_saved():
    train, val = make_bags(10, 1, 1), make_bags(6, 1, 2)
    shifted = [SlideBag(b.slide_id, b.label, (b.x[0] * 50 + 7,), b.grid) for b in train]
    model = build_model("abmil", SMALL, [12], 2)
    fit(model, shifted, val, train_cfg(1))
    x = torch.cat([b.x[0] for b in shifted])
    assert torch.allclose(model.feature_mean_0, x.mean(0), atol=1e-3)
    assert torch.allclose(model.feature_scale_0, x.std(0), rtol=1e-3)
    assert "feature_mean_0" in model.state_dict()
    off = build_model("abmil", SMALL, [12], 2)
    fit(off, shifted, val, TrainConfig(epochs=1, standardize=False, device="cpu"))
    assert torch.equal(off.feature_mean_0, torch.zeros(12))


def test_a_feature_constant_in_training_is_centred_not_scaled():
    # A dead channel (all zero on the training instances) that fires on a served bag stays
    # its value; a std floored at 1e-6 made it a million times that (Tiger: up to 7e7).
    train = make_bags(4, 1, seed=0)
    for b in train:
        b.x[0][:, 3] = 0.0
    (mean,), (scale,) = feature_stats(train)
    assert scale[3] == 1.0 and mean[3] == 0.0
    assert torch.all(scale[torch.arange(12) != 3] > 0.5)  # the others: their std
    model = build_model("abmil", SMALL, [12], 2)
    model.set_feature_stats([mean], [scale])
    served = torch.zeros(1, 2, 12)
    served[0, 0, 3] = 5.0
    (x,), _ = model.inputs(collate([[served[0]]]))
    assert x[0, 0, 3] == 5.0


@pytest.mark.parametrize("family", sorted(MODELS))
def test_fused_adam_follows_the_foreach_rule_to_rounding(family):
    """The fit's fused Adam and the foreach implementation take the same 50 steps, up to
    float32 rounding, with weight decay large enough to matter; an unknown one is refused."""
    cfg = TrainConfig(lr=1e-3, weight_decay=0.1)
    weights = {}
    for implementation in ADAM_IMPLEMENTATIONS:
        model = build_model(family, SMALL, [12] * MODELS[family].n_scales, 2, seed=0)
        start = [p.detach().clone() for p in model.parameters()]
        optimiser = adam(model, cfg, implementation)
        gen = torch.Generator().manual_seed(1)
        for _ in range(50):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            optimiser.step()
        weights[implementation] = [p.detach() for p in model.parameters()]
    moved = max((w - s).abs().max().item() for w, s in zip(weights["fused"], start, strict=True))
    gap = max(
        (a - b).abs().max().item()
        for a, b in zip(weights["fused"], weights["foreach"], strict=True)
    )
    assert moved > 0.01 and gap < 1e-6, (moved, gap)
    with pytest.raises(ValueError, match="Adam implementation 'sgd'"):
        adam(model, cfg, "sgd")
