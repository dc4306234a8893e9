"""Contract tests, parametrized over the model table: a new entry in MODELS is enrolled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wsimil.config import (
    ABMILConfig,
    DMSMILConfig,
    DTFDConfig,
    ModelConfig,
    load_params,
)
from wsimil.models import MODELS, Bags, build_model, collate

D_IN = 12
SMALL = ModelConfig(
    abmil=ABMILConfig(hidden_dims=(16,), attention_dim=8, dropout=0.0),
    dtfd=DTFDConfig(hidden_dims=(16,), attention_dim=8, n_pseudo_bags=3, n_eval_repeats=3),
    dmsmil=DMSMILConfig(dim=16, heads=2, points=3, offset_scale=2.0, fusion_dim=8),
)
NAMES = list(MODELS)


def random_bag(n: int, n_scales: int, gen: torch.Generator) -> tuple[list, list]:
    """One bag: features and distinct (col, row) grid cells (with holes) per scale."""
    feats, grids = [], []
    for _ in range(n_scales):
        feats.append(torch.randn(n, D_IN, generator=gen))
        cells = torch.randperm(3 * n, generator=gen)[:n]  # a sparse 2-row-wide-ish layout
        grids.append(torch.stack([cells % 5, cells // 5], dim=-1))
    return feats, grids


def make_batch(name: str, sizes: list[int], seed: int = 0) -> tuple[Bags, list, list]:
    gen = torch.Generator().manual_seed(seed)
    bags = [random_bag(n, MODELS[name].n_scales, gen) for n in sizes]
    feats, grids = [b[0] for b in bags], [b[1] for b in bags]
    return collate(feats, grids), feats, grids


def build(name: str, n_classes: int = 2, cfg: ModelConfig = SMALL):
    torch.manual_seed(0)
    return build_model(name, cfg, [D_IN] * MODELS[name].n_scales, n_classes)


def test_table_matches_config_names():
    names = ModelConfig.model_fields["name"].annotation.__args__
    assert set(names) == set(MODELS)
    with pytest.raises(ValueError, match="unknown model 'transmil'"):
        build_model("transmil", SMALL, [D_IN], 2)


def test_params_yaml_model_section_validates():
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    assert params.model.name in MODELS
    with pytest.raises(ValueError, match="multiple of heads"):
        DMSMILConfig(dim=10, heads=4)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_number_of_scales_is_a_clear_error(name):
    n = MODELS[name].n_scales
    with pytest.raises(ValueError, match="scale"):
        build_model(name, SMALL, [D_IN] * (n + 1), 2)
    model = build(name)
    bags, _, _ = make_batch(name, [5])
    wrong = Bags(bags.x + bags.x, None, bags.grid + bags.grid)
    with pytest.raises(ValueError, match="scale"):
        model(wrong)


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_output_shapes(name, n_classes):
    model = build(name, n_classes)
    sizes = [7, 3, 10]
    bags, _, _ = make_batch(name, sizes)
    out = model(bags)
    assert out.logits.shape == (3, n_classes)
    assert out.scores, "every model gives per-instance scores"
    for key, per_scale in out.scores.items():
        assert len(per_scale) == model.n_scales, key
        for s, score in enumerate(per_scale):
            assert score.shape == (3, bags.x[s].shape[1]), key
            pad = ~bags.mask[s]
            assert torch.all(score[pad] == 0), f"{key} is non-zero at padding"
    proba = model.predict_proba(bags)
    assert torch.allclose(proba.sum(-1), torch.ones(3))


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_finite_gradient(name):
    model = build(name, 3)
    model.train()
    bags, _, _ = make_batch(name, [9, 6])
    y = torch.tensor([2, 0])
    # one step first: zero-initialised layers (deformable offsets and point weights, as in
    # Deformable DETR) block the gradient to the query projection at initialisation only
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.loss(model(bags), y)[0].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    total, parts = model.loss(model(bags), y)
    assert parts and all(torch.isfinite(torch.tensor(v)) for v in parts.values())
    total.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


@pytest.mark.parametrize("name", NAMES)
def test_instance_permutation_invariance(name):
    model = build(name).eval()
    bags, feats, grids = make_batch(name, [11])
    gen = torch.Generator().manual_seed(1)
    perms = [torch.randperm(x.shape[0], generator=gen) for x in feats[0]]
    shuffled = collate(
        [[x[p] for x, p in zip(feats[0], perms, strict=True)]],
        [[g[p] for g, p in zip(grids[0], perms, strict=True)]],
    )
    with torch.no_grad():
        a, b = model(bags), model(shuffled)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    for key in a.scores:
        for s, p in enumerate(perms):
            torch.testing.assert_close(
                a.scores[key][s][0, p], b.scores[key][s][0], atol=1e-5, rtol=1e-4
            )


@pytest.mark.parametrize("name", NAMES)
def test_padding_invariance(name):
    """A bag alone equals the same bag padded in a batch beside a larger one."""
    model = build(name, 3).eval()
    alone, feats, grids = make_batch(name, [6])
    other, f2, g2 = make_batch(name, [13], seed=5)
    both = collate(feats + f2, grids + g2)
    # what the padding holds must not matter
    x = tuple(t.clone() for t in both.x)
    grid = tuple(t.clone() for t in both.grid)
    for s in range(len(x)):
        x[s][0, ~both.mask[s][0]] = 1e6
        grid[s][0, ~both.mask[s][0]] = 97
    both = Bags(x, both.mask, grid)
    with torch.no_grad():
        a, b = model(alone), model(both)
    torch.testing.assert_close(a.logits[0], b.logits[0], atol=1e-5, rtol=1e-5)
    for key in a.scores:
        for s in range(model.n_scales):
            n = feats[0][s].shape[0]
            torch.testing.assert_close(
                a.scores[key][s][0], b.scores[key][s][0, :n], atol=1e-5, rtol=1e-4
            )


def _train_three_steps(name: str) -> tuple[dict, torch.Tensor]:
    torch.manual_seed(123)
    cfg = SMALL.model_copy(
        update={
            "abmil": SMALL.abmil.model_copy(update={"dropout": 0.3}),
            "dtfd": SMALL.dtfd.model_copy(update={"dropout": 0.3}),
            "dmsmil": SMALL.dmsmil.model_copy(update={"dropout": 0.3}),
        }
    )
    model = build_model(name, cfg, [D_IN] * MODELS[name].n_scales, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    bags, _, _ = make_batch(name, [8, 5])
    y = torch.tensor([1, 0])
    model.train()
    for _ in range(3):
        loss, _ = model.loss(model(bags), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, model.predict_proba(bags)


@pytest.mark.parametrize("name", NAMES)
def test_seeded_training_is_bit_identical(name):
    s1, p1 = _train_three_steps(name)
    s2, p2 = _train_three_steps(name)
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    assert torch.equal(p1, p2)
