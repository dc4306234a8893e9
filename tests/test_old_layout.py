"""Models registered before the stage packages (issue 13) still load and answer.

A registered version carries its own copy of the package (``code_paths``), so a model
logged by the flat layout (``wsimil/serve.py``, ``wsimil/registry.py``, ...) must load and
serve in an environment where the regrouped package is installed. The old code comes from
git history; registering and loading each run in a fresh process, as they would for a user.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from projects import clean_env, run
from serving import SCALES, fit_ensemble, reference_answer, request_row

pytestmark = pytest.mark.slow

FLAT_LAYOUT = "1c7ef17512919e90d5d407142c4f89cae4f9fd09"  # the last commit with the flat package
REGISTER = """
from pathlib import Path
import sys
from wsimil.registry import register
register(Path(sys.argv[1]), "flat-dtfd", experiment="flat", extraction=None,
         champion_margin=0.0, lineage={})
"""
LOAD = """
import json, sys
import mlflow, pandas as pd
rows = json.load(open(sys.argv[1]))
model = mlflow.pyfunc.load_model("models:/flat-dtfd/1")
answers = model.predict(pd.DataFrame(rows))
json.dump({"wsimil": sys.modules["wsimil.serve"].__file__,
           "answers": [{"bag_id": a["bag_id"], "probabilities": a["probabilities"]}
                       for a in answers]}, open(sys.argv[2], "w"))
"""


def flat_package(repo: Path, out: Path) -> Path:
    """The package (and its lock) as it was at ``FLAT_LAYOUT``, unpacked under ``out``."""
    known = subprocess.run(
        ["git", "cat-file", "-e", f"{FLAT_LAYOUT}^{{commit}}"], cwd=repo, capture_output=True
    )
    if known.returncode != 0:
        pytest.skip(f"git history with commit {FLAT_LAYOUT[:9]} is not available here")
    out.mkdir()
    archive = subprocess.run(
        ["git", "archive", FLAT_LAYOUT, "wsimil", "requirements.lock"],
        cwd=repo, capture_output=True, check=True,
    )  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    assert (out / "wsimil" / "serve.py").is_file()  # the flat layout, not the packages
    return out


def _known(doc: dict, known: dict) -> dict:
    return {
        k: _known(v, known[k]) if isinstance(v, dict) else v for k, v in doc.items() if k in known
    }


def as_flat_layout_wrote_it(manifest: Path, old: Path, env: dict[str, str]) -> None:
    """Drop the model-config keys added since the flat layout (it never wrote them).

    The ensemble is fitted by today's code, but stands for one the flat layout fitted and
    registered: its ``model`` section may only hold what that code's config knew.
    """
    defaults = run(
        [sys.executable, "-c",
         "import json; from wsimil.config import ModelConfig; "
         "print(json.dumps(ModelConfig().model_dump(mode='json')))"],
        manifest.parent, {**env, "PYTHONPATH": str(old)},
    )  # fmt: skip
    doc = json.loads(manifest.read_text())
    line = next(ln for ln in defaults.splitlines() if ln.startswith("{"))  # stdout, not warnings
    doc["model"] = _known(doc["model"], json.loads(line))
    manifest.write_text(json.dumps(doc, indent=1))


def test_a_version_logged_by_the_flat_layout_loads_and_answers(tmp_path, repo_root):
    old = flat_package(repo_root, tmp_path / "flat")
    fitted = fit_ensemble("dtfd", tmp_path / "ensemble")
    env = clean_env(tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlruns.db'}")
    as_flat_layout_wrote_it(fitted.models_dir / "ensemble.json", old, env)
    run([sys.executable, "-c", REGISTER, str(fitted.models_dir)], tmp_path,
        {**env, "PYTHONPATH": str(old)})  # fmt: skip

    rows = [request_row(b, SCALES[1]) for b in fitted.held_out]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    load_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    assert not any("flat" in p for p in load_env.get("PATH", "").split(os.pathsep))
    run([sys.executable, "-c", LOAD, "rows.json", "answers.json"], tmp_path, load_env)

    done = json.loads((tmp_path / "answers.json").read_text())
    assert done["wsimil"].endswith("code/wsimil/serve.py")  # the model's own flat copy ran
    answers = done["answers"]
    assert [a["bag_id"] for a in answers] == [b.slide_id for b in fitted.held_out]
    for bag, answer in zip(fitted.held_out, answers, strict=True):
        probs, _ = reference_answer(fitted, bag)
        got = [answer["probabilities"][c] for c in fitted.cv.classes]
        np.testing.assert_allclose(got, probs, atol=1e-5)
