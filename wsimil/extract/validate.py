"""Is a cache file's content sound? Checked when a cache is reused and when a bag is read.

Provenance attributes say which settings made a file, not that its arrays survived: a
file edited by hand, by another tool or by a disk fault can carry matching attributes and
NaN rows, a missing ``coords`` or features of another width. Each function here returns
what is wrong (one phrase, for a message that also names the slide and the file) or None.

- :func:`cache_defect`: a wsimil feature cache about to be reused ("up to date"): it is
  recomputed instead;
- :func:`selection_defect`: a tiles cache about to be reused: tiles are selected again;
- :func:`array_defect`: any bag being read (also CLAM and TRIDENT files), so that a bad
  bag is left out of a cross-validation with its path and defect named.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

SELECTION_DATASETS = ("grid_10x", "coords_10x", "density_10x", "grid_20x", "coords_20x",
                      "parent_index")  # fmt: skip
SELECTION_ATTRS = ("n_grid_tiles", "n_tissue_tiles")


def scale_datasets(sel, scale: str) -> dict[str, np.ndarray]:
    """The datasets besides ``features`` that a scale's cache holds for a selection."""
    if scale == "10x":
        return {"coords": sel.coords_10x, "grid": sel.grid_10x, "density": sel.density}
    return {"coords": sel.coords_20x, "grid": sel.grid_20x, "parent_index": sel.parent_index}


def nonfinite_rows(features: np.ndarray) -> int:
    """Rows of an (N, D) array with a NaN or an infinity."""
    return int(np.count_nonzero(~np.isfinite(features).all(axis=1))) if features.size else 0


def cache_defect(path: Path, expected: dict[str, np.ndarray], dim: int) -> str | None:
    """What is wrong with a wsimil feature cache, compared with what it should hold.

    Args:
        path: the file.
        expected: the datasets besides ``features`` (:func:`scale_datasets`); each must be
            present and equal.
        dim: the extractor's feature dimension; ``features`` must be (N, dim), N the rows
            of ``expected``.
    """
    n = len(expected["coords"])
    try:
        with h5py.File(path, "r") as f:
            for name in ("features", *expected):
                if not isinstance(f.get(name), h5py.Dataset):
                    return f"no '{name}' dataset"
            shape = f["features"].shape
            if shape != (n, dim):
                return f"features are {shape}, expected ({n}, {dim})"
            for name, want in expected.items():
                if f[name].shape != want.shape or not np.array_equal(f[name][()], want):
                    return f"'{name}' differs from the selected tiles"
            bad = nonfinite_rows(f["features"][()])
    except OSError as exc:
        return f"cannot be read ({exc})"
    return f"{bad} of {n} feature rows are not finite (NaN or inf)" if bad else None


def selection_defect(path: Path) -> str | None:
    """What is wrong with a tiles cache (:func:`wsimil.extract.tiles.write_selection`)."""
    try:
        with h5py.File(path, "r") as f:
            for name in SELECTION_DATASETS:
                if not isinstance(f.get(name), h5py.Dataset):
                    return f"no '{name}' dataset"
            for name in SELECTION_ATTRS:
                if name not in f.attrs:
                    return f"no '{name}' attribute"
            data = {name: f[name][()] for name in SELECTION_DATASETS}
            attrs = dict(f.attrs)
    except OSError as exc:
        return f"cannot be read ({exc})"
    # The top-K rule has one 20x child per 10x tile; the tissue rule every distinct parent once.
    tissue = "tissue_settings" in attrs
    n, m = len(data["parent_index"]), len(data["density_10x"])
    for name, value in data.items():
        rows = m if name.endswith("_10x") and tissue else n
        want = (rows,) if name in ("density_10x", "parent_index") else (rows, 2)
        if value.shape != want:
            return f"'{name}' is {value.shape}, expected {want}"
    if n == 0:
        return "no tiles"
    parent = data["parent_index"]
    if tissue and not (0 <= parent.min() <= parent.max() < m):
        return f"'parent_index' does not index the {m} 10x tiles"
    if not tissue and not np.array_equal(parent, np.arange(n)):
        return "'parent_index' is not 0..N-1"
    if not (np.isfinite(data["density_10x"]).all() and (data["density_10x"] > 0).all()):
        return "'density_10x' has values that are not positive numbers"
    return None


def array_defect(
    features: np.ndarray,
    coords: np.ndarray,
    grid: np.ndarray | None = None,
    parent_index: np.ndarray | None = None,
) -> str | None:
    """What is wrong with a bag's arrays as read (None when they can be used)."""
    if features.ndim != 2 or len(features) != len(coords):
        return f"features {features.shape} do not match coords {coords.shape}"
    n = len(features)
    if grid is not None and grid.shape != (n, 2):
        return f"grid {grid.shape} does not match the {n} feature rows"
    if parent_index is not None and parent_index.shape != (n,):
        return f"parent_index {parent_index.shape} does not match the {n} feature rows"
    bad = nonfinite_rows(features)
    if bad:
        return f"{bad} of {n} feature rows are not finite (NaN or inf)"
    return None


def remedy(attrs: dict) -> str:
    """What to do about a bad bag: recompute ours; another tool's file is re-made there."""
    if "code_version" in attrs:  # every wsimil cache records the code that made it
        return "; run `wsimil features` to recompute it"
    return "; not written by wsimil: re-extract it with the tool that made it or drop the slide"
