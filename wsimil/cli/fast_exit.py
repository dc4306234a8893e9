"""End a CLI process without Python's interpreter teardown (standard library only).

A command that imported torch, MLflow, scikit-learn and matplotlib spends 2-3 s after its
last line tearing down modules and freeing objects one by one (measured on the 2-core
machine: 2.8 s for `import wsimil.experiment.project` alone), time every `dvc repro` stage
and every CLI test pays. The operating system frees all of it at once.

:func:`arm` is called by ``wsimil.cli.main`` with the exit status. The handler it arms is
registered when ``wsimil.cli`` is imported, before typer or any heavy library, so it runs
*last* of the exit handlers: MLflow's run ending, h5py's file closing, logging's flush and
multiprocessing's child clean-up all run first, and non-daemon threads have been joined
before any exit handler runs. It then flushes stdout and stderr and calls ``os._exit``. A
process that imports ``wsimil.cli`` without calling ``main`` (the tests' CLI runner) never
arms it and exits normally.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys

_status: list[int] = []  # set by arm(): the process exits with it, skipping the teardown


def exit_status(code: object) -> int:
    """The status Python would exit with for ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    return 1  # a message: Python printed it to stderr, and exits with 1


def arm(code: int) -> None:
    """Make this process end with ``code`` right after the other exit handlers."""
    _status[:] = [code]


def _exit_now() -> None:
    if not _status:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            stream.flush()  # a closed or replaced stream has nothing left to write
    os._exit(_status[0])


atexit.register(_exit_now)
