"""The JLD loader decodes the published benchmark files (counts from SOURCE.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsimil.milbench.datasets import DATASETS, load_jld

DATA = Path(__file__).resolve().parents[2] / "shared/data/mil-benchmarks-midatasets-jl"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} not present")

# dataset: bags, positive bags, instances, features (SOURCE.md, "Contents (checked)")
COUNTS = {
    "Musk1": (92, 47, 476, 166),
    "Fox": (200, 100, 1320, 230),
    "Tiger": (200, 100, 1220, 230),
    "Elephant": (200, 100, 1391, 230),
}


@pytest.mark.parametrize("name", DATASETS)
def test_counts_and_splits(name):
    bench = load_jld(DATA / f"{name}.jld")
    n_bags, n_pos, n_inst, n_feat = COUNTS[name]
    assert len(bench.bags) == n_bags and int(bench.labels.sum()) == n_pos
    assert bench.n_instances == n_inst and bench.n_features == n_feat
    assert bench.train_masks.shape == (5, 10, n_bags)
    test_counts = (~bench.train_masks).sum(axis=1)  # (5, n_bags)
    assert np.all(test_counts == 1), "each bag is tested exactly once per repetition"
    for _, _, train, test in bench.splits():
        assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == n_bags
        if name != "Musk1":  # stratified: 20 test bags, 10 positive
            assert len(test) == 20 and bench.labels[test].sum() == 10


def test_musk1_is_not_transposed_and_keeps_raw_values():
    bench = load_jld(DATA / "Musk1.jld")
    assert bench.bags[0].shape == (4, 166)  # Julia stores (features, instances)
    assert bench.bags[0][0, :3].tolist() == [42.0, -198.0, -109.0]  # UCI clean1.data row 1


def test_a_file_that_is_not_jld_is_a_clear_error(tmp_path):
    import h5py

    bad = tmp_path / "Bad.jld"
    with h5py.File(bad, "w") as f:
        f["X"] = np.zeros(3)
    with pytest.raises(ValueError, match="no dataset y, folds"):
        load_jld(bad)
    with pytest.raises(FileNotFoundError, match="Nope.jld"):
        load_jld(tmp_path / "Nope.jld")


def _bench_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks/mil_benchmarks.py"
    spec = importlib.util.spec_from_file_location("mil_benchmarks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stacked_datasets_keep_their_own_bags_and_folds():
    script = _bench_script()
    bags, labels, splits = script.load_group(("Fox", "Tiger"))
    fox, tiger = load_jld(DATA / "Fox.jld"), load_jld(DATA / "Tiger.jld")
    assert len(bags) == 400 and len(splits) == 100
    for name, _, _, train, test in splits:
        own = np.arange(200) if name == "Fox" else np.arange(200, 400)
        assert np.isin(train, own).all() and np.isin(test, own).all()
    name, r, f, train, test = splits[57]  # Tiger, repetition 0, fold 7
    assert (name, r, f) == ("Tiger", 0, 7)
    _, _, tr, te = list(tiger.splits())[7]
    np.testing.assert_array_equal(test - 200, te)
    np.testing.assert_array_equal(bags[test[0]], tiger.bags[te[0]])
    np.testing.assert_array_equal(labels[:200], fox.labels)
    with pytest.raises(ValueError, match="Musk1, Fox: feature dimensions differ"):
        script.load_group(("Musk1", "Fox"))


def test_jobs_stack_fox_tiger_elephant_and_keep_musk1_apart():
    script = _bench_script()
    jobs = script.jobs_for(list(DATASETS), ["abmil", "dtfd"], script.SETTING, 10, 0)
    assert [(j[0], j[1]) for j in jobs] == [
        (("Fox", "Tiger", "Elephant"), "abmil"),
        (("Musk1",), "abmil"),
        (("Musk1",), "dtfd"),
        (("Fox", "Tiger", "Elephant"), "dtfd"),
    ]


def test_scaling_rules_take_their_statistics_from_the_runs_own_instances():
    script = _bench_script()
    bags, _, splits = script.load_group(("Fox", "Tiger"))
    runs = [splits[0], splits[57]]  # Fox r0 f0, Tiger r0 f7
    mean, scale = script.feature_scaling(bags, runs, "zscore")
    train = np.concatenate([bags[i] for i in runs[1][3]])
    np.testing.assert_allclose(mean[1].numpy(), train.mean(0), rtol=1e-6)
    constant = train.std(0) == 0  # Tiger holds 87 such features on its training folds
    assert constant.sum() > 50 and (scale[1].numpy()[constant] == 1).all()
    assert (
        script.feature_scaling(bags, runs, "zscore-floor")[1][1].numpy()[constant] == 1e-6
    ).all()
    mean_all, _ = script.feature_scaling(bags, runs, "dataset")
    tiger = np.concatenate(bags[200:])  # train + test folds of Tiger, not Fox's bags
    # float32 sums in another instance order: equal to float32 rounding, not to the bit
    np.testing.assert_allclose(mean_all[1].numpy(), tiger.mean(0) + 1e-6, rtol=1e-4, atol=1e-6)
    raw_mean, raw_scale = script.feature_scaling(bags, runs, "raw")
    assert (raw_mean == 0).all() and (raw_scale == 1).all()
