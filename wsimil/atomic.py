"""Files written atomically: a temporary name beside the target, then one rename.

A reader (DVC, a second worker, the rerun after a crash) finds the old file or the new
one, never half of one. This module owns that rule for text files (JSON, GeoJSON, CSV);
the binary writers (HDF5 caches, PNGs, TIFFs) follow it with their own libraries.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    """``text`` at ``path`` (its folder made); the temporary ``.<name>.<pid>.tmp`` never stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, doc, **dumps) -> None:
    """``json.dumps(doc, **dumps)`` at ``path``, atomically."""
    write_text(path, json.dumps(doc, **dumps))
