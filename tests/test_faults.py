"""The fault catalogue of issue 14, bad inputs part: each case fails in one actionable line.

Bad slide ids, CSVs, caches, labels and params. A CLI case asserts the message, the exit
code (2: a bad input file or params; 1: some slides failed, the cohort ran) and that
nothing changed outside the output folder. Damaged caches are recomputed or left out with
their path named, and a ``kill -9`` during extraction resumes to the same caches.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from projects import clean_env, wsimil_status

from wsimil.config import FeaturesConfig, TilesConfig
from wsimil.extract.cache import bag_path, read_bag, write_h5
from wsimil.extract.extractors import build_extractor
from wsimil.extract.features import features_for_slide
from wsimil.extract.ids import UnsafePathError, under
from wsimil.extract.slide import SlideError, SlideRef, read_slide_table
from wsimil.extract.tiles import read_selection, tiles_for_slide, tiles_path
from wsimil.train.bags import CohortError, load_bags, read_cohort
from wsimil.train.labels import LabelError, check_labels

# --- helpers --------------------------------------------------------------------------------


def files(folder: Path, *, outside: Path | None = None) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` (not under ``outside``): size and mtime."""
    out = {}
    for p in folder.rglob("*"):
        if p.is_file() and not (outside and p.is_relative_to(outside)):
            out[str(p.relative_to(folder))] = (p.stat().st_size, p.stat().st_mtime_ns)
    return out


def project_with(tmp_path: Path, params: dict, csv: bytes, csv_name: str = "slides.csv") -> Path:
    """``tmp_path/a/project`` with ``params`` and a table; a file beside it that must stay."""
    project = tmp_path / "a" / "project"
    project.mkdir(parents=True)
    (tmp_path / "a" / "neighbour.txt").write_text("not the project's\n")
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    (project / csv_name).parent.mkdir(parents=True, exist_ok=True)
    (project / csv_name).write_bytes(csv)
    return project


def one_line_failure(args: list[str], project: Path, code: int = 2) -> str:
    """Run the CLI, expect exit ``code`` with one ``error:`` line; check nothing was written.

    Returns the error line.
    """
    parent = project.parent.parent
    before = files(parent)
    done = wsimil_status(args, project, timeout=300)
    assert done.returncode == code, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    after = files(parent)
    # not one file was added or changed anywhere, inside the project or out of it
    assert {k: v for k, v in after.items() if ".prefect" not in k} == before
    return lines[0]


def damage(path: Path, how: str) -> None:
    """Damage an HDF5 cache in place, keeping its attributes (so provenance still matches)."""
    with h5py.File(path, "r+") as f:
        if how == "nan":
            rows = f["features"][()]
            rows[1] = np.nan
            f["features"][...] = rows
        elif how == "no-coords":
            del f["coords"]
        elif how == "dim":
            rows = f["features"][()]
            del f["features"]
            f["features"] = rows[:, : rows.shape[1] // 2]
        elif how == "no-density":
            del f["density_10x"]


def datasets(path: Path) -> dict[str, bytes]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()].tobytes() for k in f}


# --- 1. slide ids are file names ------------------------------------------------------------

SLIDES = {"tiles": {"slides_csv": "slides.csv", "tile_px": 64, "top_k": 4}}


@pytest.mark.parametrize("command", ["tiles", "features"])
def test_a_path_in_a_slide_id_is_refused_and_nothing_is_written_outside(tmp_path, command):
    csv = b"slide_id,path\ngood,slides/good.tiff\n../../../escape-tiles,slides/good.tiff\n"
    project = project_with(tmp_path, SLIDES, csv)
    error = one_line_failure([command], project)
    assert "slides.csv: line 3: slide_id '../../../escape-tiles' is not a safe file name" in error
    assert "letters, digits, '.', '_' and '-'" in error and "rename the slide" in error
    assert not list(tmp_path.rglob("escape-tiles*"))


def test_two_ids_that_name_the_same_file_are_an_error_naming_both(tmp_path):
    project = project_with(tmp_path, SLIDES, b"slide_id,path\na,x.tiff\nb,y.tiff\na ,z.tiff\n")
    error = one_line_failure(["tiles"], project)
    assert "slide_id repeated: 'a' and 'a ' (both 'a') on lines 2 and 4" in error


