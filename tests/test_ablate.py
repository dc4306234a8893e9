"""`wsimil ablate`: every cell a tracked cross-validation on the shared folds, one table."""

from __future__ import annotations

import json
import math

import mlflow
import pandas as pd
import pytest
import yaml
from projects import wsimil

from wsimil.config import AblateGrid, ConfigError, Params, with_overrides
from wsimil.experiment.ablate import (
    NAMED,
    _write_table,
    ablation_table,
    fingerprint,
    plot_grid,
    resolve_grid,
)
from wsimil.train.metrics import paired_folds


def _metrics(aucs: list[float]) -> dict:
    folds = {f"fold{i}": {"acc": 0.5 + a / 4, "f1": a / 2, "auc": a} for i, a in enumerate(aucs)}
    out = {"folds": folds}
    for k in ("acc", "f1", "auc"):
        values = [f[k] for f in folds.values()]
        out[f"{k}_mean"], out[f"{k}_std"] = sum(values) / len(values), 0.0
    return out


def test_the_paired_difference_of_a_cell_against_itself_is_exactly_zero():
    same = {0: 0.71, 1: 0.93, 2: 0.64}
    assert paired_folds(same, dict(same), confidence=0.975)[:3] == (0.0, 0.0, 0.0)
    grid = AblateGrid(
        reference="full",
        cells=[{"name": "full"}, {"name": "copy"}, {"name": "worse"}],
    )
    metrics = {"full": _metrics([0.71, 0.93, 0.64]), "copy": _metrics([0.71, 0.93, 0.64])}
    metrics["worse"] = _metrics([0.61, 0.80, 0.60])
    table = ablation_table(grid, metrics, confidence=0.95).set_index("cell")
    for cell in ("full", "copy"):
        for k in ("acc", "f1", "auc"):
            assert table.loc[cell, [f"d_{k}", f"d_{k}_low", f"d_{k}_high"]].tolist() == [0, 0, 0]
    worse = table.loc["worse"]
    assert worse["d_auc"] == pytest.approx(-0.09)
    assert worse["d_auc_low"] < worse["d_auc"] < worse["d_auc_high"]


def test_a_dtfd_grid_tables_and_plots_tier_one_beside_tier_two(tmp_path):
    grid = AblateGrid(
        reference="afs-M2",
        cells=[{"name": f"afs-M{m}", "x": m, "series": "afs"} for m in (1, 2)],
    )
    metrics = {"afs-M1": _metrics([0.7, 0.9]), "afs-M2": _metrics([0.8, 0.6])}
    for m, tier1 in zip(metrics.values(), ([0.6, 0.7], [0.55, 0.75]), strict=True):
        for fold, a in zip(m["folds"].values(), tier1, strict=True):
            fold["auc_tier1"] = a
        m["auc_tier1_mean"], m["auc_tier1_std"] = sum(tier1) / 2, abs(tier1[0] - tier1[1]) / 2
    table = ablation_table(grid, metrics, confidence=0.95).set_index("cell")
    assert table.loc["afs-M1", "auc_tier1_mean"] == pytest.approx(0.65)
    assert table.loc["afs-M1", "d_auc_tier1"] == pytest.approx(0.0)  # (0.05 - 0.05) / 2
    assert table.loc["afs-M2", "d_auc_tier1"] == 0
    _write_table(table.reset_index(), tmp_path, "m", "afs-M2", 0.95)
    md = (tmp_path / "table.md").read_text()
    assert (
        "| tier-1 AUC |" in md
        and "| afs-M1 | 0.700 ± 0.000 | 0.400 ± 0.000 | 0.800 ± 0.000 | 0.650 ± 0.050 |" in md
    )
    plot_grid(grid, table.reset_index(), tmp_path / "plot.png", title="m")
    assert (tmp_path / "plot.png").stat().st_size > 0
    # A grid without the read-out (DMSMIL) has no tier-1 column.
    plain = ablation_table(grid, {k: _metrics([0.7, 0.9]) for k in metrics}, confidence=0.95)
    assert "auc_tier1_mean" not in plain.columns


