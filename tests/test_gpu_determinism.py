"""``train.deterministic`` / ``features.deterministic``: deterministic kernels, also on CUDA."""

from __future__ import annotations

import os

import pytest
import torch

from wsimil.config import ModelConfig, TrainConfig
from wsimil.models import MODELS, build_model
from wsimil.seeding import FitSeeds, use_deterministic_algorithms
from wsimil.train.fit import SlideBag, fit


@pytest.fixture
def restore_determinism():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    use_deterministic_algorithms(before)


def toy_bags(n_scales: int, n: int = 10) -> list[SlideBag]:
    g = torch.Generator().manual_seed(0)
    bags = []
    for i in range(n):
        side = 5
        cells = torch.randperm(side * side, generator=g)[:16]
        grid = torch.stack([cells % side, cells // side], 1)
        xs = tuple(torch.randn(16, 8, generator=g) + (i % 2) for _ in range(n_scales))
        bags.append(SlideBag(f"s{i}", i % 2, xs, (grid,) * n_scales))
    return bags


def test_the_setting_turns_deterministic_kernels_on_and_off(restore_determinism, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    use_deterministic_algorithms(True)
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    use_deterministic_algorithms(False)
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["abmil", "dtfd", "dmsmil"])
def test_two_cuda_fits_are_bit_identical_with_deterministic_on(restore_determinism, family):
    """Attention pooling's scatter/index ops and cuBLAS are the ones that need it on CUDA."""
    if family == "dmsmil":
        pytest.xfail("deformable sampling: embedding_bag's CUDA backward, determinism unchecked")
    cfg = TrainConfig(epochs=2, lr=1e-3, device="cuda", deterministic=True, seed=1)
    n_scales = MODELS[family].n_scales
    bags, dims = toy_bags(n_scales), [8] * n_scales

    def run() -> dict[str, torch.Tensor]:
        seeds = FitSeeds(cfg.seed)
        model = build_model(family, ModelConfig(), dims, 2, seed=seeds.init)
        fit(model, bags[:6], bags[6:], cfg, seeds=seeds)
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)
