"""Extraction on a Dask cluster (prefect-dask): the thread runner's caches and reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from projects import REPO, clean_env, free_port

from wsimil.extract.cache import read_h5

PARAMS = {
    "tiles": {"slides_csv": "slides.csv", "tile_px": 64, "top_k": 8},
    "features": {"extractor": "resnet18", "weights": "random", "batch_size": 16,
                 "num_workers": 0},
}  # fmt: skip


def wsimil_cli(args: list[str], project: Path, **env: str) -> subprocess.CompletedProcess:
    """``python -m wsimil ARGS`` in ``project``; returns the finished process, any exit code."""
    cmd = [sys.executable, "-m", "wsimil", *args, "--params", str(project / "params.yaml")]
    return subprocess.run(
        cmd, cwd=project, env=clean_env(project, **env), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def new_project(folder: Path, slides: pd.DataFrame) -> Path:
    folder.mkdir(parents=True)
    slides.to_csv(folder / "slides.csv", index=False)
    (folder / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    return folder


@pytest.fixture(scope="module")
def slides(tiny_cohort, tmp_path_factory) -> pd.DataFrame:
    """The tiny cohort's four slides and one file that is not a slide (``bad``)."""
    out, table = tiny_cohort
    bad = tmp_path_factory.mktemp("bad") / "bad.svs"
    bad.write_text("not a slide\n")
    rows = [{"slide_id": r.slide_id, "path": str(out / r.path)} for r in table.itertuples()]
    return pd.DataFrame([*rows, {"slide_id": "bad", "path": str(bad)}])


@pytest.fixture(scope="module")
def threads_project(slides, tmp_path_factory) -> Path:
    """The reference: `wsimil features` on the default thread runner."""
    project = new_project(tmp_path_factory.mktemp("threads") / "project", slides)
    done = wsimil_cli(["features"], project)
    assert done.returncode == 1, done.stderr[-3000:]  # the bad slide
    return project


def good_ids(slides: pd.DataFrame) -> list[str]:
    return [s for s in slides["slide_id"] if s != "bad"]


def assert_same_h5(a: Path, b: Path) -> None:
    """Same datasets (numpy-equal) and same attributes, except where the file lives."""
    (data_a, attrs_a), (data_b, attrs_b) = read_h5(a), read_h5(b)
    assert data_a.keys() == data_b.keys()
    for name in data_a:
        assert np.array_equal(data_a[name], data_b[name]), f"{a.name}: {name} differs"
    assert attrs_a == attrs_b


