"""The registered pyfunc model: answers equal the fold models', bad requests are refused.

Models are fitted in seconds on synthetic bags and registered in a temporary sqlite store;
nothing here depends on the demo pipeline having run.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from projects import BIN
from serving import (
    SCALES,
    fit_ensemble,
    isolated_store,
    model_server,
    npy_b64,
    reference_answer,
    request_row,
)

from wsimil.models import MODELS
from wsimil.serve.pyfunc import SLIDE_ROOT_ENV
from wsimil.serve.registry import register


def publish(models_dir: Path, name: str, extraction=None) -> str:
    register(
        models_dir,
        name,
        experiment="wsimil-test",
        extraction=extraction,
        champion_margin=0.0,
        lineage={},
    )
    return f"models:/{name}@champion"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Registered DTFD-MIL and DMSMIL ensembles: {family: (Fitted, champion URI)}."""
    root = tmp_path_factory.mktemp("serve")
    with isolated_store(root), pytest.MonkeyPatch.context() as mp:
        mp.delenv(SLIDE_ROOT_ENV, raising=False)
        out = {}
        for family in ("dtfd", "dmsmil"):
            fitted = fit_ensemble(family, root / family)
            out[family] = (fitted, publish(fitted.models_dir, f"wsimil-test-{family}"))
        out["root"] = root
        yield out


@pytest.mark.parametrize("family", ["dtfd", "dmsmil"])
@pytest.mark.parametrize("encoding", ["json", "npy"])
def test_logged_model_answers_like_the_fold_models(served, family, encoding):
    fitted, uri = served[family]
    scales = SCALES[len(fitted.cv.in_dims)]
    model = mlflow.pyfunc.load_model(uri)
    rows = [request_row(b, scales, encoding=encoding) for b in fitted.held_out]
    answers = model.predict(pd.DataFrame(rows), params={"top_k": 5})
    thresholds = [f.threshold for f in fitted.cv.folds]
    for bag, answer in zip(fitted.held_out, answers, strict=True):
        probs, scores = reference_answer(fitted, bag)
        assert answer["bag_id"] == bag.slide_id
        got = [answer["probabilities"][c] for c in fitted.cv.classes]
        np.testing.assert_allclose(got, probs, atol=1e-5)
        assert answer["threshold"] == pytest.approx(np.mean(thresholds))
        positive = probs[1] >= np.mean(thresholds)
        assert answer["label"] == fitted.cv.classes[int(positive)]
        name = MODELS[family].primary_score
        assert answer["instance_score"] == name
        for k, scale in enumerate(scales):
            top = answer["top_instances"][scale]
            expected = np.argsort(-scores[name][k], kind="stable")[:5]
            assert [t["index"] for t in top] == expected.tolist()
            np.testing.assert_allclose(
                [t["score"] for t in top], scores[name][k][expected], atol=1e-5
            )
            grid = bag.grid[k].numpy()
            assert [(t["col"], t["row"]) for t in top] == [tuple(grid[i]) for i in expected]
            assert [(t["x"], t["y"]) for t in top] == [tuple(grid[i] * 256) for i in expected]


