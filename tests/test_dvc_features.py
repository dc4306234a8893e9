"""DVC runs synth → tiles → features with the real CLI; push, wipe, pull restores the bytes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wsimil.config import FeaturesConfig, SynthConfig, TilesConfig

REPO = Path(__file__).resolve().parents[1]


def sh(cmd: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(cwd / ".prefect")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # DVC runs `python`
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.mark.slow
def test_dvc_stages_cache_push_and_pull_features_byte_identical(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for folder in ("wsimil", "flows"):
        shutil.copytree(
            REPO / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    # DVC needs every key a stage lists, so the sections are written out in full.
    params = {
        "synth": SynthConfig(n_slides=3, n_patients=2, width_px=1024, height_px=768),
        "tiles": TilesConfig(tile_px=64, top_k=8),
        "features": FeaturesConfig(extractor="resnet18", weights="random", batch_size=16,
                                   num_workers=1, concurrent_slides=2),
    }  # fmt: skip
    params = {k: v.model_dump(mode="json") for k, v in params.items()}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    sh(["git", "init", "-q"], project)
    sh(["dvc", "init", "-q"], project)
    sh(["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], project)

    out = sh(["dvc", "repro", "features"], project)
    assert "Running stage 'tiles'" in out and "Running stage 'features'" in out
    files = sorted((project / "data" / "features").rglob("*.h5"))
    assert len(files) == 6  # 3 slides x (10x, 20x)
    before = {f: f.read_bytes() for f in files}
    assert "Stage 'features' didn't change" in sh(["dvc", "repro", "features"], project)

    sh(["dvc", "push"], project)
    for path in (".dvc/cache", "data/features", "data/tiles"):
        shutil.rmtree(project / path)
    sh(["dvc", "pull", "tiles", "features"], project)
    assert {
        f: f.read_bytes() for f in sorted((project / "data" / "features").rglob("*.h5"))
    } == before
    assert "up to date" in sh(["dvc", "status", "features"], project)
