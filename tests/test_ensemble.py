"""The vmapped ensemble equals independent sequential fits (what the MIL benchmark relies on)."""

from __future__ import annotations

import numpy as np
import torch

from wsimil.config import ABMILConfig, DMSMILConfig, DTFDConfig, ModelConfig
from wsimil.milbench.stacked import Ensemble, PaddedBags
from wsimil.models import Bags, build_model

CFG = ModelConfig(
    abmil=ABMILConfig(hidden_dims=(8, 6), attention_dim=4, dropout=0.0),
    dtfd=DTFDConfig(hidden_dims=(8,), attention_dim=4, n_pseudo_bags=2, n_eval_repeats=2),
    dmsmil=DMSMILConfig(dim=8, heads=2, points=2, offset_scale=1.0),
)


def toy(seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.array([0, 1] * 6)
    bags = []
    for y in labels:
        x = rng.normal(size=(rng.integers(2, 7), 5)).astype(np.float32)
        if y:
            x[0, 0] += 4.0  # one witness instance per positive bag
        bags.append(x)
    train = np.array([rng.permutation(12)[:8] for _ in range(3)])
    test = np.array([np.setdiff1d(np.arange(12), t)[:4] for t in train])
    return bags, torch.from_numpy(labels), train, test


def test_vmapped_runs_equal_sequential_runs():
    bags, labels, train, test = toy()
    data = PaddedBags.from_list(bags)
    mean, std = torch.randn(3, 5) * 0.1, torch.rand(3, 5) + 0.5

    def make(seed: int):
        return build_model("abmil", CFG, [5], 2, seed=seed)

    ens = Ensemble(make, 3, seed=7)
    ens.fit(data, labels, train, mean, std, epochs=2, lr=1e-2, weight_decay=1e-3)
    got = ens.predict_proba(data, test, mean, std)  # (R, T, C)

    torch.manual_seed(7)  # dropout draws
    models = [make(s) for s in Ensemble.init_seeds(7, 3)]
    for r, model in enumerate(models):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3, fused=True)
        rng = np.random.default_rng([7, r])
        for _ in range(2):
            for i in rng.permutation(train[r]):
                x = (torch.from_numpy(bags[i]) - mean[r]) / std[r]
                out = model(Bags((x[None],)))
                loss = model.loss_tensors(out, labels[i : i + 1])[0]
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        for t, i in enumerate(test[r]):
            x = (torch.from_numpy(bags[i]) - mean[r]) / std[r]
            expected = model.predict_proba(Bags((x[None],)))[0]
            torch.testing.assert_close(got[r, t], expected, atol=1e-5, rtol=1e-4)


def test_dtfd_and_damil_ensembles_learn_a_separable_toy():
    bags, labels, train, test = toy(1)
    for name, grid in (("dtfd", False), ("damil", True)):
        data = PaddedBags.from_list(bags, row_major_grid=grid)
        ens = Ensemble(lambda s, n=name: build_model(n, CFG, [5], 2, seed=s), 3, seed=0)
        zeros, ones = torch.zeros(3, 5), torch.ones(3, 5)
        history = ens.fit(data, labels, train, zeros, ones, epochs=10, lr=2e-2, weight_decay=0)
        assert history[-1] < 0.5 * history[0], (name, history)
        acc = (ens.predict_proba(data, train, zeros, ones).argmax(-1) == labels[train]).float()
        assert acc.mean() > 0.9, name


def test_testing_at_checkpoints_leaves_the_fit_unchanged():
    """The benchmark tests every run after some epochs (``on_epoch``); that must not move the
    dropout draws or the weights, so the last epoch's predictions are those of a plain fit."""
    bags, labels, train, test = toy(2)
    data = PaddedBags.from_list(bags)
    cfg = CFG.model_copy(update={"abmil": ABMILConfig(hidden_dims=(8,), attention_dim=4)})
    zeros, ones = torch.zeros(3, 5), torch.ones(3, 5)

    ens = Ensemble(lambda s: build_model("abmil", cfg, [5], 2, seed=s), 3, seed=3)
    ens.fit(data, labels, train, zeros, ones, epochs=3, lr=1e-2, weight_decay=0)
    plain = ens.predict_proba(data, test, zeros, ones)
    seen = []
    checked_ens = Ensemble(lambda s: build_model("abmil", cfg, [5], 2, seed=s), 3, seed=3)
    checked_ens.fit(
        data,
        labels,
        train,
        zeros,
        ones,
        epochs=3,
        lr=1e-2,
        weight_decay=0,
        on_epoch=lambda e: seen.append((e, checked_ens.predict_proba(data, test, zeros, ones))),
    )
    assert [e for e, _ in seen] == [1, 2, 3]
    torch.testing.assert_close(seen[-1][1], plain, atol=0, rtol=0)
    assert not torch.equal(seen[0][1], plain)  # the checkpoints are real, earlier states
