"""Shared fixtures: small synthetic data written at test time, paths to shared real data."""

from __future__ import annotations

from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> Path:
    """A real project (8 slides → tiles → ResNet-18 random features → 2 folds) built by the CLI."""
    from projects import build_tiny_project

    return build_tiny_project(tmp_path_factory.mktemp("tiny") / "project")


def pytest_terminal_summary(terminalreporter, config) -> None:
    """Print the random test order's seed (pytest-randomly), so a failure can be replayed."""
    seed = getattr(config.option, "randomly_seed", None)
    if seed is not None and not getattr(config.option, "randomly_dont_reorganize", False):
        terminalreporter.write_line(
            f"tests ran in random order, seed {seed}; replay with --randomly-seed={seed}"
        )
