"""The served model's request contract: one row per bag, checked before any model runs.

Columns (``<s>`` is each scale the model reads: ``20x`` for DTFD-MIL, ``10x`` and ``20x``
for DMSMIL), every one optional:

    bag_id             str    echoed in the answer (default bag<i>); with slide_path it is
                              the slide id that seeds the 20x child draw (default: the
                              file name without suffix), as slide_id in slides.csv does
    features_<s>       (N, D) numbers, JSON rows
    features_<s>_npy   str    base64 of the bytes ``np.save`` writes, for large bags;
                              float16 halves the payload and is read exactly (as float32)
    grid_<s>           (N, 2) int (col, row) tile grid positions (DMSMIL needs them)
    coords_<s>         (N, 2) int level-0 (x, y), echoed with the top instance scores
    slide_path         str    a slide file under the server's WSIMIL_SERVE_SLIDE_ROOT; the
                              model then selects and embeds the tiles itself

A bag gives either ``slide_path`` or, for every scale, exactly one of ``features_<s>`` and
``features_<s>_npy``. Every problem raises :class:`RequestError` naming the bag, the field
and what to send instead; its ``status`` is the HTTP code (400, 403 or 404). Knows nothing
of MLflow.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


class RequestError(ValueError):
    """A request the model refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_instances: int  # per bag and scale
    max_bags: int  # per request
    max_grid_cells: int  # extent of a bag's tile grid (DMSMIL allocates it densely)


@dataclass(frozen=True)
class BagRequest:
    """One parsed bag: features per scale, or a slide to embed."""

    bag_id: str
    x: tuple[np.ndarray, ...] | None = None  # (N_s, D_s) float32 per scale
    grid: tuple[np.ndarray, ...] | None = None  # (N_s, 2) int64 per scale
    coords: tuple[np.ndarray | None, ...] | None = None  # (N_s, 2) int64 per scale
    slide_path: Path | None = None


def feature_columns(scale: str) -> tuple[str, str]:
    return f"features_{scale}", f"features_{scale}_npy"


def parse_bags(
    table: pd.DataFrame,
    scales: tuple[str, ...],
    in_dims: tuple[int, ...],
    limits: Limits,
    *,
    needs_grid: bool,
    slide_root: Path | None,
) -> list[BagRequest]:
    """Every row of ``table`` as a checked :class:`BagRequest`.

    Raises:
        RequestError: the first problem found, naming the bag and the field.
    """
    if len(table) == 0:
        raise RequestError("the request holds no bag; send one row per bag")
    if len(table) > limits.max_bags:
        raise RequestError(
            f"the request holds {len(table)} bags, more than this server's cap of "
            f"{limits.max_bags} (serve.max_bags); split it into several requests"
        )
    bags = []
    for i, (_, row) in enumerate(table.iterrows()):
        bag_id = _cell(row, "bag_id")
        slide = _cell(row, "slide_path")
        if bag_id is None:  # a slide's id seeds its 20x child draw (wsimil.extract.tiles)
            bag_id = Path(str(slide)).stem if slide is not None else f"bag{i}"
        bags.append(_parse_row(row, str(bag_id), scales, in_dims, limits, needs_grid, slide_root))
    return bags


def _parse_row(row, bag_id, scales, in_dims, limits, needs_grid, slide_root) -> BagRequest:
    given = [c for s in scales for c in feature_columns(s) if _cell(row, c) is not None]
    slide = _cell(row, "slide_path")
    if slide is not None:
        if given:
            raise RequestError(
                f"bag {bag_id!r}: give slide_path or features, not both (also got "
                f"{', '.join(given)})"
            )
        return BagRequest(bag_id, slide_path=resolve_slide_path(slide, slide_root))
    xs, grids, coords = [], [], []
    for scale, dim in zip(scales, in_dims, strict=True):
        x = _scale_features(row, bag_id, scale, dim, limits)
        xs.append(x)
        grids.append(_positions(row, f"grid_{scale}", bag_id, len(x)))
        coords.append(_positions(row, f"coords_{scale}", bag_id, len(x)))
    if any(g is not None for g in grids) and not all(g is not None for g in grids):
        raise RequestError(f"bag {bag_id!r}: give grid_<scale> for every scale or for none")
    if needs_grid and grids[0] is None:
        names = ", ".join(f"grid_{s}" for s in scales)
        raise RequestError(
            f"bag {bag_id!r}: this model places instances on the tile grid; send {names} "
            "((N, 2) (col, row) per instance, the 'grid' dataset of the feature cache)"
        )
    for scale, g in zip(scales, grids, strict=True):
        if g is not None:
            _check_grid_extent(g, bag_id, f"grid_{scale}", limits.max_grid_cells)
    has_grid = grids[0] is not None
    return BagRequest(bag_id, tuple(xs), tuple(grids) if has_grid else None, tuple(coords))


def _scale_features(row: pd.Series, bag_id: str, scale: str, dim: int, limits: Limits):
    """The checked (N, dim) float32 features of one scale, from JSON rows or base64 .npy."""
    json_col, npy_col = feature_columns(scale)
    as_json, as_npy = _cell(row, json_col), _cell(row, npy_col)
    if as_json is None and as_npy is None:
        raise RequestError(
            f"bag {bag_id!r}: no features for scale {scale}; send {json_col} (JSON rows), "
            f"{npy_col} (base64 .npy) or slide_path"
        )
    if as_json is not None and as_npy is not None:
        raise RequestError(f"bag {bag_id!r}: give {json_col} or {npy_col}, not both")
    if as_json is not None:
        return check_features(
            _json_features(as_json, bag_id, json_col), bag_id, json_col, dim, limits
        )
    x = decode_npy(as_npy, bag_id, npy_col, dim, limits.max_instances)
    return check_features(x, bag_id, npy_col, dim, limits)


