"""A two-scale model answers a slide path exactly as it answers the cached features.

The real chain on the tiny project: `wsimil tune` → `wsimil register` (DMSMIL, 10x + 20x,
extraction settings recorded) → the registered pyfunc model reads a slide under
WSIMIL_SERVE_SLIDE_ROOT, selects the tiles, embeds both scales with the carried extractor
and must give the probabilities and top instances it gives for the feature caches the
pipeline wrote for that slide.
"""

from __future__ import annotations

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
