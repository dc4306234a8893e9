"""One-pass ensemble serving equals the k separate fold forwards, for every model family."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsimil.config import ABMILConfig, DMSMILConfig, DTFDConfig, ModelConfig
from wsimil.experiment.crossval import save_fold_models
from wsimil.experiment.folds import CVResult, FoldResult
from wsimil.models import MODELS, build_model, collate
from wsimil.serve.fold_ensemble import FoldEnsemble
from wsimil.serve.one_pass import StackedFolds

D_IN = 12
SMALL = ModelConfig(
    abmil=ABMILConfig(hidden_dims=(16,), attention_dim=8, dropout=0.0),
    dtfd=DTFDConfig(hidden_dims=(16,), attention_dim=8, n_pseudo_bags=3, n_eval_repeats=3),
    dmsmil=DMSMILConfig(dim=16, heads=2, points=3, offset_scale=2.0, fusion_dim=8),
)
K = 3


def fold_models(name: str, n_classes: int) -> list:
    """K eval-mode models of one family, each with its own weights and feature statistics."""
    models = []
    cfg = MODELS[name].inference_config(SMALL)
    n_scales = MODELS[name].n_scales
    for k in range(K):
        m = build_model(name, cfg, [D_IN] * n_scales, n_classes, seed=k)
        g = torch.Generator().manual_seed(100 + k)
        means = [torch.randn(D_IN, generator=g) * 0.3 for _ in range(n_scales)]
        scales = [torch.rand(D_IN, generator=g) + 0.5 for _ in range(n_scales)]
        m.set_feature_stats(means, scales)
        models.append(m.eval())
    return models


def bags_of(name: str, sizes: list[int], seed: int = 0):
    """Per bag, features and distinct (col, row) grid cells, with holes, per scale."""
    gen = torch.Generator().manual_seed(seed)
    feats, grids = [], []
    for n in sizes:
        f, g = [], []
        for _ in range(MODELS[name].n_scales):
            f.append(torch.randn(n, D_IN, generator=gen))
            cells = torch.randperm(3 * n, generator=gen)[:n] + 7  # off the origin
            g.append(torch.stack([cells % 5, cells // 5], dim=-1))
        feats.append(f)
        grids.append(g)
    return feats, grids


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("name", list(MODELS))
def test_one_pass_equals_separate_forwards(name, n_classes):
    models = fold_models(name, n_classes)
    feats, grids = bags_of(name, [9, 5])  # two bags, the second padded
    bags = collate(feats, grids)
    with torch.inference_mode():
        probs, scores = StackedFolds(models)(bags)
        outs = [m(bags) for m in models]
    assert probs.shape == (K, 2, n_classes)
    for k, out in enumerate(outs):
        torch.testing.assert_close(probs[k], torch.softmax(out.logits, -1), atol=1e-6, rtol=0)
        assert set(scores) == set(out.scores)
        for key, per_scale in out.scores.items():
            for s, expected in enumerate(per_scale):
                torch.testing.assert_close(scores[key][s][k], expected, atol=1e-6, rtol=0)


def test_concurrent_requests_each_get_their_own_answer():
    """The scoring server calls predict from several threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    models = fold_models("dmsmil", 2)
    stacked = StackedFolds(models)
    batches = [collate(*bags_of("dmsmil", [6 + i], seed=i)) for i in range(8)]
    with torch.inference_mode():
        alone = [stacked(b)[0] for b in batches]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda b: stacked(b)[0], batches * 3))
    for i, got in enumerate(together):
        torch.testing.assert_close(got, alone[i % len(batches)], atol=0, rtol=0)


def test_stacking_refuses_mixed_families_and_training_mode():
    a, b = fold_models("abmil", 2)[0], fold_models("dtfd", 2)[0]
    with pytest.raises(ValueError, match="share one architecture"):
        StackedFolds([a, b])
    with pytest.raises(ValueError, match="eval mode"):
        StackedFolds([a, fold_models("abmil", 2)[1].train()])


@pytest.mark.parametrize("name", ["dtfd", "dmsmil"])
def test_served_ensemble_answers_the_same_in_one_pass(name, tmp_path):
    """FoldEnsemble from saved fold files: one pass and fold by fold give the same answer."""
    models = fold_models(name, 2)
    folds = [
        FoldResult(k, {}, {}, 0.4 + 0.1 * k, 0, None, [], m.state_dict())
        for k, m in enumerate(models)
    ]
    n_scales = MODELS[name].n_scales
    cv = CVResult(name, folds, {"auc_mean": 0.5}, ["normal", "tumour"], (D_IN,) * n_scales)
    scales = ("10x", "20x") if n_scales == 2 else ("20x",)
    save_fold_models(cv, SMALL, scales, tmp_path)
    fast = FoldEnsemble.load(tmp_path / "models", "cpu", one_pass=True)
    slow = FoldEnsemble(fast.manifest, fast.models, fast.device, one_pass=False)
    assert fast.stacked is not None and slow.stacked is None
    assert FoldEnsemble(fast.manifest, fast.models, fast.device).stacked is None  # CPU default
    feats, grids = bags_of(name, [11], seed=3)
    x = tuple(t.numpy() for t in feats[0])
    g = tuple(t.numpy() for t in grids[0])
    a, b = fast.predict(x, g), slow.predict(x, g)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6, rtol=0)
    assert a.scores.keys() == b.scores.keys()
    for key in a.scores:
        for got, want in zip(a.scores[key], b.scores[key], strict=True):
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert fast.label(a.probabilities) == slow.label(b.probabilities)
