"""Registering a fold ensemble: aliases, the champion gate, tags, card and pinned requirements."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import math
import shutil
import sys

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from serving import fit_ensemble, isolated_store

from wsimil.registry import (
    SERVING_PACKAGES,
    RegistryError,
    canonical_name,
    register,
    serving_requirements,
    takes_champion,
)


@pytest.mark.parametrize(
    "new, champion, margin, expected",
    [
        (0.80, None, 0.0, True),  # no champion yet
        (0.80, 0.70, 0.05, True),  # better by more than the margin
        (0.74, 0.70, 0.05, False),  # better, but within the margin
        (0.70, 0.70, 0.0, False),  # a tie does not beat
        (0.60, 0.70, 0.0, False),  # worse
        (math.nan, None, 0.0, False),  # no AUC: never champion
        (0.60, math.nan, 0.0, True),  # a champion without AUC yields
    ],
)
def test_champion_rule(new, champion, margin, expected):
    assert takes_champion(new, champion, margin) is expected


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    with isolated_store(root):
        yield root


def with_auc(models_dir, dest, auc):
    """A copy of a models folder whose recorded CV AUC is ``auc`` (what the gate reads)."""
    shutil.copytree(models_dir, dest)
    doc = json.loads((dest / "ensemble.json").read_text())
    doc["cv"]["auc_mean"] = auc
    (dest / "ensemble.json").write_text(json.dumps(doc))
    return dest


def test_champion_moves_only_on_a_better_cv_auc(store, repo_root):
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

    def publish(models_dir):
        return register(
            models_dir,
            name,
            experiment="wsimil-test",
            extraction=extraction,
            champion_margin=0.05,
            lineage={"git_commit": "fallback", "data_version": "fallback"},
            extra_tags={"n_slides": "18"},
        )

    client = MlflowClient()
    first = publish(with_auc(fitted.models_dir, store / "v1", 0.70))
    assert client.get_registered_model(name).aliases == {"champion": 1, "challenger": 1}
    assert first["champion"]["moved"] and first["aliases"] == {"champion": 1, "challenger": 1}

    worse = publish(with_auc(fitted.models_dir, store / "v2", 0.60))
    assert not worse["champion"]["moved"]
    assert client.get_registered_model(name).aliases == {"champion": 1, "challenger": 2}

    within_margin = publish(with_auc(fitted.models_dir, store / "v3", 0.74))
    assert not within_margin["champion"]["moved"]
    assert client.get_registered_model(name).aliases == {"champion": 1, "challenger": 3}

    better = publish(with_auc(fitted.models_dir, store / "v4", 0.76))
    assert better["champion"] == {
        "moved": True, "previous": 1, "previous_cv_auc_mean": 0.70, "margin": 0.05
    }  # fmt: skip
    assert client.get_registered_model(name).aliases == {"champion": 4, "challenger": 4}

    v4 = client.get_model_version(name, "4")
    tags = v4.tags
    assert float(tags["cv_auc_mean"]) == pytest.approx(0.76)
    assert tags["data_version"] == "md5-of-features"  # from the source run, not the fallback
    assert tags["git_commit"] == "a" * 40
    assert tags["extractor"] == "resnet18" and tags["extractor_weights"] == "random"
    assert tags["source_run_id"] == source.info.run_id and tags["n_slides"] == "18"
    card = v4.description
    threshold = sum(doc["thresholds"]) / len(doc["thresholds"])
    for part in ("## Data", "## Metrics", "## Intended use", "## Limits", f"{threshold:.4f}"):
        assert part in card
    assert "random weights" in card
    assert "| AUC | 0.760 |" in card


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
    todo, seen, third_party = ["wsimil.serve_entry"], set(), set()
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
    assert "wsimil.slide_bag" in seen and "wsimil.extractors" in seen  # slide input is covered
    dists = importlib.metadata.packages_distributions()
    needed = {canonical_name(d) for top in third_party for d in dists[top]}
    pinned = {canonical_name(p) for p in SERVING_PACKAGES}
    assert needed <= pinned, f"imported by the served code but not pinned: {needed - pinned}"


def test_carried_state_dict_weights_become_safetensors_and_embed_the_same(tmp_path):
    """A torch.save'd extractor state dict ships as safetensors and gives the same features."""
    import timm
    import torch

    from wsimil.config import FeaturesConfig
    from wsimil.extractors import build_extractor
    from wsimil.registry import make_bundle
    from wsimil.slide_bag import ExtractionError, build_recorded_extractor

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
    from wsimil.cache import write_h5
    from wsimil.slide_bag import ExtractionError, recorded_extraction

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
