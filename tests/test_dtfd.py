"""DTFD-MIL: pseudo-bags, the Grad-CAM instance probability, distillation, the two tiers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsimil.config import DTFDConfig
from wsimil.models import collate
from wsimil.models.dtfd import DTFD, pseudo_bag_ids


def dtfd(n_classes: int = 2, d_in: int = 6, **kw) -> DTFD:
    torch.manual_seed(0)
    cfg = DTFDConfig(**{"hidden_dims": (8,), "attention_dim": 4, **kw})
    return DTFD(cfg, [d_in], n_classes)


@pytest.mark.parametrize("n", [1, 3, 4, 10, 17])
def test_pseudo_bags_follow_np_array_split(n):
    m_bags = 4
    gen = torch.Generator().manual_seed(n)
    keys = torch.rand(1, n + 3, generator=gen)  # 3 padding slots
    mask = torch.zeros(1, n + 3, dtype=torch.bool)
    mask[0, :n] = True
    ids = pseudo_bag_ids(keys, mask, m_bags)[0, :n]
    order = np.argsort(keys[0, :n].numpy(), kind="stable")
    expected = np.empty(n, dtype=int)
    for m, part in enumerate(np.array_split(order, m_bags)):
        expected[part] = m
    assert ids.tolist() == expected.tolist()


def test_training_partitions_are_redrawn_per_visit_and_seeded():
    bag = collate([[torch.randn(12, 6)]])
    model = dtfd(dropout=0.0).train()
    first, second = model(bag).aux["pseudo_bag"], model(bag).aux["pseudo_bag"]
    assert not torch.equal(first, second), "a new visit must shuffle again"
    again = dtfd(dropout=0.0).train()
    assert torch.equal(again(bag).aux["pseudo_bag"], first), "same seed, same partition"


def test_fixed_partition_seed_gives_training_permutation_invariance():
    x = torch.randn(12, 6)
    perm = torch.randperm(12)
    a = dtfd().train()(collate([[x]]))
    b = dtfd().train()(collate([[x[perm]]]))
    assert torch.equal(a.aux["pseudo_bag"][0, 0, perm], b.aux["pseudo_bag"][0, 0])
    torch.testing.assert_close(a.logits, b.logits, atol=1e-6, rtol=1e-5)


def test_eval_averages_softmax_over_seeded_partitions():
    model = dtfd(n_classes=3, n_eval_repeats=5).eval()
    bag = collate([[torch.randn(20, 6)]])
    with torch.no_grad():
        out, again = model(bag), model(bag)
    per_partition = out.aux["partition_logits"]  # (R, B, C)
    assert per_partition.shape[0] == 5
    parts = out.aux["pseudo_bag"][:, 0]  # (R, N)
    assert len({tuple(p.tolist()) for p in parts}) > 1, "the repeats use different partitions"
    torch.testing.assert_close(
        torch.softmax(out.logits, -1), torch.softmax(per_partition, -1).mean(0)
    )
    assert torch.equal(out.logits, again.logits), "evaluation is deterministic"


@pytest.mark.parametrize("n_classes", [2, 3])
def test_instance_probability_equals_autograd_grad_cam(n_classes):
    """Closed form L_k^c = a_k W_c·h_k against Grad-CAM computed with autograd.

    One pseudo-bag, so the attention pooling is the 'GAP' of the derivation: the pooled
    feature is Σ_k ĥ_k with ĥ_k = a_k h_k; β^c = mean_k ∂s^c/∂ĥ_k; L_k^c = β^c·ĥ_k.
    """
    model = dtfd(n_classes, n_pseudo_bags=1, n_eval_repeats=1).eval()
    with torch.no_grad():
        model.classifier1.bias.normal_()  # the derivation excludes the bias: make it matter
    x = torch.randn(9, 6)
    out = model(collate([[x]]))
    with torch.no_grad():
        h = model.reduce(x)  # (N, L)
        a = torch.softmax(model.attention1.logits(h), dim=0)  # (N,)
    h_hat = (a[:, None] * h).requires_grad_(True)  # (N, L)
    s = model.classifier1(h_hat.sum(0))  # (C,) class scores of the pseudo-bag
    beta = torch.stack(
        [torch.autograd.grad(s[c], h_hat, retain_graph=True)[0].mean(0) for c in range(n_classes)]
    )  # (C, L) gradient weights, bias excluded by construction
    cam = h_hat.detach() @ beta.T  # (N, C)
    p = torch.softmax(cam, dim=-1)
    ranked_class = 1 if n_classes == 2 else int(s.argmax())
    torch.testing.assert_close(out.scores["instance_prob"][0][0], p[:, ranked_class])
    torch.testing.assert_close(out.scores["attention"][0][0], a)


def hand_made_model(distill: str) -> DTFD:
    """Identity reduction (h = x); class-1 score = h₀; attention logit grows with h₁."""
    model = DTFD(
        DTFDConfig(
            hidden_dims=(), attention_dim=1, n_pseudo_bags=1, n_eval_repeats=1, distill=distill
        ),
        [3],
        2,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.classifier1.weight[1, 0] = 1.0
        model.attention1.V.weight[0, 1] = 1.0
        model.attention1.w.weight[0, 0] = 5.0  # U = 0: gate sigm(0) = 1/2
    return model


HAND_BAG = torch.tensor(
    [
        [10.0, 0.0, 0.0],  # A: highest a_k·h₀ -> highest p_k
        [-1.0, 0.0, 0.0],  # B: lowest p_k
        [0.5, 3.0, 0.0],  # C: highest attention
        [0.1, 0.5, 0.0],  # D
    ]
)


def hand_expectations() -> tuple[torch.Tensor, torch.Tensor]:
    logit = 5.0 * torch.tanh(HAND_BAG[:, 1]) * 0.5
    a = torch.softmax(logit, 0)
    p1 = torch.sigmoid(a * HAND_BAG[:, 0])  # softmax over (0, a_k h_k0)
    return a, p1


@pytest.mark.parametrize(
    "distill, picked",
    [("maxs", [0]), ("maxmins", [0, 1]), ("mas", [2])],
)
def test_distillation_picks_the_right_instances(distill, picked):
    a, p1 = hand_expectations()
    assert int(p1.argmax()) == 0 and int(p1.argmin()) == 1 and int(a.argmax()) == 2
    out = hand_made_model(distill)(collate([[HAND_BAG]]))
    torch.testing.assert_close(out.scores["instance_prob"][0][0], p1)
    distilled = out.aux["distilled"][0, 0]  # (K, L)
    torch.testing.assert_close(distilled, HAND_BAG[picked])


def test_afs_passes_the_pseudo_bag_feature():
    a, _ = hand_expectations()
    out = hand_made_model("afs")(collate([[HAND_BAG]]))
    torch.testing.assert_close(out.aux["distilled"][0, 0, 0], (a[:, None] * HAND_BAG).sum(0))


def test_tier_one_receives_no_gradient_from_tier_two():
    model = dtfd(n_classes=3, distill="maxmins").train()
    bags = collate([[torch.randn(10, 6)], [torch.randn(7, 6)]])
    _, parts = model.loss_tensors(model(bags), torch.tensor([0, 2]))
    parts["tier2"].backward()
    tier1 = [model.reduce, model.attention1, model.classifier1]
    for module in tier1:
        for p in module.parameters():
            assert p.grad is None or torch.all(p.grad == 0)
    for module in (model.attention2, model.classifier2):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_small_bags_leave_empty_pseudo_bags_out():
    model = dtfd(n_pseudo_bags=4).train()
    out = model(collate([[torch.randn(2, 6)]]))
    assert out.aux["pseudo_valid"].sum() == 2
    total, parts = model.loss(out, torch.tensor([1]))
    assert torch.isfinite(total) and np.isfinite(parts["tier1"])


def test_tier_one_auc_pools_every_pseudo_bag_with_its_slides_label():
    from sklearn.metrics import roc_auc_score

    from wsimil.train.fit import sub_bag_proba
    from wsimil.train.metrics import pseudo_bag_auc

    model = dtfd(n_pseudo_bags=4, n_eval_repeats=3)
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, 6, generator=gen) for n in (10, 2, 7)]
    bags = [_bag(f"s{i}", x, label) for i, (x, label) in enumerate(zip(xs, (1, 0, 0), strict=True))]
    train_state = model._train_gen.get_state().clone()
    proba = sub_bag_proba(model, bags, torch.device("cpu"))
    assert [p.shape for p in proba] == [(12, 2), (6, 2), (12, 2)]  # 3 partitions x 4, or 2
    assert torch.equal(model._train_gen.get_state(), train_state), "training draws untouched"
    with torch.no_grad():
        out = model(collate([[xs[1]]]))
    valid = out.aux["pseudo_valid"][:, 0]  # (R, M)
    want = torch.softmax(out.aux["pseudo_logits"][:, 0][valid], -1).numpy()
    np.testing.assert_allclose(proba[1], want, rtol=1e-6)
    labels = np.repeat([1, 0, 0], [12, 6, 12])
    pooled = np.concatenate(proba)[:, 1]
    assert pseudo_bag_auc(np.array([1, 0, 0]), proba) == roc_auc_score(labels, pooled)


def test_models_without_pseudo_bags_have_no_tier_one():
    from wsimil.config import ModelConfig
    from wsimil.models import build_model
    from wsimil.train.fit import sub_bag_proba

    model = build_model("abmil", ModelConfig(), [6], 2)
    assert sub_bag_proba(model, [_bag("s", torch.randn(5, 6), 1)], torch.device("cpu")) is None


def _bag(slide_id: str, x: torch.Tensor, label: int):
    from wsimil.train.fit import SlideBag

    return SlideBag(slide_id, label, (x,))
