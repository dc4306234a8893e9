"""The command line: one short command per pipeline stage.

This is the only module that reads ``params.yaml``. Each command validates its section,
resolves paths against the project root (the folder holding params.yaml) and calls one
function of the package.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from wsimil.config import ConfigError, Params, load_params

app = typer.Typer(
    help="wsimil: slides → tiles → features → MIL models → cross-validated, tracked runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOption = Annotated[
    Path, typer.Option("--params", "-p", help="the params file; its folder is the project root")
]


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def project(params_path: Path) -> tuple[Params, Path]:
    """Validate params.yaml and apply the runtime defaults; exit with one clear line if bad."""
    from wsimil.runtime import apply_runtime_defaults

    try:
        params = load_params(params_path)
    except ConfigError as exc:
        fail(str(exc))
    root = params_path.resolve().parent
    apply_runtime_defaults(root)
    return params, root


@app.command()
def doctor(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Check params.yaml and print versions, device and where runs are tracked."""
    params, root = project(params_path)
    import os

    import torch

    from wsimil import __version__

    typer.echo(f"wsimil {__version__}  python {sys.version.split()[0]}  torch {torch.__version__}")
    cuda = torch.cuda.is_available()
    typer.echo(f"device: {'cuda (' + torch.cuda.get_device_name(0) + ')' if cuda else 'cpu'}")
    typer.echo(f"project root: {root}")
    typer.echo(f"params: {params_path} ({len(type(params).model_fields)} sections, valid)")
    typer.echo(f"MLflow tracking: {os.environ['MLFLOW_TRACKING_URI']}")


@app.command()
def synth(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Write the synthetic demo cohort: pyramidal TIFF slides, masks and slides.csv."""
    params, root = project(params_path)
    from wsimil.synth import write_cohort

    cfg = params.synth
    out_dir = root / cfg.out_dir
    import os

    table = write_cohort(cfg, out_dir, n_jobs=os.cpu_count() or 1)
    n_pos = int((table["label"] != "normal").sum())
    typer.echo(f"wrote {len(table)} slides ({n_pos} with tumour) to {out_dir}")


@app.command()
def splits(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Write the patient-grouped, stratified folds every model family shares."""
    params, root = project(params_path)
    import pandas as pd

    from wsimil.splits import SplitError, make_splits, write_splits

    cfg = params.crossval
    csv = root / cfg.cohort_csv
    if not csv.exists():
        fail(f"{csv}: no cohort table; run `wsimil synth` or point crossval.cohort_csv at one")
    table = pd.read_csv(csv)
    try:
        doc = make_splits(table, cfg.n_folds, cfg.val_folds, cfg.seed)
    except SplitError as exc:
        fail(f"{csv}: {exc}")
    write_splits(doc, root / cfg.splits_path)
    sizes = ", ".join(f"{len(f['train'])}/{len(f['val'])}/{len(f['test'])}" for f in doc["folds"])
    typer.echo(f"wrote {cfg.n_folds} folds (train/val/test slides: {sizes}) to {cfg.splits_path}")


def main() -> None:
    app()
