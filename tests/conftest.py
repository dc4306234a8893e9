"""Shared fixtures: small synthetic data written at test time, paths to shared real data."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from wsimil import cpu_isa

# The CPU kernels every wsimil process uses (the CLI pins them first thing): in-process
# results then equal the CLI's and the pinned golden values on any CPU (wsimil/cpu_isa.py).
cpu_isa.pin()

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_synth_config():
    """A 4-slide cohort small enough to render in a second or two."""
    from wsimil.config import SynthConfig

    return SynthConfig(
        n_slides=4,
        n_patients=3,
        width_px=1024,
        height_px=768,
        tumour_share=0.08,
        n_levels=4,
        seed=7,
    )


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory, tiny_synth_config):
    """(out_dir, table) of the tiny synthetic cohort, written once per session."""
    from wsimil.synth import write_cohort

    out = tmp_path_factory.mktemp("cohort")
    table = write_cohort(tiny_synth_config, out)
    return out, table


_PREFECT_HOME = pytest.StashKey[tuple]()


def pytest_configure(config) -> None:
    """Each pytest process (every xdist worker) its own Prefect home, and time to start it.

    Flows run by the CLI in tests without a ``PREFECT_HOME`` of their own would otherwise share
    ``~/.prefect``: one SQLite database migrated and written by temporary servers of parallel
    workers at once, and files outside the test's folders.
    """
    home = tempfile.mkdtemp(prefix="wsimil-prefect-")
    config.stash[_PREFECT_HOME] = (home, os.environ.get("PREFECT_HOME"))
    os.environ["PREFECT_HOME"] = home
    # Workers share the cores: a CLI's temporary Prefect server took over the CLI's 120 s to
    # migrate its database on a loaded 2-core machine (`wsimil tiles` then fails). Still bounded.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")


def pytest_unconfigure(config) -> None:
    home, before = config.stash.get(_PREFECT_HOME, (None, None))
    if home is None:
        return
    if before is None:
        os.environ.pop("PREFECT_HOME", None)
    else:
        os.environ["PREFECT_HOME"] = before
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> Path:
    """A real project (8 slides → tiles → ResNet-18 random features → 2 folds) built by the CLI.

    Under pytest-xdist the CLI builds it once for the whole run (the first worker to need it,
    under a file lock, in the run's shared temporary folder); every worker then gets its own
    copy, since tests add runs, results and reports to it.
    """
    from projects import build_tiny_project

    mine = tmp_path_factory.mktemp("tiny") / "project"
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build_tiny_project(mine)
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "tiny-shared"  # this run's, all workers'
    with FileLock(f"{shared}.lock"):
        if not (shared / "built").is_file():
            shutil.rmtree(shared, ignore_errors=True)  # a worker that failed half-way
            build_tiny_project(shared / "project")
            (shared / "built").touch()
    shutil.copytree(shared / "project", mine, symlinks=True)
    return mine


def pytest_terminal_summary(terminalreporter, config) -> None:
    """Print the random test order's seed (pytest-randomly), so a failure can be replayed."""
    seed = getattr(config.option, "randomly_seed", None)
    if seed is not None and not getattr(config.option, "randomly_dont_reorganize", False):
        terminalreporter.write_line(
            f"tests ran in random order, seed {seed}; replay with --randomly-seed={seed}"
        )
