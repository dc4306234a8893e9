"""Prefect flows: slides → tiles → feature caches, one task per slide and step.

- ``select_tiles``: per slide, the density-ranked 10× tiles and their 20× children
  (:func:`wsimil.extract.tiles.tiles_for_slide`).
- ``extract_features``: per slide, tiles (reused when up to date) → embedding → the 10× and
  20× HDF5 caches (:func:`wsimil.extract.features.features_for_slide`).

The flows only add fan-out, retries and reporting; the work is in ``wsimil``. Parameters are
the typed params.yaml sections, so a deployment shows them as a form. They run without a
server (Prefect starts a temporary one) or against ``PREFECT_API_URL``.

Prefect's task caching is off on purpose: each task decides from the provenance attributes
of the HDF5 files whether there is work to do, which stays correct when files are deleted
and leaves the decision of what reruns to DVC. I/O errors are retried; a slide that cannot
be used ends its task in a Failed state with the actionable message (no traceback), is
listed in the report, and the run goes on.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from wsimil import progress
from wsimil.config import FeaturesConfig, TilesConfig
from wsimil.extract.report import SlideOutcome, write_report
from wsimil.extract.runners import deployment_runner
from wsimil.extract.slide import SlideError, SlideRef, read_slide_table

DAEMON_WORKER = (
    "this Dask worker is a daemon process, which cannot start the features.num_workers tile "
    "reader processes; start the workers with DASK_DISTRIBUTED__WORKER__DAEMON=False or set "
    "features.num_workers: 0"
)
NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _transient_io_error(task, task_run, state: State) -> bool:
    """Retry on I/O errors such as a network filesystem hiccup, not on missing files."""
    exc = state.data
    return isinstance(exc, OSError) and not isinstance(exc, NOT_TRANSIENT)


TASK_OPTIONS = {
    "retries": 2,
    "retry_delay_seconds": 2,
    "retry_condition_fn": _transient_io_error,
    "cache_policy": NO_CACHE,
}


@task(name="tiles", task_run_name="tiles-{ref.slide_id}", **TASK_OPTIONS)
def tiles_task(ref: SlideRef, tiles: TilesConfig) -> SlideOutcome:
    from wsimil.extract.tiles import tiles_for_slide

    start = time.perf_counter()
    try:
        sel, cached = tiles_for_slide(ref, tiles, tiles.out_dir)
    except SlideError as exc:
        return Failed(message=str(exc))
    return SlideOutcome(
        ref.slide_id,
        str(ref.path),
        "cached" if cached else "done",
        n_tiles=sel.n_tiles,
        n_tissue_tiles=sel.n_tissue,
        fewer_than_top_k=sel.fewer_than_top_k,
        seconds=round(time.perf_counter() - start, 3),
    )


@task(name="features", task_run_name="features-{ref.slide_id}", **TASK_OPTIONS)
def features_task(
    ref: SlideRef,
    tiles_done: SlideOutcome,
    tiles: TilesConfig,
    features: FeaturesConfig,
    features_root: Path,
) -> SlideOutcome:
    """Embed one slide with this process's network (built once per process, not shipped)."""
    from wsimil.extract.extractors import ExtractorError, shared_extractor
    from wsimil.extract.features import features_for_slide
    from wsimil.extract.tiles import read_selection, tiles_path

    if features.num_workers and multiprocessing.current_process().daemon:
        return Failed(message=DAEMON_WORKER)
    try:
        extractor = shared_extractor(features, tiles.cut_px)
        sel = read_selection(tiles_path(tiles.out_dir, ref.slide_id))
        result = features_for_slide(
            ref, sel, extractor, features, features_root, mpp_override=tiles.mpp_override
        )
    except (SlideError, ExtractorError) as exc:
        return Failed(message=str(exc))
    return SlideOutcome(
        ref.slide_id,
        str(ref.path),
        "cached" if result.skipped else "done",
        n_tiles=result.n_tiles,
        n_tissue_tiles=tiles_done.n_tissue_tiles,
        fewer_than_top_k=tiles_done.fewer_than_top_k,
        seconds=round(tiles_done.seconds + result.seconds, 3),
        note=result.repaired,
    )


def _outcome(ref: SlideRef, future) -> SlideOutcome:
    """The task's outcome, or a failed one whose error names the slide."""
    future.wait()
    state = future.state
    if state.is_completed():
        return future.result()
    error = _message(state)
    if not state.is_final():  # it never finished, e.g. its Dask worker died or failed it
        error = _raised(future) or error
    if not error.startswith(f"slide {ref.slide_id} "):  # e.g. an I/O error after the retries
        error = f"slide {ref.slide_id} ({ref.path}): {error}"
    return SlideOutcome(ref.slide_id, str(ref.path), "failed", error=error)


