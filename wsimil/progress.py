"""One progress bar per long stage, on stderr, and only where someone is watching.

``wsimil tiles`` and ``wsimil features`` count slides, ``wsimil crossval`` epochs over all
folds, ``wsimil tune`` trials; each stage still ends with its one-line summary on stdout.
A bar is drawn when stderr is a terminal; in CI, DVC logs and pipes it is off, so a run over
1,000 slides adds no line at all. ``WSIMIL_PROGRESS=0`` turns bars off on a terminal too,
``WSIMIL_PROGRESS=1`` forces them on (a forced bar on a pipe redraws with carriage returns,
one line in all).

Usage::

    with progress.bar(len(refs), "tiles", "slide") as bar:
        for ref in refs:
            ...
            bar.update()
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

ENV = "WSIMIL_PROGRESS"
_ON, _OFF = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def enabled() -> bool:
    """Whether bars are drawn: ``WSIMIL_PROGRESS`` if set, else whether stderr is a terminal."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    if value:
        raise ValueError(f"{ENV}={value!r}: use 1 (bars on), 0 (off) or leave it unset")
    return sys.stderr.isatty()


def bar(total: int | None, desc: str, unit: str, *, leave: bool = True) -> tqdm:
    """A tqdm bar on stderr; a silent one (same methods, no output) when bars are off.

    Args:
        total: the number of steps (None: unknown, a counter).
        desc: the stage, shown first (``tiles``, ``dmsmil crossval``).
        unit: what one step is (``slide``, ``epoch``, ``trial``).
        leave: keep the finished bar on screen (False for a bar nested in another).
    """
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        leave=leave,
        disable=not enabled(),
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
    )
