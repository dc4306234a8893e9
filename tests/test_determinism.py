"""SPEC §6: the same code, data, params and seed give byte-identical results in any process.

Two copies of the tiny project are run by the real CLI in separate processes (the two copies
side by side): one as built (2 slides in flight, 2 tile-reader processes), one rebuilt from
its slides with 1 slide in flight and no reader processes. Feature datasets, splits.json,
every fold's weights and metrics.json, and the tuning trials must match to the byte (sha256),
not to a tolerance.
(The Dask runner's caches are compared with the thread runner's in test_dask_extract.py.)
"""

from __future__ import annotations

import hashlib
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import optuna
import pytest
from projects import wsimil

pytestmark = pytest.mark.slow

FAMILIES = ("dtfd", "dmsmil")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def feature_hashes(project: Path) -> dict[str, str]:
    """sha256 of every dataset of every cache (file attrs name the project folder, so differ)."""
    out = {}
    for path in sorted((project / "data" / "features").rglob("*.h5")):
        with h5py.File(path) as f:
            for name in sorted(f):
                rel = f"{path.relative_to(project)}:{name}"
                out[rel] = hashlib.sha256(f[name][()].tobytes()).hexdigest()
    return out


def result_hashes(project: Path, family: str) -> dict[str, str]:
    out = project / "results" / "crossval" / family
    files = [*sorted((out / "models").glob("*.safetensors")), out / "metrics.json"]
    return {str(p.relative_to(out)): sha(p) for p in files}


def trials(project: Path, family: str) -> list[tuple]:
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(
            str(project / "results" / "tune" / family / "journal.log")
        )
    )
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    return [(t.number, t.state.name, t.params, t.value, t.intermediate_values) for t in
            study.trials]  # fmt: skip


@pytest.fixture(scope="module")
def twins(tiny_project, tmp_path_factory) -> tuple[Path, Path]:
    """(as built, rebuilt with other concurrency), each cross-validated in its own process."""
    root = tmp_path_factory.mktemp("twins")
    a, b = root / "a", root / "b"
    ignore = shutil.ignore_patterns("mlruns.db", "results", ".prefect")
    shutil.copytree(tiny_project, a, ignore=ignore)
    shutil.copytree(tiny_project, b, ignore=shutil.ignore_patterns("mlruns.db", "results",
                    ".prefect", "features", "tiles", "splits.json", "reports"))  # fmt: skip
    serial = ["-S", "tiles.concurrent_slides=1", "-S", "features.concurrent_slides=1",
              "-S", "features.num_workers=0"]  # fmt: skip
    tune = ["-S", "tune.pruner=median", "-S", "tune.pruner_startup_trials=1",
            "-S", "tune.n_trials=3"]  # fmt: skip

    def pipeline(project: Path, rebuild: bool) -> None:
        for step in ("tiles", "features", "splits") if rebuild else ():
            wsimil([step, *serial], project)
        for family in FAMILIES:
            wsimil(["crossval", "--model", family], project)
        wsimil(["tune", "--model", "dtfd", *tune], project)

    # the two copies are independent processes: run side by side (a core each where there are)
    with ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(pipeline, a, False), pool.submit(pipeline, b, True)]:
            done.result()
    return a, b


def test_feature_caches_are_identical_whatever_the_concurrency(twins):
    a, b = twins
    hashes = feature_hashes(a)
    assert len(hashes) == 8 * 2 * 4  # 8 slides, 2 scales, 4 datasets each
    assert hashes == feature_hashes(b)


def test_splits_are_identical(twins):
    a, b = twins
    assert sha(a / "data" / "splits.json") == sha(b / "data" / "splits.json")


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_weights_and_metrics_are_identical(twins, family):
    a, b = twins
    hashes = result_hashes(a, family)
    assert len(hashes) == 3  # two folds and the metrics
    assert hashes == result_hashes(b, family)


def test_tuning_trials_are_identical_with_one_worker(twins):
    a, b = twins
    first = trials(a, "dtfd")
    assert len(first) == 3
    assert first == trials(b, "dtfd")
