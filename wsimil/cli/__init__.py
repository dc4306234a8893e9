"""The command line: one short command per pipeline stage.

This package is the only reader of ``params.yaml``. Every command takes ``--params`` and
``-S KEY=VALUE``; :func:`wsimil.cli.options.project` validates the file once, makes its
paths absolute under the project root (the folder holding it,
:meth:`wsimil.config.Params.under`), and the command calls one function of its stage,
then prints what it did. One module per stage group:

    options.py   the shared options (--params, -S/--set, --preset, --model), the loader, fail()
    project.py   init, doctor, models, presets
    extract.py   synth, tiles, features, extractors
    train.py     splits, crossval, tune, ablate, reproduce
    registry.py  register, predict, evaluate
"""

from __future__ import annotations

import typer

from wsimil.cli import extract, project, registry, train

app = typer.Typer(
    help="wsimil: slides → tiles → features → MIL models → cross-validated, tracked runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# `wsimil --help` lists the commands in this order.
for command in (
    project.doctor,
    extract.synth,
    extract.tiles,
    extract.features,
    train.splits,
    train.crossval,
    train.tune,
    train.ablate,
    registry.register,
    project.models,
    project.presets,
    extract.extractors,
    train.reproduce,
    project.init,
    registry.predict,
    registry.evaluate,
):
    app.command()(command)


def main() -> None:
    app()
