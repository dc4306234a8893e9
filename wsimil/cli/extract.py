"""Slides → tiles → features: ``synth``, ``tiles``, ``features``, ``extractors``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wsimil.cli.options import ParamsOption, PresetOption, SetOption, fail, project
from wsimil.config import Params


def synth(
    sets: SetOption = None,
    preset: PresetOption = None,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """Write the synthetic demo cohort: pyramidal TIFF slides, masks and slides.csv."""
    import os

    params, _ = project(params_path, sets, preset)
    from wsimil.synth import write_cohort

    out_dir = params.synth.out_dir
    table = write_cohort(params.synth, out_dir, n_jobs=os.cpu_count() or 1)
    n_pos = int((table["label"] != "normal").sum())
    typer.echo(f"wrote {len(table)} slides ({n_pos} with tumour) to {out_dir}")


DaskOption = Annotated[
    str | None,
    typer.Option(
        "--dask",
        envvar="WSIMIL_DASK_ADDRESS",
        show_envvar=True,
        help="run the slide tasks on Dask: a scheduler address (tcp://10.0.0.5:8786) or "
        "local:N (a cluster of N worker processes here); default: concurrent_slides threads",
    ),
]


def tiles(
    dask: DaskOption = None,
    sets: SetOption = None,
    preset: PresetOption = None,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """Select the densest 10x tiles and one 20x child each, per slide (Prefect flow)."""
    params, _ = project(params_path, sets, preset)
    _run_extraction("tiles", params, dask)


def features(
    dask: DaskOption = None,
    sets: SetOption = None,
    preset: PresetOption = None,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """Embed the selected tiles into per-slide 10x/20x HDF5 feature caches (Prefect flow)."""
    params, _ = project(params_path, sets, preset)
    _run_extraction("features", params, dask)


def _run_extraction(which: str, params: Params, dask: str | None) -> None:
    """Run an extraction flow (wsimil.extract.flows); print failures; exit 1 if one failed."""
    import importlib
    import logging
    import os

    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # a local cluster's chatter
    from wsimil.extract import flows, runners

    try:
        cluster = runners.parse_dask(dask)
        if isinstance(cluster, str):
            runners.check_scheduler(cluster)
    except runners.DaskSpecError as exc:
        fail(str(exc))

    if "PREFECT_API_URL" not in os.environ:
        # Prefect's temporary server, stopped at exit, can log a traceback for events it is
        # still flushing; nothing is lost that matters, so it stays quiet.
        os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("wsimil").setLevel(logging.INFO)
    from wsimil.extract.slide import SlideError, read_slide_table
    from wsimil.runtime import prefect_api

    try:  # a bad table is one line here, before any Prefect server starts
        read_slide_table(params.tiles.slides_csv)
    except SlideError as exc:
        fail(str(exc))
    # a temporary server, if one is needed, dies with this process; the flow's own heavy
    # imports (the slide reader; torch and timm) run while it boots
    heavy = ["wsimil.extract.tiles"]
    if which == "features":
        heavy += ["wsimil.extract.features", "wsimil.extract.extractors"]
    with prefect_api(meanwhile=lambda: [importlib.import_module(m) for m in heavy]):
        state = flows.run(which, params.tiles, params.features, dask=cluster)
        if not state.is_completed():
            fail(state.message or f"the {which} flow did not complete")
        outcomes = state.result()
    failed = [o for o in outcomes if o.status == "failed"]
    for o in outcomes:
        if o.note:
            typer.echo(f"warning: {o.note}", err=True)
    for o in failed:
        typer.echo(f"error: {o.error}", err=True)
    n = {s: sum(o.status == s for o in outcomes) for s in ("done", "cached")}
    report = (params.tiles if which == "tiles" else params.features).report
    typer.echo(
        f"{which}: {len(outcomes)} slides, {n['done']} computed, {n['cached']} up to date, "
        f"{len(failed)} failed; report {report}"
    )
    if failed:
        raise typer.Exit(1)


def extractors(
    sets: SetOption = None,
    preset: PresetOption = None,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """List the foundation-model recipes features.extractor takes, and whether their weights
    are on this machine (the local Hugging Face cache, or features.weights)."""
    params, _ = project(params_path, sets, preset)
    from wsimil.extract.recipes import listing

    rows = listing(params.features)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for *cols, licence in rows:
        typer.echo("  ".join([*(c.ljust(w) for c, w in zip(cols, widths, strict=True)), licence]))
    typer.echo("any other name is built by timm (features.extractor: resnet18, ...)")