def test_named_grids_cover_the_papers_ablations():
    tables = NAMED["dmsmil"]["tables"]
    assert len(tables.cells) == 6
    assert sum(c.family == "damil" for c in tables.cells) == 2  # the single-scale rows
    lams = [c.x for c in NAMED["dmsmil"]["lambda"].cells]
    assert (min(lams), max(lams)) == (0.01, 10.0)
    distill = NAMED["dtfd"]["distill"].cells
    assert {(c.series, c.x) for c in distill} == {
        (d, m) for d in ("maxs", "maxmins", "mas", "afs") for m in (1, 2, 4, 8, 16)
    }


def test_a_changed_setting_changes_the_cells_fingerprint():
    base = Params()
    assert fingerprint(base, "dmsmil") == fingerprint(Params(), "dmsmil")
    assert fingerprint(base, "dmsmil") != fingerprint(
        with_overrides(base, {"train.dmsmil.epochs": 3}), "dmsmil"
    )
    assert fingerprint(base, "dmsmil") != fingerprint(
        with_overrides(base, {"model.dmsmil.ot": "off"}), "dmsmil"
    )


def test_a_bad_grid_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no grid 'nope' for --model dmsmil"):
        resolve_grid(Params(), "dmsmil", "nope")
    bad = tmp_path / "g.yaml"
    bad.write_text(yaml.safe_dump({"reference": "x", "cells": [{"name": "a"}]}))
    with pytest.raises(ConfigError, match=r"grid file .*g.yaml: not a valid grid"):
        resolve_grid(Params(), "dmsmil", str(bad))


@pytest.mark.slow  # the CLI twice on the shared tiny project (built once per session)
def test_a_tiny_grid_is_tracked_tabled_plotted_and_resumed(tiny_project, tmp_path):
    grid = {
        "reference": "full",
        "cells": [
            {"name": "full"},
            {"name": "no-ot", "set": {"model.dmsmil.ot": "off"}},
        ],
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(grid))
    out_dir = tmp_path / "ablate"
    args = ["ablate", "--model", "dmsmil", "--grid", str(tmp_path / "tiny.yaml"),
            "-S", "train.dmsmil.epochs=1", "-S", f"ablate.out_dir={out_dir}"]  # fmt: skip
    first = wsimil(args, tiny_project)
    assert "2 cells run, 0 skipped" in first

    out = out_dir / "tiny"
    table = pd.read_csv(out / "table.csv").set_index("cell")
    assert list(table.index) == ["full", "no-ot"]
    assert (out / "plot.png").stat().st_size > 0
    md = (out / "table.md").read_text()
    client = mlflow.MlflowClient(f"sqlite:///{tiny_project / 'mlruns.db'}")
    parent_id = json.loads((out / "parent.json").read_text())["mlflow_run_id"]
    parent = client.get_run(parent_id)
    assert parent.data.tags["run_kind"] == "ablation"
    assert {a.path for a in client.list_artifacts(parent_id)} >= {
        "table.csv", "table.md", "plot.png"
    }  # fmt: skip
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    by_cell = {r.data.tags["ablate_cell"]: r for r in children}
    assert sorted(by_cell) == ["full", "no-ot"]
    for cell in ("full", "no-ot"):
        metrics = json.loads((out / cell / "metrics.json").read_text())
        assert len(metrics["folds"]) == 2
        for k in ("acc", "f1", "auc"):
            for stat in ("mean", "std"):
                want = metrics[f"{k}_{stat}"]
                assert table.loc[cell, f"{k}_{stat}"] == pytest.approx(want, rel=1e-5, nan_ok=True)
                got = by_cell[cell].data.metrics[f"cv_{k}_{stat}"]
                assert got == pytest.approx(want, nan_ok=True)
        assert f"| {cell} | {metrics['acc_mean']:.3f} ± {metrics['acc_std']:.3f}" in md
    assert by_cell["no-ot"].data.params["model.ot"] == "off"
    assert table.loc["full", ["d_auc", "d_acc", "d_f1"]].tolist() == [0, 0, 0]
    ref = json.loads((out / "full" / "metrics.json").read_text())["folds"]
    cell = json.loads((out / "no-ot" / "metrics.json").read_text())["folds"]
    d = [cell[f]["auc"] - ref[f]["auc"] for f in ref]
    if all(math.isfinite(x) for x in d):
        assert table.loc["no-ot", "d_auc"] == pytest.approx(sum(d) / len(d), rel=1e-5)

    again = wsimil(args, tiny_project)
    assert "0 cells run, 2 skipped" in again
    rerun = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert len(rerun) == 2  # no new child runs
