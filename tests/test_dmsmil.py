"""DMSMIL / DAMIL: deformable sampling, occupancy, optimal transport, λ, ablation switches."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch

from wsimil.config import DMSMILConfig
from wsimil.models import Bags, collate
from wsimil.models.damil import DAMIL
from wsimil.models.deformable import DeformableGridAttention
from wsimil.models.dmsmil import DMSMIL
from wsimil.models.transport import batch_wasserstein1


def attention(dim=8, heads=2, points=1, c=2.0) -> DeformableGridAttention:
    torch.manual_seed(0)
    return DeformableGridAttention(dim, heads, points, c)


def fixed_offset(module: DeformableGridAttention, dx: float, dy: float) -> None:
    """Every query, head and point samples at r_q + (dx, dy)."""
    c = module.offset_scale
    with torch.no_grad():
        module.sampling_offsets.weight.zero_()
        bias = torch.tensor([dx, dy]).repeat(module.heads * module.points)
        module.sampling_offsets.bias.copy_(torch.atanh(bias / c))


def own_value(module: DeformableGridAttention, x: torch.Tensor) -> torch.Tensor:
    return module.output(module.value(x))  # Σ_m W_m W'_m x_q


def test_zero_offsets_with_one_point_return_the_query_cells_own_value():
    module = attention(points=1)
    fixed_offset(module, 0.0, 0.0)
    x = torch.randn(1, 6, 8)
    grid = torch.tensor([[[0, 0], [3, 0], [1, 2], [4, 4], [2, 1], [0, 4]]])
    mask = torch.ones(1, 6, dtype=torch.bool)
    out = module(x, grid, mask).out
    torch.testing.assert_close(out, own_value(module, x), atol=1e-5, rtol=1e-5)


def test_offsets_are_bounded_by_c():
    module = attention(points=4, c=1.5)
    with torch.no_grad():
        module.sampling_offsets.weight.normal_(std=100.0)
    x = torch.randn(2, 30, 8)
    grid = torch.stack([torch.arange(30) % 6, torch.arange(30) // 6], -1).expand(2, 30, 2)
    offsets = module(x, grid, torch.ones(2, 30, dtype=torch.bool)).offsets
    assert offsets.abs().max() <= 1.5
    assert offsets.abs().max() > 1.4, "the bound is reached, so the test is not vacuous"


def test_empty_cells_get_no_weight():
    """Half-way between an occupied and an empty cell is the occupied cell's value alone."""
    module = attention(points=1)
    x = torch.randn(1, 2, 8)
    mask = torch.ones(1, 2, dtype=torch.bool)
    fixed_offset(module, 0.5, 0.0)
    hole = torch.tensor([[[0, 0], [2, 0]]])  # cell (1, 0) is empty
    out = module(x, hole, mask).out
    torch.testing.assert_close(out[0, 0], own_value(module, x)[0, 0], atol=1e-5, rtol=1e-5)
    touching = torch.tensor([[[0, 0], [1, 0]]])  # now (1, 0) holds instance 1
    out = module(x, touching, mask).out
    v = module.value(x)[0]
    torch.testing.assert_close(out[0, 0], module.output((v[0] + v[1]) / 2), atol=1e-5, rtol=1e-5)
    fixed_offset(module, 1.0, 0.0)  # exactly on the empty cell: nothing to attend to
    out = module(x, hole, mask).out
    torch.testing.assert_close(out[0, 0], module.output.bias, atol=1e-5, rtol=1e-5)


def test_padding_rows_are_not_on_the_grid():
    module = attention(points=2)
    fixed_offset(module, 1.0, 0.0)
    x = torch.randn(1, 3, 8)
    grid = torch.tensor([[[0, 0], [5, 5], [1, 0]]])
    alone = module(x[:, :2], grid[:, :2], torch.ones(1, 2, dtype=torch.bool)).out
    padded = module(x, grid, torch.tensor([[True, True, False]])).out
    torch.testing.assert_close(alone, padded[:, :2], atol=1e-5, rtol=1e-5)


def numpy_emd(p: np.ndarray, q: np.ndarray) -> float:
    cost = ot.dist(p.astype(np.float64), q.astype(np.float64), metric="euclidean")
    return float(ot.emd2(ot.unif(len(p)), ot.unif(len(q)), cost))


