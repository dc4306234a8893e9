"""The tissue rule: every tile on the tissue mask (SPEC §1b, `tiles.rule: tissue`).

1. Segment the tissue (:mod:`wsimil.extract.tissue`).
2. Lay a grid at ``tissue.mpp`` (any magnification): tile side ``tile_px``, stride
   ``tile_px - overlap_px``, whole tiles only, origin at level-0 (0, 0).
3. A tile's tissue fraction is the exact share of its level-0 footprint covered by the mask
   (each mask pixel a ``d × d`` level-0 square; the overlap is computed as separable
   interval lengths, ``Wy · M · Wxᵀ``). Keep every tile with fraction ≥ ``min_tissue``,
   in row-major order. These are the cache's "20x" tiles (the scale single-scale models
   read; at another ``mpp`` the folder keeps its name and ``target_mpp`` says the truth).
4. For DMSMIL's second scale, each kept tile's parent is the tile of a non-overlapping
   ``tile_px`` grid at ``2 · mpp`` (10× for a 20× grid) that holds the kept tile's centre.
   The "10x" bag holds every distinct parent once, row-major; ``parent_index`` maps each
   kept tile to its parent's row. So under this rule DMSMIL sees every tissue tile at 20×
   and every 10× tile above them (no random child draw; SPEC §1's quadrant draw is only
   for the top-K rule).

Beside ``<tiles_dir>/<slide_id>.h5`` the rule writes ``<tiles_dir>/tissue/<slide_id>``
``.mask.png`` (the mask), ``.geojson`` (contours in level-0 px, QuPath-importable) and
``.qc.png`` (thumbnail with contours and kept tiles).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from wsimil.extract.geojson import contour_collection, write_geojson
from wsimil.extract.ids import under
from wsimil.extract.slide import Scale, Slide
from wsimil.extract.tissue import TissueMask, qc_thumbnail, tissue_mask, write_png

log = logging.getLogger(__name__)

# The version of the tissue rule above, recorded as ``tiles_code_version`` with the tissue
# settings. Bump it by hand when the same slide and settings would keep other tiles.
TISSUE_RULE = 1
FRACTION_SLACK = 1e-9  # float rounding never drops a tile exactly at min_tissue
QC_SUFFIXES = (".mask.png", ".geojson", ".qc.png")


def tissue_scales(slide: Slide, tissue_cfg) -> tuple[Scale, Scale]:
    """How the grid's tiles ("20x", at ``mpp``) and their parents ("10x", at 2·mpp) are read.

    ``tissue_cfg``: a ``TissueConfig`` or its fields as a dict.
    """
    get = tissue_cfg.get if isinstance(tissue_cfg, dict) else tissue_cfg.__getattribute__
    mpp, tile_px = float(get("mpp")), int(get("tile_px"))
    return slide.scale("10x", tile_px, mpp=2 * mpp), slide.scale("20x", tile_px, mpp=mpp)


def interval_overlap(starts: np.ndarray, length: float, d: float, n_cells: int) -> np.ndarray:
    """(len(starts), n_cells): length of ``[s, s + length)`` inside each ``[j·d, (j+1)·d)``."""
    lo = np.arange(n_cells) * d  # (n_cells,)
    a = np.maximum(starts[:, None], lo[None, :])
    b = np.minimum(starts[:, None] + length, lo[None, :] + d)
    return np.clip(b - a, 0, None)


def tissue_fractions(
    mask: np.ndarray, d: float, x0: np.ndarray, y0: np.ndarray, side: float
) -> np.ndarray:
    """(len(y0), len(x0)) share of each ``side`` square at level-0 (x0[c], y0[r]) under ``mask``.

    Args:
        mask: (h, w) bool; pixel (i, j) covers level-0 ``[j·d, (j+1)·d) × [i·d, (i+1)·d)``.
        d: level-0 px per mask pixel.
        x0, y0: level-0 left and top edges of the grid's columns and rows.
        side: tile side in level-0 px.
    """
    wx = interval_overlap(np.asarray(x0, np.float64), side, d, mask.shape[1])  # (cols, w)
    wy = interval_overlap(np.asarray(y0, np.float64), side, d, mask.shape[0])  # (rows, h)
    covered = wy @ mask.astype(np.float64) @ wx.T  # (rows, cols) level-0 px² of tissue
    return covered / (side * side)


def grid_edges(extent_level0: int, step_level0: float, side_level0: float) -> np.ndarray:
    """Level-0 starts of the whole tiles along one axis (row-major index order)."""
    n = int(np.floor((extent_level0 - side_level0) / step_level0 + 1e-9)) + 1
    return np.arange(max(n, 0)) * step_level0


def select_tissue_tiles(slide: Slide, cfg):
    """The tissue rule on one slide.

    Args:
        slide: an open slide.
        cfg: ``TilesConfig`` with ``rule: tissue``.

    Returns:
        The :class:`wsimil.extract.tiles.Selection` and the :class:`TissueMask`.

    Raises:
        SlideError: the slide is smaller than one tile, or no tile has enough tissue.
    """
    from wsimil.extract.tiles import Selection, selection_provenance

    t = cfg.tissue
    ref = slide.ref
    start = time.perf_counter()
    tm = tissue_mask(slide, t)
    s10, s20 = tissue_scales(slide, t)
    side = s20.tile_size_level0
    step = (t.tile_px - t.overlap_px) * s20.downsample
    w0, h0 = slide.dimensions
    xs, ys = grid_edges(w0, step, side), grid_edges(h0, step, side)
    if len(xs) * len(ys) == 0:
        raise ref.error(
            f"is smaller than one tile of {t.tile_px} px at {t.mpp:g} µm/px "
            f"({side:.0f} level-0 px); lower tiles.tissue.tile_px"
        )
    fraction = tissue_fractions(tm.mask, tm.downsample, xs, ys, side)  # (rows, cols)
    rows, cols = np.nonzero(fraction >= t.min_tissue - FRACTION_SLACK)  # row-major
    if len(rows) == 0:
        raise ref.error(
            f"has no tissue tile: none of its {fraction.size} tiles is {t.min_tissue:g} tissue "
            f"(mask: {tm.tissue_fraction:.1%} of the slide); check the file, lower "
            "tiles.tissue.min_tissue or drop it from slides.csv"
        )
    grid20 = np.stack([cols, rows], axis=1).astype(np.int64)  # (K, 2) (col, row)
    coords20 = np.rint(grid20 * step).astype(np.int64)  # (K, 2) level-0 (x, y)
    centre = coords20 + side / 2
    parent_cell = np.floor(centre / s10.tile_size_level0).astype(np.int64)  # (K, 2)
    n_parent_cols = int(parent_cell[:, 0].max()) + 1
    key = parent_cell[:, 1] * n_parent_cols + parent_cell[:, 0]  # row-major
    uniq, parent_index = np.unique(key, return_inverse=True)
    grid10 = np.stack([uniq % n_parent_cols, uniq // n_parent_cols], axis=1).astype(np.int64)
    coords10 = s10.origins(grid10)
    p_side = s10.tile_size_level0  # the parents' tissue shares, from their whole grid
    p_edges = [np.arange(int(grid10[:, i].max()) + 1) * p_side for i in (0, 1)]
    parent_grid = tissue_fractions(tm.mask, tm.downsample, *p_edges, p_side)  # (rows, cols)
    parent_fraction = parent_grid[grid10[:, 1], grid10[:, 0]]  # (P,)
    sel = Selection(
        slide_id=ref.slide_id,
        grid_10x=grid10,
        coords_10x=coords10,
        density=parent_fraction.astype(np.float32),
        grid_20x=grid20,
        coords_20x=coords20,
        parent_index=parent_index.reshape(-1).astype(np.int64),
        n_grid=int(fraction.size),
        n_tissue=len(grid20),
        attrs=selection_provenance(slide, cfg),
    )
    log.info(
        "slide %s: mask %.1f%% tissue, kept %d of %d tiles (%d parents, %.2f s)",
        ref.slide_id, 100 * tm.tissue_fraction, len(grid20), fraction.size, len(grid10),
        time.perf_counter() - start,
    )  # fmt: skip
    return sel, tm


def qc_paths(tiles_dir: Path, slide_id: str) -> dict[str, Path]:
    """``<tiles_dir>/tissue/<slide_id>{.mask.png,.geojson,.qc.png}`` by suffix."""
    return {s: under(Path(tiles_dir) / "tissue", slide_id, s) for s in QC_SUFFIXES}


def write_tissue_outputs(tiles_dir: Path, sel, tm: TissueMask, tile_size_level0: float) -> None:
    """The mask, its GeoJSON contours and the QC thumbnail of one slide (each atomic)."""
    paths = qc_paths(tiles_dir, sel.slide_id)
    write_png(paths[".mask.png"], tm.mask.astype(np.uint8) * 255)
    write_geojson(paths[".geojson"], contour_collection(tm.polygons, "Tissue"))
    write_png(paths[".qc.png"], qc_thumbnail(tm, sel.coords_20x, tile_size_level0))
