"""A two-scale model answers a slide path exactly as it answers the cached features.

The real chain on the tiny project: `wsimil tune` → `wsimil register` (DMSMIL, 10x + 20x,
extraction settings recorded) → the registered pyfunc model reads a slide under
WSIMIL_SERVE_SLIDE_ROOT, selects the tiles, embeds both scales with the carried extractor
and must give the probabilities and top instances it gives for the feature caches the
pipeline wrote for that slide.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from projects import mlflow_store, wsimil

from wsimil.extract.cache import read_pair
from wsimil.serve.pyfunc import SLIDE_ROOT_ENV

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registered(tiny_project):
    wsimil(["tune", "--model", "dmsmil", "--n-trials", "1"], tiny_project)
    wsimil(["register", "--model", "dmsmil"], tiny_project)
    store = f"sqlite:///{tiny_project / 'mlruns.db'}"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    version = client.get_registered_model("wsimil-dmsmil").aliases["champion"]
    return client.get_model_version("wsimil-dmsmil", version)


def test_slide_path_replays_the_pipelines_two_scale_extraction(
    registered, tiny_project, monkeypatch
):
    cohort = tiny_project / "data" / "cohort"
    slides = pd.read_csv(cohort / "slides.csv").head(3)
    monkeypatch.setenv(SLIDE_ROOT_ENV, str(cohort))
    with mlflow_store(f"sqlite:///{tiny_project / 'mlruns.db'}"):
        model = mlflow.pyfunc.load_model(f"models:/wsimil-dmsmil/{registered.version}")

    by_path = [{"bag_id": r.slide_id, "slide_path": r.path} for r in slides.itertuples()]
    cached = []
    for sid in slides.slide_id:
        bags = read_pair(tiny_project / "data" / "features" / "resnet18", sid)
        row = {"bag_id": sid}
        for scale, bag in zip(("10x", "20x"), bags, strict=True):
            row[f"features_{scale}"] = bag.features.tolist()
            row[f"grid_{scale}"] = bag.grid.tolist()
            row[f"coords_{scale}"] = bag.coords.tolist()
        cached.append(row)

    served = model.predict(pd.DataFrame(by_path))
    expected = model.predict(pd.DataFrame(cached))
    for got, want in zip(served, expected, strict=True):
        assert got["bag_id"] == want["bag_id"]
        assert got["probabilities"].keys() == want["probabilities"].keys()
        np.testing.assert_allclose(
            list(got["probabilities"].values()), list(want["probabilities"].values()), atol=1e-5
        )
        assert got["label"] == want["label"]
        assert got["n_instances"] == want["n_instances"] and set(got["n_instances"]) == {
            "10x", "20x"
        }  # fmt: skip
        for scale, top in want["top_instances"].items():
            mine = got["top_instances"][scale]
            assert [(i["index"], i["x"], i["y"]) for i in mine] == [
                (i["index"], i["x"], i["y"]) for i in top
            ]
            np.testing.assert_allclose(
                [i["score"] for i in mine], [i["score"] for i in top], atol=1e-5
            )


def test_predict_on_slides_equals_predict_on_their_caches(registered, tiny_project, tmp_path):
    """`wsimil predict --slides` (the model embeds) = `--features` (the pipeline's caches)."""
    uri = f"models:/wsimil-dmsmil/{registered.version}"
    cohort = tiny_project / "data" / "cohort"
    table = pd.read_csv(cohort / "slides.csv").head(3)
    table.to_csv(tmp_path / "slides.csv", index=False)
    (tmp_path / "slides").symlink_to(cohort / "slides")
    features = tiny_project / "data" / "features" / "resnet18"
    by_slide, by_cache = tmp_path / "by-slide", tmp_path / "by-cache"
    wsimil(["predict", "--model", uri, "--slides", str(tmp_path / "slides.csv"), "--out",
            str(by_slide)], tiny_project)  # fmt: skip
    wsimil(["predict", "--model", uri, "--features", str(features), "--out", str(by_cache)],
           tiny_project)  # fmt: skip
    a = pd.read_csv(by_slide / "predictions.csv").set_index("slide_id")
    b = pd.read_csv(by_cache / "predictions.csv").set_index("slide_id").loc[a.index]
    np.testing.assert_allclose(a["p_tumour"], b["p_tumour"], atol=1e-5)
    assert (a["label"] == b["label"]).all() and (a["model_version"] == registered.version).all()
    for sid in a.index:
        for scale in ("10x", "20x"):
            assert (by_slide / "heatmaps" / f"{sid}_{scale}.png").stat().st_size > 0
        assert (by_slide / "montages" / f"{sid}.png").stat().st_size > 0
        doc = json.loads((by_slide / "geojson" / f"{sid}.geojson").read_text())
        scales = {f["properties"]["scale"] for f in doc["features"]}
        assert scales == {"10x", "20x"}
