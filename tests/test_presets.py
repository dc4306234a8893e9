"""Presets: a paper's protocol as a params overlay, selected in one step (issue 15 item 4)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wsimil.config import ConfigError, load_params, merge_overlay, with_overrides
from wsimil.presets import dvc_set_args, flatten, names, preset_file


@pytest.fixture
def project(tmp_path, repo_root) -> Path:
    """A project folder holding the repository's params.yaml and presets/."""
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(repo_root / "presets", tmp_path / "presets")
    return tmp_path


def test_merge_replaces_only_the_keys_the_overlay_names():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 3}
    assert merge_overlay(base, {"a": {"c": [5]}}) == {"a": {"b": 1, "c": [5]}, "d": 3}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 3}  # not modified in place


def test_dmsmil_paper_preset_sets_the_papers_protocol(project):
    base = load_params(project / "params.yaml")
    p = load_params(project / "params.yaml", overlays=[preset_file(project, "dmsmil-paper")])
    assert (p.tiles.tile_px, p.tiles.top_k) == (512, 200)
    assert (p.features.extractor, p.features.weights) == ("resnet101", "pretrained")
    assert p.model.name == "dmsmil" and p.model.dmsmil.lam == 1.0
    t = p.train.dmsmil
    assert (t.epochs, t.lr, t.schedule, t.batch_size) == (120, 1e-4, "constant", 1)
    # every key the preset does not name keeps params.yaml's value
    assert p.crossval == base.crossval and p.train.dtfd == base.train.dtfd
    assert p.tiles.density_threshold == base.tiles.density_threshold


def test_set_overrides_win_over_the_preset(project):
    p = load_params(project / "params.yaml", overlays=[preset_file(project, "dmsmil-paper")])
    assert with_overrides(p, {"train.dmsmil.epochs": 3}).train.dmsmil.epochs == 3


def test_a_bad_overlay_key_names_the_overlay_file(project):
    bad = project / "mine.yaml"
    bad.write_text("train:\n  dtfd:\n    epoch: 3\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: unknown key 'train\.dtfd\.epoch'"):
        load_params(project / "params.yaml", overlays=[preset_file(project, str(bad))])
    with pytest.raises(ConfigError, match=r"--preset nope: .*presets: dmsmil-paper, dtfd-mil"):
        preset_file(project, "nope")


def test_dvc_arguments_set_the_same_values_as_the_overlay(project):
    """``dvc exp run $(wsimil presets NAME --dvc)`` gives the params ``--preset NAME`` gives."""
    path = preset_file(project, "dmsmil-paper")
    args = dvc_set_args(path)
    assert args[::2] == ["-S"] * (len(args) // 2)
    sets = {}
    for item in args[1::2]:
        key, _, value = item.removeprefix("++").partition("=")
        sets[key] = yaml.safe_load(value)  # JSON is YAML; Hydra reads these values alike
    assert sets == flatten(yaml.safe_load(path.read_text()))
    params = load_params(project / "params.yaml")
    assert with_overrides(params, sets) == load_params(project / "params.yaml", overlays=[path])


def test_cli_runs_a_command_with_a_preset_and_lists_them(project):
    def cli(*args):
        cmd = [sys.executable, "-m", "wsimil", *args]
        return subprocess.run(cmd, cwd=project, capture_output=True, text=True)

    res = cli("models", "--preset", "dmsmil-paper", "-S", "model.name=abmil")
    assert res.returncode == 0, res.stderr
    assert "default: abmil" in res.stdout  # the preset said dmsmil; --set wins
    listed = cli("presets")
    assert listed.returncode == 0 and names(project) == ["dmsmil-paper", "dtfd-mil"]
    assert all(name in listed.stdout for name in names(project))
    bad = cli("models", "--preset", "nope")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "presets/nope.yaml" in bad.stderr


def test_dtfd_mil_preset_sets_the_reference_protocol(project):
    p = load_params(project / "params.yaml", overlays=[preset_file(project, "dtfd-mil")])
    assert p.tiles.rule == "tissue"
    tissue = p.tiles.tissue
    assert (tissue.mpp, tissue.tile_px, tissue.overlap_px, tissue.min_tissue) == (0.5, 256, 0, 0.5)
    assert p.features.extractor == "resnet50_trunc"
    m, t = p.model.dtfd, p.train.dtfd
    assert (p.model.name, m.n_pseudo_bags, m.distill, m.hidden_dims) == ("dtfd", 4, "afs", (512,))
    assert (t.epochs, t.lr, t.weight_decay, t.schedule, t.step_at, t.step_factor) == (
        200, 1e-4, 1e-4, "step", 0.5, 0.2,
    )  # fmt: skip
    assert t.grad_clip == 5.0


def test_dvc_applies_the_arguments_to_params_yaml_as_the_preset_does(project):
    """DVC's own ``-S`` applier (what ``dvc exp run`` runs) gives the preset's params."""
    from dvc.utils.hydra import apply_overrides

    path = preset_file(project, "dmsmil-paper")
    want = load_params(project / "params.yaml", overlays=[path])
    apply_overrides(str(project / "params.yaml"), dvc_set_args(path)[1::2])
    assert load_params(project / "params.yaml") == want