def test_ot_term_equals_pot_exact_and_has_a_gradient():
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(2, 9, 4, generator=gen, requires_grad=True)
    x2 = torch.randn(2, 7, 4, generator=gen)
    m1 = torch.ones(2, 9, dtype=torch.bool)
    m2 = torch.ones(2, 7, dtype=torch.bool)
    m1[1, 6:] = False
    d = batch_wasserstein1(x1, x2, m1, m2)
    for b in range(2):
        expected = numpy_emd(x1[b][m1[b]].detach().numpy(), x2[b][m2[b]].numpy())
        assert abs(float(d[b].detach()) - expected) < 1e-5
    d.sum().backward()
    grad = x1.grad
    assert torch.isfinite(grad).all() and grad[0].abs().sum() > 0
    assert torch.all(grad[1, 6:] == 0), "padding gets no transport"
    v = torch.randn(2, 9, 4, generator=gen)  # directional finite difference
    eps = 1e-3
    with torch.no_grad():
        plus = batch_wasserstein1(x1 + eps * v, x2, m1, m2).sum()
        minus = batch_wasserstein1(x1 - eps * v, x2, m1, m2).sum()
    assert abs(float((plus - minus) / (2 * eps)) - float((grad * v).sum())) < 1e-2


def test_sinkhorn_option_is_an_upper_bound_close_to_exact():
    gen = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(1, 8, 3, generator=gen), torch.randn(1, 8, 3, generator=gen)
    m = torch.ones(1, 8, dtype=torch.bool)
    exact = float(batch_wasserstein1(x1, x2, m, m))
    soft = float(batch_wasserstein1(x1, x2, m, m, method="sinkhorn", reg=0.01))
    assert exact - 1e-4 <= soft <= exact * 1.05


