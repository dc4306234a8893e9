"""A project and what it offers: ``init``, ``doctor``, ``models``, ``presets``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from wsimil.cli.options import ParamsOption, PresetOption, SetOption, fail, project
from wsimil.config import ConfigError


def doctor(
    sets: SetOption = None,
    preset: PresetOption = None,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """Check params.yaml and print versions, device and where runs are tracked."""
    params, root = project(params_path, sets, preset)
    import os

    import torch

    from wsimil import __version__, cpu_isa

    typer.echo(f"wsimil {__version__}  python {sys.version.split()[0]}  torch {torch.__version__}")
    cuda = torch.cuda.is_available()
    typer.echo(f"device: {'cuda (' + torch.cuda.get_device_name(0) + ')' if cuda else 'cpu'}")
    typer.echo(f"CPU kernels: {cpu_isa.in_use()} ({cpu_isa.cpu_model()}; {cpu_isa.ENV})")
    typer.echo(f"project root: {root}")
    typer.echo(f"params: {params_path} ({len(type(params).model_fields)} sections, valid)")
    typer.echo(f"MLflow tracking: {os.environ['MLFLOW_TRACKING_URI']}")


def models(
    sets: SetOption = None,
    preset: PresetOption = None,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """List the model families --model takes: scales, config section, instance score, paper."""
    params, _ = project(params_path, sets, preset)
    from wsimil.models import MODELS

    rows = [("family", "scales", "config", "primary score", "paper")]
    for name, cls in MODELS.items():
        scales = "+".join(cls.scales(params.model))
        rows.append((name, scales, f"model.{cls.config_key}", cls.primary_score, cls.paper))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for *cols, paper in rows:
        typer.echo("  ".join([*(c.ljust(w) for c, w in zip(cols, widths, strict=True)), paper]))
    typer.echo(f"default: {params.model.name} (model.name); pick one with --model")


def presets(
    name: Annotated[str | None, typer.Argument(help="a preset: print its keys")] = None,
    dvc: Annotated[
        bool, typer.Option("--dvc", help="print them as `dvc exp run` -S arguments, one line")
    ] = False,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """List the presets (a paper's protocol as a params overlay), or show one.

    `wsimil crossval --preset dtfd-mil` runs with one; for a DVC experiment:
    `dvc exp run $(wsimil presets dtfd-mil --dvc)`.
    """
    from wsimil import presets as known
    from wsimil.config import read_mapping

    root = params_path.resolve().parent
    if name is None:
        for preset in known.names(root):
            first = (root / known.PRESETS_DIR / f"{preset}.yaml").read_text().splitlines()[:1]
            typer.echo(f"{preset:16s} {first[0].lstrip('# ') if first else ''}")
        return
    try:
        path = known.preset_file(root, name)
        if dvc:
            typer.echo(" ".join(known.dvc_set_args(path)))
            return
        for key, value in known.flatten(read_mapping(path, allow_empty=False)).items():
            typer.echo(f"{key}={value}")
    except ConfigError as exc:
        fail(str(exc))


def init(
    target: Annotated[Path, typer.Argument(help="the new project folder")],
    slides: Annotated[Path, typer.Option("--slides", help="the folder holding the slide files")],
    labels: Annotated[
        Path, typer.Option("--labels", help="a CSV: one row per slide, its id and label")
    ],
    slide_column: Annotated[str, typer.Option(help="slide id (file name, suffix optional)")] = (
        "slide_id"
    ),
    label_column: Annotated[str, typer.Option()] = "label",
    patient_column: Annotated[
        str | None, typer.Option(help="patient id (default: each slide is its own patient)")
    ] = None,
    dvc_add: Annotated[
        bool,
        typer.Option(
            "--dvc-add", help="copy the slides into the project and track them with `dvc add`"
        ),
    ] = False,
) -> None:
    """Scaffold a project for your own slides: params.yaml, dvc.yaml, DVC remote, README."""
    import shutil

    from wsimil.experiment.scaffold import InitError, cohort_table, init_project

    dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    try:
        table = cohort_table(
            slides, labels, slide_column=slide_column, label_column=label_column,
            patient_column=patient_column,
        )  # fmt: skip
        where = init_project(target, table, dvc_add=dvc_add, dvc=dvc)
    except InitError as exc:
        for problem in exc.problems:
            typer.echo(f"error: {problem}", err=True)
        typer.echo("nothing written", err=True)
        raise typer.Exit(2) from None
    counts = table["label"].value_counts().sort_index()
    typer.echo(
        f"wrote {where}: {len(table)} slides ({', '.join(f'{k} {v}' for k, v in counts.items())})"
        f", {table['patient_id'].nunique()} patients; next: cd {target} && dvc repro"
    )
