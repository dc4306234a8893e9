"""Reading the tables people write by hand (``slides.csv``): one-line errors with a line.

Both the slide table (``wsimil tiles``/``features``) and the cohort table (``splits``,
``crossval``) are read by :func:`read_table`, so an empty file, bytes that are not UTF-8, a
row with too many fields, a missing column, an empty cell, an unsafe or a repeated
``slide_id`` give the same message whichever command meets them first. Line numbers are
those of the file (line 1 is the header), counted by the :mod:`csv` module, so blank lines
and quoted line breaks do not shift them.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pandas as pd
from pandas._libs.parsers import STR_NA_VALUES  # pandas' default missing-value strings

from wsimil.extract.ids import id_problem

TRIMMED = ("slide_id", "patient_id", "label")  # surrounding spaces are typing accidents


class TableError(ValueError):
    """A table that cannot be used; the message names the file, the line or column, the fix."""


def read_table(
    path: Path, required: tuple[str, ...], *, missing_hint: str, dtype: dict | None = None
) -> pd.DataFrame:
    """Read a comma-separated table with a ``slide_id`` column, checked row by row.

    Args:
        path: the file.
        required: columns that must exist and have no empty cell.
        missing_hint: the message when the file does not exist (after the path).
        dtype: pandas dtypes by column (``slide_id`` and :data:`TRIMMED` are read as str).

    Returns:
        The table, with :data:`TRIMMED` columns stripped of surrounding spaces and
        ``table.attrs["lines"]`` the file line of each row.

    Raises:
        TableError: the file is missing, empty, not UTF-8, header-only or malformed, lacks
            a required column or value, or has an unsafe or repeated ``slide_id``.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TableError(f"{path}: {missing_hint}") from None
    except OSError as exc:
        raise TableError(
            f"{path}: cannot be read ({exc.strerror}); check its permissions"
        ) from None
    text = _decode(path, data)
    rows, lines = _records(path, text)
    if not rows:
        raise TableError(
            f"{path}: empty file; it needs a header line ({', '.join(required)}) and one row "
            "per slide"
        )
    header = rows[0]
    missing = sorted(set(required) - {h.strip() for h in header})
    if missing:
        raise TableError(f"{path}: missing column(s) {missing}; {_header_hint(text, header)}")
    for row, line in zip(rows[1:], lines[1:], strict=True):
        if len(row) > len(header):
            raise TableError(
                f"{path}: line {line} has {len(row)} fields, the header {len(header)}; quote "
                "values that contain a comma or remove the extra field"
            )
    if len(rows) == 1:
        raise TableError(f"{path}: header only, no rows; add one line per slide below line 1")
    strings = {c: str for c in ("slide_id", *TRIMMED)}
    try:
        table = pd.read_csv(
            io.StringIO(text),
            dtype={**(dtype or {}), **strings},
            keep_default_na=False,  # in the id and label columns "NA" or "None" is text
            na_values={h: [""] if h.strip() in strings else STR_NA_VALUES for h in header},
        )
    except (pd.errors.ParserError, ValueError) as exc:
        raise TableError(f"{path}: {str(exc).strip().splitlines()[-1]}") from None
    table.columns = [str(c).strip() for c in table.columns]
    lines = lines[1:] if len(lines) == len(table) + 1 else [i + 2 for i in range(len(table))]
    table.attrs["lines"] = lines
    raw_ids = table["slide_id"].copy() if "slide_id" in table.columns else None
    for column in TRIMMED:
        if column in table.columns:
            table[column] = table[column].str.strip()
    for column in required:
        values = table[column]
        empty = values.isna() | (values.astype(str).str.strip() == "")
        if empty.any():
            at = [lines[i] for i in empty.to_numpy().nonzero()[0][:5]]
            raise TableError(
                f"{path}: empty {column} on line(s) {at}; fill it in or remove the row"
            )
    _check_ids(path, table["slide_id"], raw_ids, lines)
    return table


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Excel's "CSV UTF-8") is fine
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise TableError(
            f"{path}: line {line}, column {column}: byte 0x{data[exc.start]:02x} is not UTF-8; "
            "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`)"
        ) from None


def _records(path: Path, text: str) -> tuple[list[list[str]], list[int]]:
    """The non-blank records and the file line each starts on (pandas skips blank lines)."""
    rows, lines, end = [], [], 0
    reader = csv.reader(io.StringIO(text))
    try:
        for row in reader:
            start, end = end + 1, reader.line_num
            if any(cell.strip() for cell in row):
                rows.append(row)
                lines.append(start)
    except csv.Error as exc:
        raise TableError(f"{path}: line {reader.line_num}: {exc}; fix the quoting") from None
    return rows, lines


def _header_hint(text: str, header: list[str]) -> str:
    first = text.splitlines()[0] if text else ""
    for sep, name in ((";", "semicolon"), ("\t", "tab")):
        if len(header) == 1 and sep in first:
            return f"line 1 looks {name}-separated; save it comma-separated"
    return f"line 1 (the header) has {[h.strip() for h in header]}; add or rename the column"


def _check_ids(path: Path, ids: pd.Series, raw: pd.Series, lines: list[int]) -> None:
    """Every slide_id names a file, and no two rows name the same one."""
    seen: dict[str, int] = {}
    for i, sid in enumerate(ids):
        problem = id_problem(sid)
        if problem:
            raise TableError(f"{path}: line {lines[i]}: {problem}; rename the slide")
        if sid in seen:
            j = seen[sid]
            same = raw.iloc[i] == raw.iloc[j]
            what = repr(sid) if same else f"{raw.iloc[j]!r} and {raw.iloc[i]!r} (both {sid!r})"
            raise TableError(
                f"{path}: slide_id repeated: {what} on lines {lines[j]} and {lines[i]} (ids "
                "name the cache files); give each slide its own id or remove the row"
            )
        seen[sid] = i
