"""Slide ids are file names: what is allowed, and output paths that stay in their folder.

A slide id names its cache files (``<tiles_dir>/<slide_id>.h5``, ``<features>/20x/<slide_id>.h5``)
and heatmaps, so an id such as ``../../escape`` would write outside the project and two
ids that differ only in surrounding spaces would overwrite each other. Ids are therefore
checked where ``slides.csv`` is read (:func:`id_problem`), and every path built from one
goes through :func:`under`, which refuses anything but a plain name in its folder.
"""

from __future__ import annotations

import re
from pathlib import Path

MAX_ID_CHARS = 200  # file systems allow 255 bytes; leave room for suffixes and temporaries
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
ALLOWED = (
    f"letters, digits, '.', '_' and '-', not starting with '.', at most {MAX_ID_CHARS} characters"
)


class UnsafePathError(ValueError):
    """A name that would leave its output folder; the message names the name and the folder."""


def id_problem(slide_id: str) -> str | None:
    """Why ``slide_id`` cannot name a file (None when it can)."""
    if not SAFE_NAME.fullmatch(slide_id):
        return f"slide_id {slide_id!r} is not a safe file name (allowed: {ALLOWED})"
    if len(slide_id) > MAX_ID_CHARS:
        return f"slide_id {slide_id[:20]!r}... has {len(slide_id)} characters (allowed: {ALLOWED})"
    return None


def under(folder: Path, name: str, suffix: str = "") -> Path:
    """``folder / (name + suffix)``, refused unless ``name`` is one plain file-name component.

    The check is on the name, not on the resolved path, so a file that DVC has linked into
    its cache (a symlink out of ``folder``) is still written in place.

    Raises:
        UnsafePathError: ``name`` has a separator, is ``.``/``..``, starts with a dot, has
            characters outside :data:`ALLOWED`, or the file name is over 255 bytes.
    """
    folder = Path(folder)
    path = folder / f"{name}{suffix}"
    if not SAFE_NAME.fullmatch(name) or len(path.name.encode()) > 255 or path.parent != folder:
        raise UnsafePathError(
            f"refusing to write {name!r}{suffix} under {folder}: not a plain file name "
            f"(allowed: {ALLOWED}); rename it in slides.csv"
        )
    return path