def _cell(row: pd.Series, name: str):
    """The cell, or None when the column is absent or the cell is empty (None/NaN)."""
    if name not in row.index:
        return None
    value = row[name]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _json_features(value, bag_id: str, field: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise RequestError(
            f"bag {bag_id!r}: {field} must be a list of equally long rows of numbers"
        ) from None


def decode_npy(text, bag_id: str, field: str, dim: int, max_instances: int) -> np.ndarray:
    """A 2-D numeric array from base64 ``.npy`` bytes; the header is checked before reading."""
    if not isinstance(text, str | bytes):
        raise RequestError(f"bag {bag_id!r}: {field} must be a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(
            f"bag {bag_id!r}: {field} is not valid base64; send "
            "base64.b64encode(<bytes written by np.save>)"
        ) from None
    fp = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(fp)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, _, dtype = read_header(fp)
    except ValueError as exc:
        raise RequestError(
            f"bag {bag_id!r}: {field} is not .npy data ({exc}); encode the bytes np.save writes"
        ) from None
    check_shape(tuple(shape), bag_id, field, dim, max_instances)  # before allocating
    if dtype.hasobject or not (
        np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
    ):
        raise RequestError(
            f"bag {bag_id!r}: {field} holds {dtype}, not real numbers; send float32 or "
            "float16 features"
        )
    fp.seek(0)
    try:
        return np.load(fp, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise RequestError(f"bag {bag_id!r}: {field} is truncated or corrupt ({exc})") from None


def check_shape(shape: tuple[int, ...], bag_id: str, field: str, dim: int, max_instances: int):
    """An (N, dim) bag with 1 <= N <= ``max_instances``."""
    if len(shape) == 0 or math.prod(shape) == 0:
        raise RequestError(f"bag {bag_id!r}: {field} is empty; a bag needs at least one instance")
    if len(shape) != 2:
        raise RequestError(
            f"bag {bag_id!r}: {field} has shape {shape}; send one row of {dim} numbers per "
            "instance, shape (N, D)"
        )
    if shape[1] != dim:
        raise RequestError(
            f"bag {bag_id!r}: {field} has {shape[1]}-D features; this model reads {dim}-D "
            "features (from the extractor it was trained with)"
        )
    if shape[0] > max_instances:
        raise RequestError(
            f"bag {bag_id!r}: {field} has {shape[0]} instances, more than this server's cap of "
            f"{max_instances} (serve.max_instances); sample or split the bag"
        )


def check_features(x: np.ndarray, bag_id: str, field: str, dim: int, limits: Limits) -> np.ndarray:
    """``x`` as float32 (N, dim), finite, within the instance cap."""
    check_shape(x.shape, bag_id, field, dim, limits.max_instances)
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf
        x = x.astype(np.float32, copy=False)
    bad = ~np.isfinite(x)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise RequestError(
            f"bag {bag_id!r}: {field} has {int(bad.sum())} NaN or infinite value(s) (first at "
            f"row {r}, column {c}; float32 range); send finite features"
        )
    return x


def _positions(row: pd.Series, field: str, bag_id: str, n: int) -> np.ndarray | None:
    """An optional (n, 2) integer array (grid cells or level-0 coordinates)."""
    value = _cell(row, field)
    if value is None:
        return None
    try:
        a = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        a = np.empty((0, 0))
    if a.shape != (n, 2) or not np.isfinite(a).all() or (a != np.round(a)).any():
        raise RequestError(
            f"bag {bag_id!r}: {field} must be {n} rows of two integers, one per instance "
            f"(got shape {a.shape})"
        )
    return a.astype(np.int64)


def _check_grid_extent(grid: np.ndarray, bag_id: str, field: str, max_cells: int) -> None:
    span = grid.max(axis=0) - grid.min(axis=0) + 1  # (cols, rows) the bag's tiles span
    if int(span[0]) * int(span[1]) > max_cells:
        raise RequestError(
            f"bag {bag_id!r}: {field} spans {int(span[0])} x {int(span[1])} cells, more than "
            f"{max_cells}; send tile grid positions (col, row), not pixel coordinates"
        )


def resolve_slide_path(text: str, root: Path | None) -> Path:
    """The slide file ``text`` names, which must lie under ``root`` (symlinks resolved).

    Relative paths are relative to ``root``.
    """
    if root is None:
        raise RequestError(
            "slide_path is not accepted by this server: it was started without "
            "WSIMIL_SERVE_SLIDE_ROOT; send features instead",
            status=403,
        )
    if not isinstance(text, str) or not text or any(ord(c) < 32 for c in text):
        raise RequestError(
            "slide_path must be a non-empty string without NUL or control characters; send "
            "the slide's path relative to the slide root"
        )
    base = Path(root).resolve()
    path = (base / text).resolve()  # an absolute ``text`` replaces ``base``
    if not path.is_relative_to(base):
        raise RequestError(
            f"slide_path {text!r} is outside the slide folder this server may read "
            "(WSIMIL_SERVE_SLIDE_ROOT); send a path under it",
            status=403,
        )
    if not path.is_file():
        raise RequestError(f"slide_path {text!r} does not exist under the slide root", status=404)
    return path
