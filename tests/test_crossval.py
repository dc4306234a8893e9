"""A cross-validation run is recorded in MLflow with its lineage, and read back."""

from __future__ import annotations

import json

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from test_train import SMALL, make_bags

from wsimil import cpu_isa
from wsimil.config import TrainConfig
from wsimil.experiment.crossval import run_crossval, weights_sha256
from wsimil.train.splits import make_splits


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield MlflowClient(uri)
    mlflow.set_tracking_uri(None)


def test_crossval_run_is_tracked_with_lineage(tmp_path, tracking, repo_root):
    bags = make_bags(24, 1, seed=5)
    table = pd.DataFrame(
        {
            "slide_id": [b.slide_id for b in bags],
            "patient_id": [f"p{i // 4}-{i % 2}" for i in range(len(bags))],  # 2 slides each
            "label": ["tumour" if b.label else "normal" for b in bags],
        }
    )
    bags = {b.slide_id: b for b in bags}
    splits = make_splits(table, n_folds=3, val_folds=3, seed=0)
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    out = tmp_path / "results" / "abmil"
    cv = run_crossval(
        "abmil",
        SMALL,
        TrainConfig(epochs=3, lr=1e-3, seed=1, device="cpu"),
        splits,
        bags,
        table=table,
        cohort_dir=tmp_path,
        out_dir=out,
        experiment="test-exp",
        lineage={"data_version": "abc123"},
        root=repo_root,
        lineage_files=(tmp_path / "splits.json",),
    )
    client = tracking
    parent = client.get_run(cv.parent_run_id)
    tags = parent.data.tags
    assert tags["model_family"] == "abmil" and tags["data_version"] == "abc123"
    assert tags["seed"] == "1" and tags["git_dirty"] in {"true", "false"}
    assert len(tags["git_commit"]) == 40
    assert tags["cpu_kernels"] == cpu_isa.in_use() and tags["cpu_model"]  # what reproduce checks
    for m in ("acc", "f1", "auc"):
        assert f"cv_{m}_mean" in parent.data.metrics and f"cv_{m}_std" in parent.data.metrics
    assert parent.data.params["train.epochs"] == "3"
    assert parent.data.params["model.attention_dim"] == "16"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(r.data.tags["fold"] for r in children) == ["0", "1", "2"]
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val_auc")
        assert len(history) == 3 and "test_auc" in child.data.metrics
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "crossval")}
    for name in ("report", "roc.csv", "loss.csv", "metrics.json", "models"):
        assert f"crossval/{name}" in arts
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "crossval/report")}
    for name in ("predictions.csv", "roc.png", "confusion.png"):
        assert f"crossval/report/{name}" in report
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "lineage")} == {
        "lineage/splits.json"
    }
    # The DVC-facing outputs.
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["auc_mean"] == pytest.approx(parent.data.metrics["cv_auc_mean"])
    assert len(pd.read_csv(out / "report" / "predictions.csv")) == len(table)
    assert (out / "models" / "fold2.safetensors").exists()
    assert list(pd.read_csv(out / "loss.csv").columns[:3]) == ["epoch", "train_loss", "val_loss"]


