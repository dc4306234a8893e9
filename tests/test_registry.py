"""Registering a fold ensemble: aliases, the champion gate, tags, card and pinned requirements."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import shutil
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from serving import fit_ensemble, isolated_store
from sklearn.metrics import roc_auc_score

from wsimil.config import ChampionGateConfig
from wsimil.serve.registry import (
    SERVING_PACKAGES,
    RegistryError,
    canonical_name,
    register,
    serving_requirements,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    with isolated_store(root):
        yield root


def scored(fitted, dest, p_tumour=None, swap=()):
    """A copy of the cross-validation folder (``models/`` + ``report/predictions.csv``).

    ``p_tumour`` replaces the pooled test predictions (one per slide ``s<i>``, by ``i``);
    ``swap`` names two slides whose test folds trade places. ensemble.json's CV AUC is set
    to the mean fold AUC of the result, as cross-validation would have recorded it.
    """
    shutil.copytree(fitted.models_dir, dest / "models")
    preds = pd.concat([f.predictions for f in fitted.cv.folds], ignore_index=True)
    if p_tumour is not None:
        index = preds["slide_id"].str[1:].astype(int)
        preds["p_tumour"] = np.asarray(p_tumour)[index]
        preds["p_normal"] = 1 - preds["p_tumour"]
    if swap:
        a, b = (preds.index[preds["slide_id"] == s][0] for s in swap)
        preds.loc[[a, b], "fold"] = preds.loc[[b, a], "fold"].to_numpy()
    (dest / "report").mkdir()
    preds.to_csv(dest / "report" / "predictions.csv", index=False)
    doc = json.loads((dest / "models" / "ensemble.json").read_text())
    fold_aucs = [
        roc_auc_score(g["label"] == "tumour", g["p_tumour"]) for _, g in preds.groupby("fold")
    ]
    doc["cv"]["auc_mean"] = float(np.mean(fold_aucs))
    (dest / "models" / "ensemble.json").write_text(json.dumps(doc))
    return dest / "models"


def test_champion_moves_only_on_a_paired_gain_beyond_noise(store, repo_root):
    fitted = fit_ensemble("abmil", store / "abmil", epochs=1)
    with mlflow.start_run(run_name="cv") as source:  # stands for the cross-validation run
        mlflow.set_tags({"data_version": "md5-of-features", "git_commit": "a" * 40})
    doc = json.loads((fitted.models_dir / "ensemble.json").read_text())
    doc["parent_run_id"] = source.info.run_id
    (fitted.models_dir / "ensemble.json").write_text(json.dumps(doc))
    extraction = {
        "extractor": "resnet18", "weights": "random", "weights_sha256": "", "init_seed": 0,
        "tile_px": 128, "top_k": 48, "density_threshold": 200, "min_density": 0.0, "seed": 0,
        "input_px": 0, "feature_dim": 12, "weights_path": "",
    }  # fmt: skip
    name = "wsimil-test-gate"
    gate = ChampionGateConfig(test="bootstrap", confidence=0.95, resamples=500)

    def publish(models_dir):
        return register(
            models_dir,
            name,
            experiment="wsimil-test",
            extraction=extraction,
            champion_margin=0.0,
            champion_gate=gate,
            lineage={"git_commit": "fallback", "data_version": "fallback"},
            extra_tags={"n_slides": "18"},
        )

    client = MlflowClient()
    tags_of = lambda v: client.get_model_version(name, v).tags  # noqa: E731
    cv_auc = lambda v: float(tags_of(v)["cv_auc_mean"])  # noqa: E731
    ci = lambda v: tuple(float(tags_of(v)[f"champion_gate_ci_{e}"]) for e in ("low", "high"))  # noqa: E731
    y = np.arange(18) % 2  # make_bags: slide s<i> is tumour when i is odd
    weak = 1 / (1 + np.exp(-(0.4 * (2 * y - 1) + np.random.default_rng(3).normal(size=18))))
    champion = scored(fitted, store / "v1", weak)
    first = publish(champion)
    assert first["champion"]["moved"] and first["champion"]["decision"] == "first champion"
    assert client.get_registered_model(name).aliases == {"champion": 1, "challenger": 1}

    # (a) The same fold ensemble again: a zero difference, and the alias stays.
    same = publish(champion)
    assert not same["champion"]["moved"] and same["champion"]["decision"] == "stayed"
    assert same["champion"]["comparison"]["diff"] == 0.0
    assert float(tags_of("2")["champion_gate_diff"]) == 0.0
    assert ci("2") == (0.0, 0.0)
    assert client.get_registered_model(name).aliases == {"champion": 1, "challenger": 2}

    # (c) A higher mean CV AUC, by noise: the old mean-beats rule would have moved it.
    noise = np.clip(weak + np.random.default_rng(117).normal(scale=0.15, size=18), 0.01, 0.99)
    lucky = publish(scored(fitted, store / "v3", noise))
    assert cv_auc("3") > cv_auc("1")
    assert ci("3")[0] < 0 < ci("3")[1]  # the interval straddles 0
    assert not lucky["champion"]["moved"] and lucky["champion"]["decision"] == "stayed"
    assert lucky["champion"]["reason"].startswith("champion stays version 1: pooled test AUC")
    assert "does not exceed margin 0.0" in lucky["champion"]["reason"]
    assert client.get_registered_model(name).aliases == {"champion": 1, "challenger": 3}

    # (d) Clearly better, but scored on other test folds: not compared, the champion stays.
    perfect = np.where(y == 1, 0.7, 0.3) + np.linspace(0, 0.05, 18)
    elsewhere = publish(scored(fitted, store / "v4", perfect, swap=("s0", "s2")))
    assert elsewhere["champion"]["decision"] == "not compared"
    assert "scored on other test folds" in elsewhere["champion"]["reason"]
    assert tags_of("4")["test_folds_sha256"] != tags_of("1")["test_folds_sha256"]
    assert "champion_gate_diff" not in tags_of("4")
    assert client.get_registered_model(name).aliases == {"champion": 1, "challenger": 4}

    # (b) Clearly better on the same folds: it takes champion, and the tags hold the CI.
    better = publish(scored(fitted, store / "v5", perfect))
    assert better["champion"]["moved"] and better["champion"]["decision"] == "moved"
    assert client.get_registered_model(name).aliases == {"champion": 5, "challenger": 5}
    v5 = client.get_model_version(name, "5")
    tags = v5.tags
    low, high = ci("5")
    assert 0 < low < float(tags["champion_gate_diff"]) < high
    assert tags["champion_gate_vs_version"] == "1" and tags["champion_gate_confidence"] == "0.95"
    assert tags["champion_gate_test"] == "bootstrap" and tags["champion_gate_n"] == "18"
    assert "500 label-stratified slide resamples" in tags["champion_gate_rule"]
    assert (
        tags["test_folds_sha256"] == client.get_model_version(name, "1").tags["test_folds_sha256"]
    )
    assert better["champion"]["comparison"]["low"] == pytest.approx(low, abs=1e-6)

    assert float(tags["cv_auc_mean"]) == pytest.approx(1.0)
    assert tags["data_version"] == "md5-of-features"  # from the source run, not the fallback
    assert tags["git_commit"] == "a" * 40
    assert tags["extractor"] == "resnet18" and tags["extractor_weights"] == "random"
    assert tags["source_run_id"] == source.info.run_id and tags["n_slides"] == "18"
    card = v5.description
    threshold = sum(doc["thresholds"]) / len(doc["thresholds"])
    for part in ("## Data", "## Metrics", "## Intended use", "## Limits", f"{threshold:.4f}"):
        assert part in card
    assert "random weights" in card
    assert "| AUC | 1.000 |" in card
    assert "## Champion gate" in card and better["champion"]["reason"] in card


def test_predictions_of_another_run_are_refused(store):
    """Predictions beside models/ that do not give its recorded CV AUC are not evidence."""
    fitted = fit_ensemble("abmil", store / "stale", epochs=1)
    models = scored(fitted, store / "stale-copy", np.linspace(0, 1, 18))
    doc = json.loads((models / "ensemble.json").read_text())
    doc["cv"]["auc_mean"] -= 0.1
    (models / "ensemble.json").write_text(json.dumps(doc))
    with pytest.raises(RegistryError, match="does not match .*ensemble.json.*re-run `wsimil tune`"):
        register(
            models, "wsimil-test-stale", experiment="wsimil-test", extraction=None,
            champion_margin=0.0, lineage={},
        )  # fmt: skip


def test_requirements_are_pinned_from_the_lock(tmp_path, repo_root):
    pins = serving_requirements(repo_root / "requirements.lock")
    assert all("==" in p for p in pins) and len(pins) == len(SERVING_PACKAGES)
    for pin in pins:  # the lock is what is installed here
        name, version = pin.split("==")
        assert importlib.metadata.version(name) == version
    lock = tmp_path / "requirements.lock"
    lock.write_text("torch==2.15.0\n    # via x\n")
    with pytest.raises(RegistryError, match="no pin for mlflow"):
        serving_requirements(lock)


def _imports(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_requirements_cover_every_import_of_the_served_code(repo_root):
    """Follow wsimil imports from the entry file; every third-party one must be pinned."""
    todo, seen, third_party = ["wsimil.serve.entry"], set(), set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = repo_root / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = repo_root / module.replace(".", "/") / "__init__.py"
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "wsimil":
                todo.append(name)
            elif top not in sys.stdlib_module_names and top != "__future__":
                third_party.add(top)
    assert (
        "wsimil.extract.replay" in seen and "wsimil.extract.extractors" in seen
    )  # slide input is covered
    dists = importlib.metadata.packages_distributions()
    # MahmoodLab's conch (the CONCH recipe) is not in the lock: its error names the install
    assert {top for top in third_party if top not in dists} <= {"conch"}
    needed = {canonical_name(d) for top in third_party for d in dists.get(top, ())}
    pinned = {canonical_name(p) for p in SERVING_PACKAGES}
    assert needed <= pinned, f"imported by the served code but not pinned: {needed - pinned}"


def test_carried_state_dict_weights_become_safetensors_and_embed_the_same(tmp_path):
    """A torch.save'd extractor state dict ships as safetensors and gives the same features."""
    import timm
    import torch

    from wsimil.config import FeaturesConfig
    from wsimil.extract.extractors import build_extractor
    from wsimil.extract.replay import ExtractionError, build_recorded_extractor
    from wsimil.serve.registry import make_bundle

    fitted = fit_ensemble("abmil", tmp_path / "abmil", epochs=1)  # any models folder
    torch.manual_seed(3)
    weights = tmp_path / "my-resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), weights)
    original = build_extractor(
        FeaturesConfig(extractor="resnet18", weights=str(weights), device="cpu"), 64
    )
    extraction = {
        **original.provenance(),
        "weights_path": str(weights),
        "tile_px": 64, "top_k": 8, "density_threshold": 200, "min_density": 0.0, "seed": 0,
        "input_px": 0, "feature_dim": original.dim,
    }  # fmt: skip
    bundle = make_bundle(fitted.models_dir, extraction, tmp_path / "bundle", carry=True)
    record = json.loads((bundle / "extraction.json").read_text())
    assert record["weights_file"] == "extractor/my-resnet18.safetensors"
    assert "weights_path" not in record  # a path of the registering machine
    assert not list(bundle.rglob("*.pth"))
    carried = build_recorded_extractor(record, bundle / record["weights_file"], "cpu")
    tiles = torch.randint(0, 255, (4, 3, 64, 64), dtype=torch.uint8)
    assert torch.equal(carried(tiles), original(tiles))

    other = dict(extraction, weights_sha256="0" * 64)
    with pytest.raises(RegistryError, match="changed since the features were made"):
        make_bundle(fitted.models_dir, other, tmp_path / "bundle2", carry=True)
    wrong = dict(record, weights_file_sha256="0" * 64)
    with pytest.raises(ExtractionError, match="differs from the recorded"):
        build_recorded_extractor(wrong, bundle / record["weights_file"], "cpu")
    bare = make_bundle(fitted.models_dir, extraction, tmp_path / "bundle3", carry=False)
    record = json.loads((bare / "extraction.json").read_text())
    assert record["weights_file"] is None and not (bare / "extractor").exists()
    with pytest.raises(ExtractionError, match="needs its weight file"):
        build_recorded_extractor(record, None, "cpu")