@pytest.mark.parametrize("family", ["dtfd", "dmsmil"])
def test_model_folder_holds_no_pickle(served, family, tmp_path):
    from safetensors import safe_open

    _, uri = served[family]
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path)))
    mlmodel = (local / "MLmodel").read_text()
    assert "model_code_path" in mlmodel and "python_model.pkl" not in mlmodel
    files = [p for p in local.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) == 3  # one per fold
    for p in files:
        assert p.suffix not in {".pkl", ".pickle", ".pt", ".pth", ".bin", ".joblib"}, p
        assert p.read_bytes()[:2] not in {b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"}, p
    for p in weights:
        with safe_open(str(p), framework="pt") as f:
            assert len(list(f.keys())) > 0


def _bag(n=6, d=12, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


NAN = np.where(np.eye(6, 12) > 0, np.nan, _bag())
BAD = {  # case: (record, params, HTTP status, words the message must contain)
    "wrong_dim": ({"features_20x": _bag(d=13).tolist()}, None, 400, "13-D features"),
    "empty": ({"features_20x": []}, None, 400, "is empty"),
    "empty_npy": ({"features_20x_npy": npy_b64(_bag(n=0))}, None, 400, "is empty"),
    "nan": ({"features_20x": NAN.tolist()}, None, 400, "NaN or infinite"),
    "inf": ({"features_20x_npy": npy_b64(np.full((2, 12), np.inf))}, None, 400, "NaN or infinite"),
    "over_cap": ({"features_20x": _bag(n=31).tolist()}, None, 400, "cap of 30"),
    "over_cap_npy": ({"features_20x_npy": npy_b64(_bag(n=31))}, None, 400, "cap of 30"),
    "bad_base64": ({"features_20x_npy": "bm90 base64!"}, None, 400, "not valid base64"),
    "not_npy": ({"features_20x_npy": base64.b64encode(b"hello").decode()}, None, 400, "not .npy"),
    "npy_wrong_dim": ({"features_20x_npy": npy_b64(_bag(d=7))}, None, 400, "7-D features"),
    "npy_object": ({"features_20x_npy": npy_b64(np.full((1, 12), None))}, None, 400, "not real"),
    "ragged": ({"features_20x": [[0.0] * 12, [0.0] * 11]}, None, 400, "equally long rows"),
    "both": ({"features_20x": [[0.0] * 12], "features_20x_npy": "AA=="}, None, 400, "not both"),
    "none": ({"bag_id": "x"}, None, 400, "no features for scale 20x"),
    "bad_coords": ({"features_20x": _bag().tolist(), "coords_20x": [[0, 0]]}, None, 400, "6 rows"),
    "top_k": ({"features_20x": _bag().tolist()}, {"top_k": -1}, 400, "top_k"),
    "no_slide_root": ({"slide_path": "a.tiff"}, None, 403, "WSIMIL_SERVE_SLIDE_ROOT"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_name_the_problem(served, case):
    record, params, status, words = BAD[case]
    _, uri = served["dtfd"]
    model = mlflow.pyfunc.load_model(uri, model_config={"max_instances": 30})
    with pytest.raises(MlflowException) as info:
        model.predict(pd.DataFrame([{"bag_id": "b1", **record}]), params=params)
    assert info.value.get_http_status_code() == status
    assert words in info.value.message


def test_bad_requests_of_a_grid_model(served):
    fitted, uri = served["dmsmil"]
    row = request_row(fitted.held_out[0], ("10x", "20x"))
    model = mlflow.pyfunc.load_model(uri)
    no_grid = {k: v for k, v in row.items() if not k.startswith("grid_")}
    with pytest.raises(MlflowException, match="send grid_10x, grid_20x"):
        model.predict(pd.DataFrame([no_grid]))
    pixels = {**row, "grid_10x": (np.array(row["grid_10x"]) * 4096).tolist()}
    with pytest.raises(MlflowException, match="spans .* cells"):
        model.predict(pd.DataFrame([pixels]))
    one_scale = {k: v for k, v in row.items() if "10x" not in k}
    with pytest.raises(MlflowException, match="no features for scale 10x"):
        model.predict(pd.DataFrame([one_scale]))
    capped = mlflow.pyfunc.load_model(uri, model_config={"max_bags": 2})
    with pytest.raises(MlflowException, match="3 bags, more than .* cap of 2"):
        capped.predict(pd.DataFrame([row] * 3))


def test_slide_paths_stay_under_the_root(served, tmp_path, monkeypatch):
    _, uri = served["dtfd"]
    root = tmp_path / "slides"
    root.mkdir()
    (root / "inside.tiff").write_bytes(b"not a slide")
    outside = tmp_path / "outside.tiff"
    outside.write_bytes(b"secret")
    (root / "escape.tiff").symlink_to(outside)
    monkeypatch.setenv(SLIDE_ROOT_ENV, str(root))
    model = mlflow.pyfunc.load_model(uri)
    cases = [
        (str(outside), 403, "outside the slide folder"),
        ("../outside.tiff", 403, "outside the slide folder"),
        ("escape.tiff", 403, "outside the slide folder"),  # a symlink out of the root
        ("missing.tiff", 404, "does not exist"),
        ("inside.tiff", 400, "registered without extraction settings"),
    ]
    for path, status, words in cases:
        with pytest.raises(MlflowException) as info:
            model.predict(pd.DataFrame([{"slide_path": path}]))
        assert info.value.get_http_status_code() == status, path
        assert words in info.value.message
        assert str(tmp_path) not in info.value.message.replace(path, "")  # no server paths
    both = {"slide_path": "inside.tiff", "features_20x": _bag().tolist()}
    with pytest.raises(MlflowException, match="slide_path or features, not both"):
        model.predict(pd.DataFrame([both]))


def test_answers_keep_request_order_and_ids(served):
    fitted, uri = served["dtfd"]
    model = mlflow.pyfunc.load_model(uri)
    rows = [request_row(b, ("20x",), coords=False) for b in fitted.held_out]
    rows[1].pop("bag_id")
    answers = model.predict(pd.DataFrame(rows), params={"top_k": 0})
    assert [a["bag_id"] for a in answers] == [
        fitted.held_out[0].slide_id,
        "bag1",
        *[b.slide_id for b in fitted.held_out[2:]],
    ]
    assert all(a["top_instances"]["20x"] == [] for a in answers)
    one = model.predict(pd.DataFrame(rows[:1]), params={"top_k": 2})[0]
    assert [t["x"] for t in one["top_instances"]["20x"]] == [None, None]  # no coords sent
    whole = np.round(np.array(rows[0]["features_20x"]) * 10)  # rows of JSON integers
    as_ints = {**rows[0], "features_20x": whole.astype(int).tolist()}
    as_floats = {**rows[0], "features_20x": whole.tolist()}
    a, b = (model.predict(pd.DataFrame([r]))[0] for r in (as_ints, as_floats))
    assert a["probabilities"] == b["probabilities"]
    assert json.dumps(answers)  # plain JSON types only


# --- the real server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    """`mlflow models serve` of the DTFD champion on 127.0.0.1; stopped by its process group."""

    _, uri = served["dtfd"]
    slides = tmp_path_factory.mktemp("slides")
    (slides / "inside.tiff").write_bytes(b"not a slide")
    env = {
        **os.environ,  # the served fixture's tracking store
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # uvicorn via the shell
        SLIDE_ROOT_ENV: str(slides),
        "SERVING_MODEL_CONFIG": json.dumps({"max_instances": 30}),  # override at serve time
    }
    with model_server(uri, env, tmp_path_factory.mktemp("server") / "server.log") as url:
        yield url


@pytest.mark.slow
def test_http_server_refuses_bad_requests_and_keeps_serving(server, served):
    import requests

    fitted, uri = served["dtfd"]

    def post(records, params=None):
        body = {"dataframe_records": records, **({"params": params} if params else {})}
        return requests.post(
            f"{server}/invocations",
            data=json.dumps(body),  # allow_nan: NaN must reach the model to be refused there
            headers={"Content-Type": "application/json"},
            timeout=120,
        )

    cases = ["wrong_dim", "empty", "nan", "inf", "over_cap", "bad_base64", "not_npy", "top_k"]
    for case in cases:
        record, params, status, words = BAD[case]
        r = post([{"bag_id": "b1", **record}], params)
        assert r.status_code == status, (case, r.text[:500])
        assert r.json()["error_code"] == "INVALID_PARAMETER_VALUE" and words in r.json()["message"]
    r = post([{"bag_id": "ints", "features_20x": [[1] * 12, [0] * 12]}])
    assert r.status_code == 200 and r.json()["predictions"][0]["n_instances"] == {"20x": 2}
    for path, status in (("/etc/hostname", 403), ("../x.tiff", 403), ("missing.tiff", 404)):
        r = post([{"slide_path": path}])
        assert r.status_code == status and "slide_path" in r.json()["message"], r.text[:500]

    # ... and the server still answers, the same as the model in this process
    model = mlflow.pyfunc.load_model(uri)
    for encoding in ("json", "npy"):
        rows = [request_row(b, ("20x",), encoding=encoding) for b in fitted.held_out]
        r = post(rows, {"top_k": 3})
        assert r.status_code == 200, r.text[:500]
        over_http = r.json()["predictions"]
        in_process = model.predict(pd.DataFrame(rows), params={"top_k": 3})
        assert [a["bag_id"] for a in over_http] == [b.slide_id for b in fitted.held_out]
        for got, want, bag in zip(over_http, in_process, fitted.held_out, strict=True):
            assert got["label"] == want["label"]
            for c in fitted.cv.classes:
                assert got["probabilities"][c] == pytest.approx(want["probabilities"][c], abs=1e-6)
            assert [t["index"] for t in got["top_instances"]["20x"]] == [
                t["index"] for t in want["top_instances"]["20x"]
            ]
            probs, _ = reference_answer(fitted, bag)
            assert got["probabilities"][fitted.cv.classes[1]] == pytest.approx(probs[1], abs=1e-5)
    assert requests.get(f"{server}/ping", timeout=5).status_code == 200


# --- slide-path input -----------------------------------------------------------------------


def test_slide_path_replays_the_recorded_tiles_and_extractor(
    served, tiny_cohort, monkeypatch, tmp_path
):
    """A slide sent by path gets the answer its pipeline-made feature cache gets."""
    from wsimil.config import FeaturesConfig, TilesConfig
    from wsimil.extract.cache import bag_path, read_bag
    from wsimil.extract.extractors import build_extractor
    from wsimil.extract.features import features_for_slide
    from wsimil.extract.replay import recorded_extraction
    from wsimil.extract.slide import SlideRef
    from wsimil.extract.tiles import tiles_for_slide

    cohort_dir, table = tiny_cohort
    root = served["root"] / "pipeline"
    row = table.iloc[0]
    ref = SlideRef(row["slide_id"], cohort_dir / row["path"])
    tiles_cfg = TilesConfig(tile_px=64, top_k=8, out_dir=root / "tiles")
    feats_cfg = FeaturesConfig(
        extractor="resnet18", weights="random", batch_size=16, num_workers=0, device="cpu"
    )
    sel, _ = tiles_for_slide(ref, tiles_cfg, tiles_cfg.out_dir)
    extractor = build_extractor(feats_cfg, tiles_cfg.tile_px)
    features_for_slide(ref, sel, extractor, feats_cfg, root / "features")
    extraction = recorded_extraction(root / "features", ("20x",))
    assert extraction["tile_px"] == 64 and extraction["weights"] == "random"

    fitted = fit_ensemble("dtfd", root / "model", d=extractor.dim, epochs=1)
    uri = publish(fitted.models_dir, "wsimil-test-slides", extraction)
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(ref.path, slides / "one.tiff")
    (slides / "junk.tiff").write_bytes(b"not a slide")
    monkeypatch.setenv(SLIDE_ROOT_ENV, str(slides))
    model = mlflow.pyfunc.load_model(uri)
    request = {"bag_id": ref.slide_id, "slide_path": "one.tiff"}  # the id seeds the 20x draw
    by_path = model.predict(pd.DataFrame([request]))[0]
    with pytest.raises(MlflowException, match="not a format OpenSlide reads") as info:
        model.predict(pd.DataFrame([{"slide_path": "junk.tiff"}]))
    assert info.value.get_http_status_code() == 400 and str(slides) not in info.value.message

    cached = read_bag(bag_path(root / "features", ref.slide_id, "20x"))
    by_features = model.predict(
        pd.DataFrame(
            [
                {
                    "features_20x": cached.features.tolist(),
                    "coords_20x": cached.coords.tolist(),
                    "grid_20x": cached.grid.tolist(),
                }
            ]
        )
    )[0]
    assert by_path["n_instances"] == {"20x": len(cached)} == {"20x": 8}
    for c in fitted.cv.classes:
        assert by_path["probabilities"][c] == pytest.approx(
            by_features["probabilities"][c], abs=1e-4
        )
    top = by_path["top_instances"]["20x"]
    assert [t["index"] for t in top] == [t["index"] for t in by_features["top_instances"]["20x"]]
    for t in top:  # positions come from the replayed tile selection
        assert (t["x"], t["y"]) == tuple(cached.coords[t["index"]])
        assert (t["col"], t["row"]) == tuple(cached.grid[t["index"]])