@pytest.mark.slow
def test_parallel_folds_give_the_sequential_run_to_the_byte(tmp_path, tracking, repo_root):
    """Folds fitted in worker processes: the same weights, metrics, predictions and curves.

    Slow: two full DMSMIL cross-validations, one of them starting three fresh Python
    processes (each imports torch and MLflow); 177 s on the loaded 2-core machine.
    """
    bags = make_bags(18, 2, seed=3)  # DMSMIL: two scales, the deformable grid, exact OT
    table = pd.DataFrame(
        {
            "slide_id": [b.slide_id for b in bags],
            "patient_id": [b.slide_id for b in bags],
            "label": ["tumour" if b.label else "normal" for b in bags],
        }
    )
    bags = {b.slide_id: b for b in bags}
    splits = make_splits(table, n_folds=3, val_folds=3, seed=0)
    runs = {}
    for workers in (1, 3):
        runs[workers] = run_crossval(
            "dmsmil", SMALL, TrainConfig(epochs=2, lr=1e-3, seed=4, device="cpu"), splits, bags,
            table=table, cohort_dir=tmp_path, out_dir=tmp_path / f"out{workers}",
            experiment="test-parallel", lineage={}, root=repo_root, parallel_folds=workers,
        )  # fmt: skip
    one, three = runs[1], runs[3]
    assert [weights_sha256(f.state_dict) for f in one.folds] == [
        weights_sha256(f.state_dict) for f in three.folds
    ]
    assert one.summary == three.summary
    for a, b in zip(one.folds, three.folds, strict=True):
        assert a.history == b.history and a.metrics == b.metrics and a.threshold == b.threshold
        pd.testing.assert_frame_equal(a.predictions, b.predictions)
    curves = []
    for cv in (one, three):  # the per-epoch curves reach MLflow from the parent either way
        children = tracking.search_runs(
            [tracking.get_run(cv.parent_run_id).info.experiment_id],
            f"tags.mlflow.parentRunId = '{cv.parent_run_id}'",
            order_by=["tags.fold"],
        )
        curves.append(
            [[m.value for m in tracking.get_metric_history(c.info.run_id, "val_auc")]
             for c in children]
        )  # fmt: skip
    assert curves[0] == curves[1] and len(curves[0]) == 3 and len(curves[0][0]) == 2


def test_dtfd_folds_report_the_tier_one_auc_beside_the_slides(tmp_path, tracking, repo_root):
    """auc_tier1 (pseudo-bag AUC) per fold, summarised, in metrics.json and in MLflow."""
    from wsimil.config import DTFDConfig, ModelConfig

    bags = make_bags(12, 1, seed=5)
    table = pd.DataFrame(
        {
            "slide_id": [b.slide_id for b in bags],
            "patient_id": [b.slide_id for b in bags],
            "label": ["tumour" if b.label else "normal" for b in bags],
        }
    )
    splits = make_splits(table, n_folds=2, val_folds=2, seed=0)
    model = ModelConfig(dtfd=DTFDConfig(hidden_dims=(8,), attention_dim=4, n_pseudo_bags=2))
    out = tmp_path / "dtfd"
    cv = run_crossval(
        "dtfd", model, TrainConfig(epochs=1, seed=1, device="cpu"), splits,
        {b.slide_id: b for b in bags}, table=table, cohort_dir=tmp_path, out_dir=out,
        experiment="test-exp", lineage={}, root=repo_root, n_heatmaps=0,
    )  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    tier1 = [f["auc_tier1"] for f in metrics["folds"].values()]
    assert all(0.0 <= a <= 1.0 for a in tier1)
    assert metrics["auc_tier1_mean"] == pytest.approx(sum(tier1) / 2)
    parent = tracking.get_run(cv.parent_run_id)
    assert parent.data.metrics["cv_auc_tier1_mean"] == pytest.approx(metrics["auc_tier1_mean"])
    children = tracking.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{cv.parent_run_id}'"
    )
    fold_tier1 = {r.data.tags["fold"]: r.data.metrics["test_auc_tier1"] for r in children}
    assert sorted(fold_tier1.values()) == sorted(tier1)


def test_auto_fold_workers_take_the_fewest_that_finish_soonest(monkeypatch):
    """5 folds on 2 cores: 3 workers (waves of 3 then 2: 2.5 fold-times; 2 workers: 3)."""
    from wsimil.experiment.folds import fold_workers, makespan

    assert [makespan(5, w, 2) for w in range(1, 6)] == [5.0, 3.0, 2.5, 3.0, 2.5]
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert fold_workers("auto", 5, "cpu") == 3
    assert fold_workers("auto", 10, "cpu") == 2  # 5 waves of 2: already even
    assert fold_workers("auto", 2, "cpu") == 2
    assert fold_workers(4, 3, "cpu") == 3  # an explicit count, at most one per fold
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert fold_workers("auto", 5, "cpu") == 5


def test_the_forkserver_preloads_the_module_the_fold_workers_run():
    """The CLI starts the forkserver by module name, before importing anything heavy."""
    from wsimil.experiment import folds, workers

    assert folds.__name__ == workers.PRELOAD
