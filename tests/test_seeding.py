"""The seeding rule: a model's weights and a fit depend on (seed, fold, trial), not on history."""

from __future__ import annotations

import pytest
import torch

from wsimil.config import ModelConfig, TrainConfig
from wsimil.models import MODELS, build_model
from wsimil.seeding import FitSeeds
from wsimil.train.fit import SlideBag, fit


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", list(MODELS))
def test_initial_weights_ignore_the_global_rng(family):
    dims = [8] * MODELS[family].n_scales
    torch.manual_seed(1)
    first = weights(build_model(family, ModelConfig(), dims, 2, seed=5))
    torch.rand(1000)  # whatever ran before in the process
    second = weights(build_model(family, ModelConfig(), dims, 2, seed=5))
    other = weights(build_model(family, ModelConfig(), dims, 2, seed=6))
    assert same(first, second)
    assert not same(first, other)


def test_building_a_model_leaves_the_global_rng_alone():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    build_model("abmil", ModelConfig(), [8], 2, seed=0)
    assert torch.equal(torch.rand(4), expected)


def test_streams_differ_by_fold_trial_and_purpose_and_are_stable():
    seeds = {
        FitSeeds(0).init,
        FitSeeds(0).train,
        FitSeeds(0, fold=1).init,
        FitSeeds(0, trial=0).init,
        FitSeeds(0, fold=1, trial=0).init,
        FitSeeds(1).init,
    }
    assert len(seeds) == 6
    assert all(0 <= s < 2**63 for s in seeds)
    # A pinned value: changing the rule changes every recorded result, so it must be deliberate.
    assert FitSeeds(0, fold=2, trial=3).init == FitSeeds(0, fold=2, trial=3).init
    assert FitSeeds(0).init == 7896617691693857887


def test_a_fit_does_not_depend_on_what_the_process_did_before():
    g = torch.Generator().manual_seed(0)
    bags = [
        SlideBag(f"s{i}", i % 2, (torch.randn(10, 8, generator=g) + (i % 2),)) for i in range(12)
    ]
    cfg = TrainConfig(epochs=3, lr=1e-2, device="cpu", seed=4)

    def run() -> dict:
        seeds = FitSeeds(cfg.seed, fold=1)
        model = build_model("abmil", ModelConfig(), [8], 2, seed=seeds.init)
        fit(model, bags[:8], bags[8:], cfg, seeds=seeds)
        return weights(model)

    first = run()
    torch.manual_seed(123)
    torch.rand(77)
    assert same(first, run())
