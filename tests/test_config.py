"""params.yaml validation: unknown keys and bad values fail with the file and key named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wsimil.config import ConfigError, Params, load_params


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_repository_params_are_valid(repo_root):
    params = load_params(repo_root / "params.yaml")
    assert isinstance(params, Params)


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    p = write(tmp_path, "synth:\n  seeed: 3\n")
    with pytest.raises(ConfigError) as err:
        load_params(p)
    msg = str(err.value)
    assert str(p) in msg and "synth.seeed" in msg and "did you mean 'seed'" in msg


def test_unknown_section_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_params(write(tmp_path, "trian:\n  epochs: 3\n"))


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, "synth:\n  n_slides: many\n"))
    assert "synth.n_slides" in str(err.value) and "'many'" in str(err.value)


def test_out_of_range_value(tmp_path):
    with pytest.raises(ConfigError, match="synth.tumour_share"):
        load_params(write(tmp_path, "synth:\n  tumour_share: 1.5\n"))


def test_cross_field_check(tmp_path):
    with pytest.raises(ConfigError, match="n_patients"):
        load_params(write(tmp_path, "synth:\n  n_slides: 4\n  n_patients: 9\n"))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+: [^\n]*$"):
        load_params(write(tmp_path, "synth:\n  seed: [1,\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(write(tmp_path, "- 1\n- 2\n"))


def test_empty_file_takes_defaults(tmp_path):
    assert load_params(write(tmp_path, "")) == Params()


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wsimil", *args], cwd=cwd, capture_output=True, text=True
    )


def test_cli_bad_params_one_line_nonzero_nothing_written(tmp_path):
    write(tmp_path, "synth:\n  out_dir: cohort\n  lamda: 1\n")
    res = run_cli("synth", cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "params.yaml" in lines[0] and "synth.lamda" in lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "cohort").exists()


def test_cli_missing_params(tmp_path):
    res = run_cli("synth", cwd=tmp_path)
    assert res.returncode == 2 and "no such params file" in res.stderr


def test_cli_help_lists_stage_commands(tmp_path):
    res = run_cli("--help", cwd=tmp_path)
    assert res.returncode == 0
    for command in ("synth", "doctor"):
        assert command in res.stdout


def test_under_makes_every_project_path_absolute(tmp_path):
    from wsimil.config import as_written

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "encoder.pt").write_bytes(b"")
    params = load_params(
        write(
            tmp_path,
            "features:\n  extractor: models/encoder.pt\n  weights: pretrained\n"
            "registry:\n  out_dir: /elsewhere/register\n",
        )  # fmt: skip
    )
    under = params.under(tmp_path)
    assert under.crossval.cohort_csv == tmp_path / "data" / "demo" / "slides.csv"
    assert under.tiles.report == tmp_path / "reports" / "tiles.csv"
    assert under.tune.out_dir == tmp_path / "results" / "tune"
    assert under.registry.out_dir == Path("/elsewhere/register")  # absolute: kept
    assert under.features.extractor == str(tmp_path / "models" / "encoder.pt")  # a file
    assert under.features.weights == "pretrained"  # a name, not a file here
    assert under.model == params.model and under.serve == params.serve
    assert as_written(under.features.extractor, tmp_path) == "models/encoder.pt"
    assert as_written(under.features.weights, tmp_path) == "pretrained"


def test_cli_models_lists_every_family_with_its_facts(tmp_path):
    from wsimil.models import MODELS

    write(tmp_path, "model:\n  scale: 10x\n")
    res = run_cli("models", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    for name, cls in MODELS.items():
        (line,) = [ln for ln in lines if ln.split()[0] == name]
        assert f"model.{cls.config_key}" in line and cls.primary_score in line
        assert cls.paper in line
        assert ("10x+20x" if cls.n_scales == 2 else " 10x ") in line
    assert "`wsimil models`" in run_cli("crossval", "--help", cwd=tmp_path).stdout
