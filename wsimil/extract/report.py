"""Per-run reports: one row per slide with its status and, for failures, the error.

A cohort run never stops at a bad slide; it records the failure here and the command
exits non-zero at the end.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from wsimil.atomic import write_json, write_text

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
    rows = [asdict(o) for o in outcomes]
    counts = {s: sum(o.status == s for o in outcomes) for s in STATUSES}
    table = pd.DataFrame(rows, columns=list(SlideOutcome.__dataclass_fields__))
    write_text(path, table.to_csv(index=False))
    doc = {**summary, "n_slides": len(outcomes), **{f"n_{s}": n for s, n in counts.items()}}
    doc["slides"] = rows
    write_json(path.with_suffix(".json"), doc, indent=2, default=str)