def test_recorded_extraction_needs_caches_that_agree(tmp_path):
    from wsimil.extract.cache import write_h5
    from wsimil.extract.replay import ExtractionError, recorded_extraction

    attrs = {
        "extractor": "resnet18", "weights": "random", "weights_sha256": "", "weights_path": "",
        "init_seed": 0, "input_px": 0, "tile_px": 128, "top_k": 48, "density_threshold": 200,
        "min_density": 0.0, "seed": 0, "feature_dim": 512, "slide_id": "a",
    }  # fmt: skip
    data = {"features": np.zeros((2, 512), np.float32), "coords": np.zeros((2, 2), np.int64)}
    with pytest.raises(ExtractionError, match="no feature caches"):
        recorded_extraction(tmp_path, ("20x",))
    write_h5(tmp_path / "20x" / "a.h5", data, attrs)
    write_h5(tmp_path / "20x" / "b.h5", data, {**attrs, "slide_id": "b"})
    got = recorded_extraction(tmp_path, ("20x",))
    assert got["tile_px"] == 128 and got["extractor"] == "resnet18" and "slide_id" not in got
    write_h5(tmp_path / "20x" / "c.h5", data, {**attrs, "top_k": 200})
    with pytest.raises(ExtractionError, match="different top_k"):
        recorded_extraction(tmp_path, ("20x",))
