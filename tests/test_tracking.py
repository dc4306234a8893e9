"""git_state: a run is dirty when code or configuration the commit lacks could change it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from wsimil.experiment.tracking import git_state

DVC_YAML = """stages:
  splits:
    cmd: python -m wsimil splits
    outs:
      - data/splits.json:
          cache: false
  crossval:
    foreach: [abmil, dtfd]
    do:
      cmd: python -m wsimil crossval --model ${item}
      metrics:
        - results/crossval/${item}/metrics.json:
            cache: false
"""


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def test_what_dvc_repro_rewrites_is_not_dirty_but_code_is(tmp_path):
    files = {
        "dvc.yaml": DVC_YAML,
        "dvc.lock": "schema: '2.0'\n",
        "params.yaml": "train: {}\n",
        "data/splits.json": "{}",
        "results/crossval/dtfd/metrics.json": "{}",
        "code.py": "x = 1\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    git("init", "-q", cwd=tmp_path)
    git("add", "-A", cwd=tmp_path)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c", cwd=tmp_path)
    assert git_state(tmp_path)["git_dirty"] == "false"

    for name in (
        "dvc.lock",
        "params.yaml",
        "data/splits.json",
        "results/crossval/dtfd/metrics.json",
    ):
        (tmp_path / name).write_text("changed by dvc repro\n")
    state = git_state(tmp_path)
    assert state["git_dirty"] == "false" and "git_dirty_files" not in state

    (tmp_path / "code.py").write_text("x = 2\n")
    (tmp_path / "dvc.yaml").write_text(DVC_YAML + "# edited\n")
    state = git_state(tmp_path)
    assert state["git_dirty"] == "true"
    assert state["git_dirty_files"].split(",") == ["code.py", "dvc.yaml"]


def test_outside_a_checkout_the_state_is_unknown(tmp_path):
    assert git_state(tmp_path) == {"git_commit": "unknown", "git_dirty": "unknown"}
