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
    fast_exit.py the process's end, without the interpreter's 2-3 s teardown
"""

from __future__ import annotations

# isort: off
from wsimil.cli import fast_exit  # first: its exit handler must run after every later one

# isort: on
import typer

from wsimil import cpu_isa
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
    """The ``wsimil`` command; the process then ends without the interpreter's teardown.

    First of all, the CPU kernels are pinned (:mod:`wsimil.cpu_isa`), before any command
    can run a torch kernel.
    """
    try:
        cpu_isa.pin()
    except cpu_isa.CpuIsaError as exc:
        typer.echo(f"error: {exc}", err=True)
        fast_exit.arm(2)
        raise SystemExit(2) from None
    try:
        app()
    except SystemExit as exc:
        fast_exit.arm(fast_exit.exit_status(exc.code))
        raise
    except KeyboardInterrupt:
        raise  # not armed: Python ends the process by SIGINT, as a shell expects
    except BaseException:
        fast_exit.arm(1)  # an uncaught error: Python prints its traceback, the status is 1
        raise
    else:
        fast_exit.arm(0)
