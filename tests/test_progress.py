"""Progress bars (wsimil.progress) and a quiet console: O(1) lines for N slides."""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from wsimil import progress

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("value", "tty", "expected"),
    [(None, False, False), (None, True, True), ("0", True, False), ("1", False, True)],
)
def test_bars_follow_the_terminal_unless_the_variable_says(monkeypatch, value, tty, expected):
    if value is None:
        monkeypatch.delenv(progress.ENV, raising=False)
    else:
        monkeypatch.setenv(progress.ENV, value)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty, raising=False)
    assert progress.enabled() is expected


def test_a_bad_setting_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(progress.ENV, "sometimes")
    with pytest.raises(ValueError, match="WSIMIL_PROGRESS='sometimes'"):
        progress.enabled()


def test_the_cli_names_a_bad_setting_before_it_starts(tmp_path):
    (tmp_path / "params.yaml").write_text("tiles: {slides_csv: slides.csv}\n")
    env = {**os.environ, progress.ENV: "maybe"}
    done = subprocess.run(
        [sys.executable, "-m", "wsimil", "tiles", "--params", str(tmp_path / "params.yaml")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: WSIMIL_PROGRESS='maybe': use 1 (bars on), 0 (off) or leave it unset"
    ]


def test_a_bar_is_silent_when_off_and_one_line_when_forced(monkeypatch):
    for value, most_lines in (("0", 0), ("1", 1)):
        monkeypatch.setenv(progress.ENV, value)
        stream = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        with progress.bar(500, "tiles", "slide") as bar:
            for _ in range(500):
                bar.update()
        text = stream.getvalue()
        assert text.count("\n") == most_lines
        assert ("500/500" in text) is (value == "1")


@pytest.mark.slow  # starts a Prefect server (~20-30 s on a loaded 2-core machine)
def test_tiles_on_n_slides_prints_one_line_and_prefect_still_logs_every_task(tmp_path, tiny_cohort):
    out, table = tiny_cohort
    project = tmp_path / "project"
    project.mkdir()
    rows = [{"slide_id": r.slide_id, "path": str(out / r.path)} for r in table.itertuples()]
    rows += [
        {"slide_id": f"copy{i}-{r['slide_id']}", "path": r["path"]} for i in range(2) for r in rows
    ]
    pd.DataFrame(rows).to_csv(project / "slides.csv", index=False)
    params = {"tiles": {"slides_csv": "slides.csv", "tile_px": 64, "top_k": 4}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", progress.ENV)}
    env = {k: v for k, v in env.items() if not k.startswith("PREFECT_LOGGING_")}
    env["PREFECT_HOME"] = str(project / ".prefect")
    done = subprocess.run(
        [sys.executable, "-m", "wsimil", "tiles", "--params", str(project / "params.yaml")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    n = len(rows)
    lines = (done.stdout + done.stderr).splitlines()
    assert lines == [
        f"tiles: {n} slides, {n} computed, 0 up to date, 0 failed; "
        f"report {project / 'reports' / 'tiles.csv'}"
    ], lines  # no bar off a terminal, no per-task Prefect line
    with sqlite3.connect(project / ".prefect" / "prefect.db") as db:
        (finished,) = db.execute(
            "select count(*) from log where message like '%Finished in state Completed()%'"
        ).fetchone()
    assert finished == n + 1  # every task run and the flow run, in the Prefect UI's logs
