"""Per-run reports: one row per slide with its status and, for failures, the error.

A cohort run never stops at a bad slide; it records the failure here and the command
exits non-zero at the end.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

STATUSES = ("done", "cached", "failed")  # computed now | up to date, skipped | error


@dataclass(frozen=True)
class SlideOutcome:
    slide_id: str
    slide_path: str
    status: str  # one of STATUSES
    error: str = ""
    n_tiles: int = 0  # kept 10x tiles (= 20x children)
    n_tissue_tiles: int = 0
    fewer_than_top_k: bool = False
    seconds: float = 0.0
    note: str = ""  # e.g. a damaged cache that was recomputed


def write_report(path: Path, outcomes: list[SlideOutcome], summary: dict) -> None:
    """Write ``path`` (CSV, one row per slide) and the same stem ``.json`` (summary + rows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [asdict(o) for o in outcomes]
    counts = {s: sum(o.status == s for o in outcomes) for s in STATUSES}
    tmp = path.with_name(f".{path.name}.tmp")
    pd.DataFrame(rows, columns=list(SlideOutcome.__dataclass_fields__)).to_csv(tmp, index=False)
    os.replace(tmp, path)
    doc = {**summary, "n_slides": len(outcomes), **{f"n_{s}": n for s, n in counts.items()}}
    doc["slides"] = rows
    tmp = path.with_name(f".{path.stem}.json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, path.with_suffix(".json"))
