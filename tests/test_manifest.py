"""The fold-ensemble manifest: one type, written by crossval, read by the registry and serving."""

from __future__ import annotations

import json

import pytest

from wsimil.config import ModelConfig
from wsimil.train.manifest import EnsembleError, Manifest

# ensemble.json as cross-validation wrote it before the Manifest type: the same keys, order
# and layout must keep coming out, and files like it must keep loading.
LEGACY = {
    "family": "dtfd",
    "model": ModelConfig().model_dump(mode="json"),
    "scales": ["20x"],
    "in_dims": [512],
    "classes": ["normal", "tumour"],
    "thresholds": [0.25, None, 0.5],
    "folds": [0, 1, 2],
    "cv": {"auc_mean": 0.75, "auc_std": 0.1},
    "parent_run_id": "0" * 32,
}


def models_dir(tmp_path, doc=LEGACY, folds=(0, 1, 2)):
    out = tmp_path / "models"
    out.mkdir(parents=True, exist_ok=True)
    for fold in folds:
        (out / f"fold{fold}.safetensors").write_bytes(b"")
    (out / "ensemble.json").write_text(json.dumps(doc, indent=1))
    return out


def test_round_trip_keeps_the_file_byte_for_byte(tmp_path):
    folder = models_dir(tmp_path)
    legacy_text = (folder / "ensemble.json").read_text()
    manifest = Manifest.read(folder)
    assert manifest.family == "dtfd" and manifest.scales == ("20x",)
    assert manifest.in_dims == (512,) and manifest.folds == (0, 1, 2)
    assert manifest.thresholds == (0.25, None, 0.5) and manifest.cv["auc_mean"] == 0.75
    assert manifest.fold_path(1) == folder / "fold1.safetensors"

    again = tmp_path / "again"
    again.mkdir()
    written = manifest.write(again)
    assert (again / "ensemble.json").read_text() == legacy_text
    assert list(json.loads(legacy_text)) == list(manifest.to_json())
    for fold in manifest.folds:
        (again / f"fold{fold}.safetensors").write_bytes(b"")
    assert Manifest.read(again) == manifest == written
    assert written.models_dir == again


def test_an_older_manifest_without_optional_keys_loads(tmp_path):
    doc = {k: v for k, v in LEGACY.items() if k not in {"thresholds", "cv", "parent_run_id"}}
    manifest = Manifest.read(models_dir(tmp_path, doc))
    assert manifest.thresholds == () and manifest.cv == {} and manifest.parent_run_id is None


def test_errors_name_the_file(tmp_path):
    with pytest.raises(EnsembleError, match=r"models/ensemble.json: no ensemble manifest; run"):
        Manifest.read(tmp_path / "models")
    doc = {k: v for k, v in LEGACY.items() if k not in {"scales", "classes"}}
    with pytest.raises(EnsembleError, match=r"ensemble.json: missing key\(s\) scales, classes"):
        Manifest.read(models_dir(tmp_path / "a", doc))
    with pytest.raises(EnsembleError, match="models: fold1.safetensors is listed but missing"):
        Manifest.read(models_dir(tmp_path / "b", folds=(0, 2)))
    folder = models_dir(tmp_path / "c", {**LEGACY, "in_dims": ["wide"]})
    with pytest.raises(EnsembleError, match=r"ensemble.json: bad value for 'in_dims'"):
        Manifest.read(folder)
    (folder / "ensemble.json").write_text("{not json")
    with pytest.raises(EnsembleError, match="ensemble.json: not valid JSON"):
        Manifest.read(folder)


def test_of_reads_a_folder_and_passes_a_manifest_through(tmp_path):
    manifest = Manifest.read(models_dir(tmp_path))
    assert Manifest.of(manifest) is manifest
    assert Manifest.of(tmp_path / "models") == manifest