def assert_reports_bad_slide(done: subprocess.CompletedProcess, report: Path, good: list[str]):
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: slide bad (")
    assert "not a format OpenSlide reads" in errors[0]
    table = pd.read_csv(report).set_index("slide_id")
    assert table.loc[good, "status"].eq("done").all()
    assert table.loc["bad", "status"] == "failed"
    assert table.loc["bad", "error"] == errors[0].removeprefix("error: ")
    return json.loads(report.with_suffix(".json").read_text())


# --- choosing the runner --------------------------------------------------------------------


def test_dask_values_parse_or_say_what_to_give(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from wsimil.extract.runners import DaskSpecError, parse_dask

    assert parse_dask(None) is None and parse_dask("") is None
    assert parse_dask("local:3") == 3
    assert parse_dask("tcp://10.0.0.5:8786") == "tcp://10.0.0.5:8786"
    assert parse_dask("10.0.0.5:8786") == "tcp://10.0.0.5:8786"
    assert parse_dask("tls://scheduler.lab:8786") == "tls://scheduler.lab:8786"
    for bad in ("local:0", "local:two", "10.0.0.5", "http//x:1"):
        with pytest.raises(DaskSpecError, match="local:N .* tcp://|at least 1 worker") as err:
            parse_dask(bad)
        assert f"--dask / WSIMIL_DASK_ADDRESS {bad!r}" in str(err.value)


def test_task_code_reaches_workers_that_lack_this_checkout(tmp_path, monkeypatch):
    """What a Dask worker unpickles: the tasks (with their retry condition), the configs, the
    outcome, in a process whose path has wsimil but not the flows/ folder."""
    import cloudpickle

    monkeypatch.syspath_prepend(str(REPO))
    from wsimil.config import FeaturesConfig, TilesConfig
    from wsimil.extract.flows import features_task, tiles_task
    from wsimil.extract.report import SlideOutcome
    from wsimil.extract.runners import task_runner

    task_runner(2, threads=1)  # a Dask runner: the tasks pickle by reference to wsimil
    payload = tmp_path / "payload.pkl"
    payload.write_bytes(
        cloudpickle.dumps(
            (tiles_task, features_task, TilesConfig(tile_px=64), FeaturesConfig(),
             SlideOutcome("s", "s.svs", "done", n_tiles=3))
        )
    )  # fmt: skip
    check = f"""
import importlib.util, pickle
from pathlib import Path
from prefect.states import Failed
assert importlib.util.find_spec("flows") is None, "the checkout is on the path"
loaded = pickle.loads(Path({str(payload)!r}).read_bytes())
tiles_task, features_task, tiles, features, outcome = loaded
retry = features_task.retry_condition_fn
assert retry(None, None, Failed(data=OSError(5, "Input/output error")))
assert not retry(None, None, Failed(data=FileNotFoundError(2, "gone")))
assert (tiles.tile_px, features.extractor, outcome.n_tiles) == (64, "resnet101", 3)
assert tiles_task.name == "tiles" and features_task.retries == 2
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-P", "-c", check], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.stdout.strip() == "ok", done.stderr[-3000:]


def test_extractor_is_built_once_per_process_and_shared_by_its_threads():
    from concurrent.futures import ThreadPoolExecutor

    from wsimil.config import FeaturesConfig
    from wsimil.extract.extractors import shared_extractor

    cfg = FeaturesConfig(extractor="test_resnet", weights="random", device="cpu")
    with ThreadPoolExecutor(4) as pool:
        built = list(pool.map(lambda _: shared_extractor(cfg, 64), range(4)))
    assert all(e is built[0] for e in built)
    assert shared_extractor(cfg.model_copy(update={"batch_size": 3}), 64) is built[0]
    other = shared_extractor(cfg.model_copy(update={"init_seed": 1}), 64)
    assert other is not built[0] and other.init_seed == 1
    assert shared_extractor(cfg, 64) is not built[0]  # only the latest network is kept


@pytest.mark.slow
def test_cli_says_when_the_scheduler_is_unreachable(tmp_path, slides):
    project = new_project(tmp_path / "project", slides)
    address = f"tcp://127.0.0.1:{free_port()}"
    done = wsimil_cli(["tiles"], project, WSIMIL_DASK_ADDRESS=address)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: cannot reach the Dask scheduler at {address} (")
    assert len(done.stderr.strip().splitlines()) == 1  # one line, no traceback
    bad = wsimil_cli(["features", "--dask", "local:x"], project)
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "error: --dask / WSIMIL_DASK_ADDRESS 'local:x': expected local:N (N worker processes "
        "here) or a scheduler address like tcp://10.0.0.5:8786"
    )


# --- on a cluster ---------------------------------------------------------------------------


@pytest.mark.slow
def test_features_on_a_dask_cluster_equal_the_thread_runner(tmp_path, slides, threads_project):
    """Two worker processes share the slides; caches and report are the thread runner's."""
    from distributed import Client, LocalCluster

    good = good_ids(slides)
    project = new_project(tmp_path / "project", slides)
    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None,
    )  # fmt: skip
    try:
        with Client(cluster) as client:
            client.get_task_stream()  # start recording which worker runs which task
            done = wsimil_cli(["features", "--dask", cluster.scheduler_address], project)
            stream = client.get_task_stream()
            pids = client.run(os.getpid)
            networks = client.run(_cached_networks)
    finally:
        cluster.close()

    summary = assert_reports_bad_slide(done, project / "reports" / "features.csv", good)
    assert summary["task_runner"] == f"dask {cluster.scheduler_address}"
    ran_on = {}
    for record in stream:
        ran_on.setdefault(record["key"].split("-")[0], set()).add(record["worker"])
    assert ran_on.keys() == {"tiles_task", "features_task"}
    assert ran_on["features_task"] == set(pids)  # both workers embedded slides
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
    assert list(networks.values()) == [["resnet18"], ["resnet18"]]  # built there, once each

    for scale in ("10x", "20x"):
        for slide_id in good:
            assert_same_h5(
                threads_project / "data" / "features" / "resnet18" / scale / f"{slide_id}.h5",
                project / "data" / "features" / "resnet18" / scale / f"{slide_id}.h5",
            )
    assert not (project / "data" / "features" / "resnet18" / "10x" / "bad.h5").exists()


def _cached_networks() -> list[str]:
    """On a worker: the networks its process built (run there by ``client.run``)."""
    from wsimil.extract.extractors import _shared

    return [e.name for e in _shared.values()]


@pytest.mark.slow
def test_tiles_on_a_local_cluster_equal_the_thread_runner(tmp_path, slides, threads_project):
    project = new_project(tmp_path / "project", slides)
    done = wsimil_cli(["tiles", "--dask", "local:2"], project)
    summary = assert_reports_bad_slide(done, project / "reports" / "tiles.csv", good_ids(slides))
    assert summary["task_runner"] == "dask local:2"
    for slide_id in good_ids(slides):
        assert_same_h5(
            threads_project / "data" / "tiles" / f"{slide_id}.h5",
            project / "data" / "tiles" / f"{slide_id}.h5",
        )