@pytest.mark.parametrize("name", ["..", "../x", "a/b", ".hidden", "", "a b", "x" * 300])
def test_output_paths_refuse_names_that_leave_their_folder(tmp_path, name):
    with pytest.raises(UnsafePathError, match="not a plain file name"):
        under(tmp_path, name, ".h5")
    with pytest.raises(UnsafePathError):
        tiles_path(tmp_path, name)
    with pytest.raises(UnsafePathError):
        bag_path(tmp_path, name, "20x")


def test_ordinary_slide_ids_are_accepted(tmp_path):
    for sid in ("TCGA-A1-A0SB-01Z-00-DX1.B34C2C1A", "tumor_001", "s.1"):
        assert tiles_path(tmp_path, sid) == tmp_path / f"{sid}.h5"
        assert bag_path(tmp_path, sid, "10x") == tmp_path / "10x" / f"{sid}.h5"


# --- 3. tables: one line with the file and the line -----------------------------------------

TABLE_CASES = {
    "empty": (b"", "slides.csv: empty file; it needs a header line"),
    "not-utf8": ("slide_id,path\na,a.tiff\nb\xe9,b.tiff\n".encode("latin1"),
                 "slides.csv: line 3, column 2: byte 0xe9 is not UTF-8; save the file as UTF-8"),
    "header-only": (b"slide_id,path\n", "slides.csv: header only, no rows; add one line"),
    "duplicate": (b"slide_id,path\na,a.tiff\nb,b.tiff\na,c.tiff\n",
                  "slides.csv: slide_id repeated: 'a' on lines 2 and 4"),
    "semicolons": (b"slide_id;path\na;a.tiff\n", "line 1 looks semicolon-separated"),
    "extra-field": (b"slide_id,path\na,a.tiff\nb,b,tiff\n",
                    "slides.csv: line 3 has 3 fields, the header 2; quote values"),
    "empty-path": (b"slide_id,path\na,a.tiff\n\nb,\n", "empty path on line(s) [4]"),
    "bad-mpp": (b"slide_id,path,mpp_override\na,a.tiff,0.5\nb,b.tiff,fast\n",
                "slides.csv: line 3: mpp_override 'fast' is not a positive number"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(TABLE_CASES))
def test_tiles_on_a_bad_slide_table_is_one_line(tmp_path, case):
    csv, expected = TABLE_CASES[case]
    project = project_with(tmp_path, SLIDES, csv)
    error = one_line_failure(["tiles"], project)
    assert expected in error and str(project / "slides.csv") in error


SPLITS = {"crossval": {"cohort_csv": "cohort.csv", "n_folds": 2, "val_folds": 2}}
COHORT_CASES = {
    "empty": (b"", "cohort.csv: empty file; it needs a header line (slide_id, patient_id, label)"),
    "not-utf8": (b"slide_id,patient_id,label\na,p1,tum\xf6r\n", "line 2, column 9: byte 0xf6"),
    "no-patient": (b"slide_id,label\na,x\nb,y\n", "missing column(s) ['patient_id']"),
    "empty-label": (b"slide_id,patient_id,label\na,p1,x\nb,p2,\nc,p3,y\n",
                    "cohort.csv: empty label on line(s) [3]; fill it in or remove the row"),
    "duplicate": (b"slide_id,patient_id,label\na,p1,x\na,p2,y\n",
                  "cohort.csv: slide_id repeated: 'a' on lines 2 and 3"),
    "header-only": (b"slide_id,patient_id,label\n", "cohort.csv: header only, no rows"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(COHORT_CASES))
def test_splits_on_a_bad_cohort_table_is_one_line(tmp_path, case):
    csv, expected = COHORT_CASES[case]
    project = project_with(tmp_path, SPLITS, csv, "cohort.csv")
    assert expected in one_line_failure(["splits"], project)


def test_the_readers_raise_their_own_errors(tmp_path):
    csv = tmp_path / "slides.csv"
    csv.write_bytes(b"")
    with pytest.raises(SlideError, match="empty file"):
        read_slide_table(csv)
    with pytest.raises(CohortError, match="empty file"):
        read_cohort(csv)
    csv.write_bytes(b"slide_id,patient_id,label,mask_downsample\nNA,p1,None,16\nb,p2,x,NaN\n")
    table = read_cohort(csv)  # an id or a label "NA" or "None" is text; NaN is missing
    assert table["slide_id"].tolist() == ["NA", "b"] and table["label"].tolist() == ["None", "x"]
    assert table["mask_downsample"].isna().tolist() == [False, True]


# --- 4. labels --------------------------------------------------------------------------------


def cohort_bytes(counts: dict[str, int]) -> bytes:
    rows = [(f"s{i}", f"p{i}", label) for label, n in counts.items() for i in range(n)]
    rows = [(f"{sid}-{label}", f"{pid}-{label}", label) for sid, pid, label in rows]
    return (
        pd.DataFrame(rows, columns=["slide_id", "patient_id", "label"]).to_csv(index=False).encode()
    )


TYPO = {"normal": 6, "tumour": 5, "tumor": 7}


def test_a_label_outside_the_declared_classes_is_an_error_listing_the_counts(tmp_path):
    params = {"crossval": {**SPLITS["crossval"], "classes": ["normal", "tumour"]}}
    project = project_with(tmp_path, params, cohort_bytes(TYPO), "cohort.csv")
    error = one_line_failure(["splits"], project)
    assert "cohort.csv: label 'tumor' on line(s) [13, 14, 15, 16, 17]" in error
    assert (
        "is not one of the classes ['normal', 'tumour'] (params.yaml → crossval.classes)" in error
    )
    assert "(did you mean 'tumour'?)" in error
    assert "slides per label: normal 6, tumor 7, tumour 5" in error


def test_the_synthetic_cohort_declares_its_classes(tmp_path):
    params = {
        "synth": {"out_dir": "data/demo"},
        "crossval": {"cohort_csv": "data/demo/slides.csv", "n_folds": 2, "val_folds": 2},
    }
    project = project_with(tmp_path, params, cohort_bytes(TYPO), "data/demo/slides.csv")
    error = one_line_failure(["splits"], project)
    assert "not one of the classes ['normal', 'tumour'] (the synthetic cohort" in error


def test_without_a_declaration_lookalike_and_tiny_classes_are_warned_about(tmp_path):
    project = project_with(tmp_path, SPLITS, cohort_bytes({**TYPO, "rare": 2}), "cohort.csv")
    done = wsimil_status(["splits"], project, timeout=300)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert any("labels 'tumor' (7 slides) and 'tumour' (5 slides) look alike" in w
               for w in warnings)  # fmt: skip
    assert any("label 'rare' has only 2 slide(s)" in w for w in warnings)
    assert all("crossval.classes" in w for w in warnings) and len(warnings) == 2
    assert (project / "data" / "splits.json").is_file()


def test_check_labels_accepts_a_declared_cohort(tmp_path):
    csv = tmp_path / "c.csv"
    csv.write_bytes(cohort_bytes({"normal": 4, "tumour": 4}))
    table = read_cohort(csv)
    assert check_labels(table, csv, ["normal", "tumour"], source="x", n_folds=2) == []
    assert check_labels(table, csv, None, source="", n_folds=2) == []
    assert (
        "'other' (x) has no slide"
        in check_labels(table, csv, ["normal", "tumour", "other"], source="x", n_folds=2)[0]
    )
    with pytest.raises(LabelError, match="slides per label: normal 4, tumour 4"):
        check_labels(table, csv, ["normal", "other"], source="x", n_folds=2)


# --- 5. params --------------------------------------------------------------------------------


def test_bad_yaml_in_set_is_one_line(tmp_path):
    project = project_with(tmp_path, SPLITS, cohort_bytes({"a": 3, "b": 3}), "cohort.csv")
    error = one_line_failure(["splits", "-S", "train.dtfd.lr=[1,"], project)
    assert "--set 'train.dtfd.lr=[1,': '[1,' is not valid YAML" in error
    assert "give a YAML value" in error


def test_an_empty_params_file_is_refused(tmp_path):
    project = project_with(tmp_path, SPLITS, cohort_bytes({"a": 3, "b": 3}), "cohort.csv")
    (project / "params.yaml").write_text("# nothing here yet\n")
    error = one_line_failure(["splits"], project)
    assert "params.yaml: empty (no sections); restore it, or write `{}`" in error
    (project / "params.yaml").write_text("{}\n")  # every default, on purpose
    assert wsimil_status(["doctor"], project, timeout=300).returncode == 0


# --- 2. damaged caches ------------------------------------------------------------------------


def fcfg() -> FeaturesConfig:
    return FeaturesConfig(extractor="resnet18", weights="random", num_workers=0, batch_size=16)


@pytest.fixture(scope="module")
def one_slide(tiny_cohort, tmp_path_factory):
    """A slide's tiles and features, computed once; tests damage copies."""
    out, table = tiny_cohort
    ref = SlideRef("s0", out / table.path[0])
    root = tmp_path_factory.mktemp("one")
    sel, _ = tiles_for_slide(ref, TilesConfig(tile_px=64, top_k=6), root / "tiles")
    extractor = build_extractor(fcfg(), tile_px=64)
    features_for_slide(ref, sel, extractor, fcfg(), root / "features")
    return ref, sel, extractor, root


@pytest.mark.parametrize(
    ("scale", "how", "defect"),
    [
        ("10x", "nan", "1 of 6 feature rows are not finite (NaN or inf)"),
        ("20x", "no-coords", "no 'coords' dataset"),
        ("10x", "dim", "features are (6, 256), expected (6, 512)"),
    ],
)
def test_a_damaged_cache_is_recomputed_not_up_to_date(one_slide, tmp_path, scale, how, defect):
    ref, sel, extractor, root = one_slide
    features = tmp_path / "features"
    shutil.copytree(root / "features", features)
    path = bag_path(features, "s0", scale)
    good = datasets(path)
    damage(path, how)
    result = features_for_slide(ref, sel, extractor, fcfg(), features)
    assert not result.skipped
    assert result.repaired == f"slide s0: damaged cache recomputed ({path}: {defect})"
    assert datasets(path) == good  # the same bytes as before the damage
    assert features_for_slide(ref, sel, extractor, fcfg(), features).skipped


def test_a_damaged_tiles_cache_is_selected_again(one_slide, tmp_path, caplog):
    ref, sel, _, root = one_slide
    shutil.copytree(root / "tiles", tmp_path / "tiles")
    path = tiles_path(tmp_path / "tiles", "s0")
    damage(path, "no-density")
    again, cached = tiles_for_slide(ref, TilesConfig(tile_px=64, top_k=6), tmp_path / "tiles")
    assert not cached and "(no 'density_10x' dataset); selecting again" in caplog.text
    np.testing.assert_array_equal(read_selection(path).density, sel.density)


def write_bag(path: Path, features: np.ndarray, **attrs) -> None:
    n = len(features)
    data = {"features": features.astype(np.float32), "coords": np.arange(2 * n).reshape(n, 2)}
    write_h5(path, data, {"tile_size_level0": 64.0, **attrs})


def test_bad_bags_are_left_out_with_their_path_and_defect(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(6)]
    table = pd.DataFrame({"slide_id": ids, "patient_id": ids, "label": ["a", "b"] * 3})
    root = tmp_path / "features"
    for sid in ids:  # ours: wsimil writes code_version
        write_bag(bag_path(root, sid, "20x"), rng.normal(size=(4, 8)), code_version="0.1+x")
    nan = rng.normal(size=(4, 8))
    nan[2, 3] = np.nan
    write_bag(bag_path(root, "s1", "20x"), nan, code_version="0.1+x")
    write_bag(bag_path(root, "s2", "20x"), rng.normal(size=(4, 5)), code_version="0.1+x")
    write_bag(bag_path(root, "s3", "20x"), nan)  # a CLAM/TRIDENT file: no code_version
    with h5py.File(bag_path(root, "s4", "20x"), "r+") as f:
        del f["coords"]
    bags, failed = load_bags(table, root, ("20x",), ["a", "b"])
    assert sorted(bags) == ["s0", "s5"]
    p = {sid: bag_path(root, sid, "20x") for sid in ids}
    assert failed["s1"] == (
        f"{p['s1']}: 1 of 4 feature rows are not finite (NaN or inf); "
        "run `wsimil features` to recompute it"
    )
    assert failed["s2"].startswith(f"{p['s2']}: 5-D features, but 2 of the 3 bags are 8-D")
    assert failed["s3"].startswith(f"{p['s3']}: 1 of 4 feature rows are not finite")
    assert "not written by wsimil: re-extract it with the tool that made it" in failed["s3"]
    assert failed["s4"] == f"{p['s4']}: no 'coords' dataset; not a feature bag"
    assert read_bag(p["s0"]).features.shape == (4, 8)


# --- end to end: the CLI on a real tiny project ---------------------------------------------


def copy_project(tiny_project: Path, dest: Path) -> Path:
    ignore = shutil.ignore_patterns(".prefect", "mlruns.db", "mlruns", "results")
    shutil.copytree(tiny_project, dest, ignore=ignore)
    return dest


def feature_files(project: Path) -> list[Path]:
    return sorted((project / "data" / "features" / "resnet18").rglob("*.h5"))


@pytest.mark.slow
def test_features_recomputes_damaged_caches_and_says_so(tiny_project, tmp_path):
    project = copy_project(tiny_project, tmp_path / "project")
    features = project / "data" / "features" / "resnet18"
    damaged = {
        "synth-000": ("10x", "nan", "1 of 8 feature rows are not finite"),
        "synth-001": ("20x", "no-coords", "no 'coords' dataset"),
        "synth-002": ("20x", "dim", "features are (8, 256), expected (8, 512)"),
    }
    for sid, (scale, how, _) in damaged.items():
        damage(bag_path(features, sid, scale), how)
    done = wsimil_status(["features"], project, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "8 slides, 3 computed, 5 up to date, 0 failed" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    for sid, (scale, _, defect) in damaged.items():
        line = next(w for w in warnings if w.startswith(f"warning: slide {sid}: damaged cache"))
        assert f"{bag_path(features, sid, scale)}: {defect}" in line
    assert "Traceback" not in done.stderr
    report = pd.read_csv(project / "reports" / "features.csv").set_index("slide_id")
    assert report.loc[list(damaged), "note"].str.contains("damaged cache recomputed").all()
    for path in feature_files(project):  # the same bytes as the undamaged project's
        assert datasets(path) == datasets(tiny_project / path.relative_to(project))


@pytest.mark.slow
def test_crossval_leaves_out_bad_bags_with_a_warning(tiny_project, tmp_path):
    project = copy_project(tiny_project, tmp_path / "project")
    features = project / "data" / "features" / "resnet18"
    table = pd.read_csv(project / "data" / "cohort" / "slides.csv")
    first = table.groupby("label")["slide_id"].first()  # one slide of each class
    nan_id, dim_id = first["normal"], first["tumour"]
    damage(bag_path(features, nan_id, "20x"), "nan")
    damage(bag_path(features, dim_id, "20x"), "dim")
    done = wsimil_status(["crossval", "-m", "abmil"], project, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert f"warning: slide {nan_id} left out of cross-validation: " + str(
        bag_path(features, nan_id, "20x")
    ) + ": 1 of 8 feature rows are not finite (NaN or inf)" in "\n".join(warnings)
    assert any(w.startswith(f"warning: slide {dim_id} left out") and "256-D features" in w
               for w in warnings)  # fmt: skip
    assert "abmil: ACC" in done.stdout


def _wait_for(predicate, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"`wsimil features` exited {proc.returncode} before the kill")
        if time.monotonic() > deadline:
            raise AssertionError(f"no cache file after {timeout:.0f} s")
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_during_extraction_then_rerun_gives_the_uninterrupted_caches(tiny_project, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(tiny_project / "params.yaml", project)
    shutil.copytree(tiny_project / "data" / "cohort", project / "data" / "cohort")
    cmd = [sys.executable, "-m", "wsimil", "features", "--params", str(project / "params.yaml")]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=project, env=clean_env(project), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            _wait_for(lambda: bool(feature_files(project)), proc, timeout=300)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its Prefect server, its readers
            proc.wait(timeout=60)
    n_at_kill = len(feature_files(project))
    assert 0 < n_at_kill < 16, "the kill came after the run was over"

    done = wsimil_status(["features"], project, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "8 slides," in done.stdout and "0 failed" in done.stdout
    expected = feature_files(tiny_project)
    assert [p.relative_to(project) for p in feature_files(project)] == [
        p.relative_to(tiny_project) for p in expected
    ]
    for path in expected:
        assert datasets(project / path.relative_to(tiny_project)) == datasets(path)
    for path in sorted((tiny_project / "data" / "tiles").glob("*.h5")):
        assert datasets(project / path.relative_to(tiny_project)) == datasets(path)
    leftovers = [p.name for p in (project / "data").rglob(".*.tmp")]
    assert leftovers == [], "temporaries of the killed run are left in the caches"