def _raised(future) -> str:
    """What the future raises when asked for its result ("" if nothing)."""
    try:
        future.result(timeout=0, raise_on_failure=False)
    except Exception as exc:  # noqa: BLE001 - reported, not handled
        return f"{type(exc).__name__}: {exc}"
    return ""


def _message(state: State) -> str:
    exc = state.data if isinstance(state.data, BaseException) else None
    return str(exc) if exc else (state.message or state.name)


def _runner_name() -> str:
    """Where this flow's tasks run, for the report: ``threads (2)``, ``dask tcp://...``."""
    runner = FlowRunContext.get().task_runner
    if isinstance(runner, ThreadPoolTaskRunner):
        return f"threads ({runner._max_workers})"
    n_local = (getattr(runner, "cluster_kwargs", None) or {}).get("n_workers")
    return f"dask local:{n_local}" if n_local else f"dask {getattr(runner, 'address', '')}"


def _log(outcomes: list[SlideOutcome]) -> None:
    logger = get_run_logger()
    for o in outcomes:
        if o.status == "failed":
            logger.error("error: %s", o.error)
        elif o.fewer_than_top_k:
            logger.warning("slide %s: only %d tissue tiles, all kept", o.slide_id, o.n_tiles)


# Deployments run the flows with this runner; the CLI picks its own (see run()).
DEFAULT_RUNNER = deployment_runner()


@flow(name="wsimil-tiles", task_runner=DEFAULT_RUNNER)
def select_tiles(tiles: TilesConfig = TilesConfig()) -> list[SlideOutcome]:
    """Select tiles for every slide of ``tiles.slides_csv``; write the report."""
    start = time.perf_counter()
    try:
        refs = read_slide_table(tiles.slides_csv)
    except SlideError as exc:
        return Failed(message=str(exc))
    futures = tiles_task.map(refs, unmapped(tiles))
    outcomes = []
    with progress.bar(len(refs), "tiles", "slide") as bar:
        for ref, future in zip(refs, futures, strict=True):
            outcomes.append(_outcome(ref, future))
            bar.update()
    _log(outcomes)
    summary = {
        "step": "tiles",
        "seconds": round(time.perf_counter() - start, 2),
        "task_runner": _runner_name(),
        "tiles": tiles.model_dump(mode="json"),
    }
    write_report(tiles.report, outcomes, summary)
    return outcomes


@flow(name="wsimil-features", task_runner=DEFAULT_RUNNER)
def extract_features(
    tiles: TilesConfig = TilesConfig(), features: FeaturesConfig = FeaturesConfig()
) -> list[SlideOutcome]:
    """Tiles → embedding → 10× and 20× caches for every slide; write the report."""
    from wsimil.extract.cache import features_dir
    from wsimil.extract.extractors import ExtractorError, shared_extractor

    start = time.perf_counter()
    try:
        refs = read_slide_table(tiles.slides_csv)
        extractor = shared_extractor(features, tiles.cut_px)  # the tasks of this process reuse it
    except (SlideError, ExtractorError) as exc:
        return Failed(message=str(exc))
    root = features_dir(features.out_dir, features.extractor)
    tile_futures = tiles_task.map(refs, unmapped(tiles))
    feature_futures = features_task.map(
        refs, tile_futures, unmapped(tiles), unmapped(features), unmapped(root)
    )
    outcomes = []
    with progress.bar(len(refs), "features", "slide") as bar:
        for ref, tf, ff in zip(refs, tile_futures, feature_futures, strict=True):
            tiled = _outcome(ref, tf)
            outcomes.append(tiled if tiled.status == "failed" else _outcome(ref, ff))
            bar.update()
    _log(outcomes)
    summary = {
        "step": "features",
        "seconds": round(time.perf_counter() - start, 2),
        "task_runner": _runner_name(),
        "features_dir": str(root),
        "extractor": extractor.name,
        "weights": extractor.weights,
        "feature_dim": extractor.dim,
        "device": str(extractor.device),
        "tiles": tiles.model_dump(mode="json"),
        "features": features.model_dump(mode="json"),
    }
    write_report(features.report, outcomes, summary)
    return outcomes


def run(which: str, tiles: TilesConfig, features: FeaturesConfig | None = None, dask=None) -> State:
    """Run a flow and return its final state.

    Args:
        which: ``tiles`` or ``features``.
        tiles: the tiles section.
        features: the features section (for ``features``).
        dask: a parsed ``--dask`` value (:func:`wsimil.extract.runners.parse_dask`): None for
            ``concurrent_slides`` task threads, N for a local cluster of N worker processes,
            or a scheduler address.
    """
    from wsimil.extract.runners import api_for_workers, task_runner

    cfg = tiles if which == "tiles" else features
    runner = task_runner(dask, threads=cfg.concurrent_slides)
    with api_for_workers(dask):
        if which == "tiles":
            return select_tiles.with_options(task_runner=runner)(tiles=tiles, return_state=True)
        return extract_features.with_options(task_runner=runner)(
            tiles=tiles, features=features, return_state=True
        )