def two_scale_bags(seed: int = 0) -> Bags:
    gen = torch.Generator().manual_seed(seed)
    feats, grids = [], []
    for n in (6, 9):
        fs, gs = [], []
        for _ in range(2):
            fs.append(torch.randn(n, 5, generator=gen))
            cells = torch.randperm(2 * n, generator=gen)[:n]
            gs.append(torch.stack([cells % 4, cells // 4], -1))
        feats.append(fs)
        grids.append(gs)
    return collate(feats, grids)


def dmsmil(**kw) -> DMSMIL:
    torch.manual_seed(0)
    cfg = DMSMILConfig(**{"dim": 8, "heads": 2, "points": 2, "fusion_dim": 4, **kw})
    return DMSMIL(cfg, [5, 5], 2)


@pytest.mark.parametrize("features", ["attended", "projected"])
def test_model_ot_term_is_pot_exact_on_its_embeddings_and_trains_them(features):
    model = dmsmil(lam=0.0, ot_features=features)
    bags = two_scale_bags()
    out = model(bags)
    for b in range(2):
        p = out.aux["ot_points0"][b][bags.mask[0][b]].detach().numpy()
        q = out.aux["ot_points1"][b][bags.mask[1][b]].detach().numpy()
        assert abs(float(out.aux["ot_distance"][b]) - numpy_emd(p, q)) < 1e-5
    total, parts = model.loss(out, torch.tensor([0, 1]))
    assert abs(float(total) - parts["ot"]) < 1e-6  # λ = 0: the loss is L_ot alone
    total.backward()
    assert model.project[0][0].weight.grad.abs().sum() > 0
    assert model.project[1][0].weight.grad.abs().sum() > 0


def test_lambda_scales_the_cross_entropy_term():
    bags, y = two_scale_bags(), torch.tensor([1, 0])
    one, three = dmsmil(lam=1.0), dmsmil(lam=3.0)
    out1, out3 = one(bags), three(bags)
    total1, parts1 = one.loss(out1, y)
    total3, parts3 = three.loss(out3, y)
    assert parts1 == pytest.approx(parts3)
    assert float(total1) == pytest.approx(parts1["ot"] + parts1["ce"], rel=1e-6)
    assert float(total3 - total1) == pytest.approx(2 * parts1["ce"], rel=1e-5)


def test_contributions_add_up_to_the_logit_margin():
    model = dmsmil()
    out = model(two_scale_bags())
    margin = out.logits[:, 1] - out.logits[:, 0]
    bias = model.classifier.bias[1] - model.classifier.bias[0]
    total = sum(c.sum(-1) for c in out.scores["contribution"]) + bias
    torch.testing.assert_close(total, margin, atol=1e-5, rtol=1e-5)


def test_ablation_switches():
    bags, y = two_scale_bags(), torch.tensor([0, 1])
    plain = dmsmil(deformable=False, ot="off", fusion="mean")
    assert plain.intra is None and plain.fusion is None
    out = plain(bags)
    assert "ot_distance" not in out.aux and set(plain.loss(out, y)[1]) == {"ce"}
    torch.testing.assert_close(out.aux["scale_weights"], torch.full((2, 2), 0.5))
    with torch.no_grad():  # deformable off: mean of the projections, then the classifier
        pooled = [
            (plain.project[s](bags.x[s]) * bags.mask[s][..., None]).sum(1)
            / bags.mask[s].sum(1, keepdim=True)
            for s in range(2)
        ]
        expected = plain.classifier((pooled[0] + pooled[1]) / 2)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    assert "ot_distance" in dmsmil(ot="exact")(bags).aux
    weights = dmsmil(fusion="attention")(bags).aux["scale_weights"]
    assert not torch.allclose(weights, torch.full((2, 2), 0.5))


def test_damil_is_single_scale_without_ot():
    torch.manual_seed(0)
    model = DAMIL(DMSMILConfig(dim=8, heads=2, points=2), [5], 3)
    bags = collate(
        [[torch.randn(7, 5)]],
        [[torch.stack([torch.arange(7), torch.zeros(7, dtype=torch.long)], -1)]],
    )
    out = model(bags)
    assert out.logits.shape == (1, 3) and "ot_distance" not in out.aux


def test_deformable_attention_without_grid_is_a_clear_error():
    model = dmsmil()
    bags = two_scale_bags()
    with pytest.raises(ValueError, match="grid positions"):
        model(Bags(bags.x, bags.mask, None))


def test_direction_init_spreads_points_within_c():
    module = attention(heads=4, points=3, c=3.0)
    target = module.offset_scale * torch.tanh(module.sampling_offsets.bias).view(4, 3, 2)
    radius = target.abs().amax(-1)  # (M, U) on the unit square
    assert torch.allclose(radius, torch.tensor([0.75, 1.5, 2.25]).expand(4, 3), atol=1e-5)
    angles = {round(math.atan2(float(t[0, 1]), float(t[0, 0])), 3) for t in target}
    assert len(angles) == 4


def _log_odds(model: DMSMIL, xs, bags: Bags) -> torch.Tensor:
    logits = model(Bags(xs, bags.mask, bags.grid), attribution=False).logits
    return logits[:, 1] - logits[:, 0]


def test_attribution_is_integrated_gradients_in_eval_mode_only():
    model = dmsmil(attribution_steps=3)
    bags = two_scale_bags()
    with torch.no_grad():  # a trained model's standardisation mean: the path's start
        model.set_feature_stats([torch.randn(5), torch.randn(5)], [torch.ones(5)] * 2)
    assert "attribution" not in model(bags).scores  # training: no extra pass
    model.eval()
    means = [model.feature_mean_0, model.feature_mean_1]
    expected = [torch.zeros(2, n) for n in (bags.x[0].shape[1], bags.x[1].shape[1])]
    for alpha in (1 / 6, 3 / 6, 5 / 6):  # the midpoints of m = 3 steps
        xs = tuple(
            (mu + alpha * (x - mu)).requires_grad_(True)
            for x, mu in zip(bags.x, means, strict=True)
        )
        grads = torch.autograd.grad(_log_odds(model, xs, bags).sum(), xs)
        for e, g, x, mu, m in zip(expected, grads, bags.x, means, bags.mask, strict=True):
            e += (g * (x - mu)).sum(-1) * m / 3
    for context in (torch.no_grad, torch.inference_mode):  # predict and the served model
        with context():
            got = model(bags).scores["attribution"]
        for e, a in zip(expected, got, strict=True):
            torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)
            assert not a.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert float(got[1][0][~bags.mask[1][0]].abs().sum()) == 0.0  # padding scores 0
    model.gradient_scores = False  # what the fit loop's validation asks for
    assert "attribution" not in model(bags).scores


def test_attribution_is_complete_its_sum_is_the_logit_above_the_mean_bag():
    # integrated gradients' completeness: Σ over tiles and scales = logit(x) − logit(μ)
    model = dmsmil(attribution_steps=16).eval()
    bags = two_scale_bags()
    with torch.no_grad():
        total = sum(a.sum(-1) for a in model(bags).scores["attribution"])
        baseline = tuple(torch.zeros_like(x) for x in bags.x)  # μ = 0 before fitting
        gap = _log_odds(model, bags.x, bags) - _log_odds(model, baseline, bags)
    torch.testing.assert_close(total, gap, atol=2e-3, rtol=1e-2)


def test_deformable_mixing_moves_the_contribution_off_the_tile_but_not_the_attribution():
    # every query samples the cell to its right: x̂_q is tile q+1's value, so the tile whose
    # features decide is q+1 while the contribution credits its left neighbour q
    torch.manual_seed(0)
    model = DAMIL(DMSMILConfig(dim=8, heads=1, points=1, offset_scale=2.0), [5], 2).eval()
    fixed_offset(model.intra[0], 1.0, 0.0)
    x = torch.zeros(6, 5)
    x[3] = 4.0  # the one informative tile, at column 3
    grid = torch.stack([torch.arange(6), torch.zeros(6, dtype=torch.long)], -1)
    out = model(collate([[x]], [[grid]]))
    margin = out.logits[0, 1] - out.logits[0, 0]
    model.classifier.weight.data *= torch.sign(margin)  # the informative tile argues for class 1
    with torch.no_grad():
        out = model(collate([[x]], [[grid]]))
    contribution, attribution = out.scores["contribution"][0][0], out.scores["attribution"][0][0]
    assert int(attribution.argmax()) == 3
    assert int(contribution.argmax()) == 2  # the tile that *sampled* column 3


def _blob_bags(n_bags: int, seed: int):
    """Bags on a 8x6 tile grid; a positive bag holds a 2x3 'tumour' blob of shifted tiles."""
    from wsimil.extract.instances import SlideBag

    rng = np.random.default_rng(seed)
    cols, rows = np.meshgrid(np.arange(8), np.arange(6))
    grid = np.stack([cols.ravel(), rows.ravel()], -1)  # (48, 2)
    bags, truths = [], []
    for i in range(n_bags):
        label = i % 2
        tumour = np.zeros(len(grid), bool)
        if label:
            c, r = rng.integers(0, 6), rng.integers(0, 5)
            tumour = (
                (grid[:, 0] >= c) & (grid[:, 0] < c + 3) & (grid[:, 1] >= r) & (grid[:, 1] < r + 2)
            )
        feats = []
        for _ in range(2):  # 10x and 20x: the same tiles, independent noise
            f = rng.normal(size=(len(grid), 12)).astype(np.float32)
            f[tumour, :4] += 3.0
            feats.append(f)
        coords = grid * 64
        bags.append(
            SlideBag.from_arrays(f"s{i}", label, feats, [grid, grid], [coords, coords], [64, 64])
        )
        truths.append(tumour.astype(float))
    return bags, truths


def test_attribution_localises_the_tumour_tiles_on_a_synthetic_cohort():
    """The bound of issue 17 on a small cohort: attribution localisation AUC >= 0.9.

    (The demo's figures, measured by ``wsimil crossval``, are in the README.) ``ot: off``
    keeps it to seconds: on 16 toy bags the OT term slows learning the labels.
    """
    from wsimil.config import TrainConfig
    from wsimil.experiment.heatmaps import localisation_auc
    from wsimil.seeding import FitSeeds
    from wsimil.train.fit import fit, predict

    train, _ = _blob_bags(16, seed=0)
    test, truths = _blob_bags(8, seed=1)
    cfg = TrainConfig(epochs=6, lr=1e-3, device="cpu")
    torch.manual_seed(0)
    model = DMSMIL(DMSMILConfig(dim=16, heads=2, points=2, fusion_dim=8, ot="off"), [12, 12], 2)
    fit(model, train, test, cfg, seeds=FitSeeds(0))
    _, scores, _ = predict(model, test, torch.device("cpu"))
    positives = [(s, t) for s, t in zip(scores, truths, strict=True) if t.any()]
    auc = [localisation_auc(s["attribution"][k], t) for s, t in positives for k in (0, 1)]
    assert len(auc) == 8 and np.mean(auc) >= 0.9, auc
