"""Density-ranked 10× tiles and their 20× children (SPEC §1, DMSMIL §2.2).

The rule, exactly:

1. Cut the slide at 10× into a non-overlapping grid of ``tile_px`` squares (whole tiles only).
2. A tile's density is the share of its pixels with at least one of R, G, B below
   ``density_threshold`` (200). Tiles with density above ``min_density`` (0) are tissue.
3. Keep the ``top_k`` densest tissue tiles; equal densities keep row-major order. Densities
   are compared as integer pixel counts, so ties are exact.
4. Each kept tile covers a 2×2 block of 20× tiles; one of the four is its child, drawn by a
   generator seeded with (seed, slide_id). The draw is made for every grid cell at once,
   so a tile keeps its child when ``top_k`` changes.

Speed: the 10× level is decoded once, in row strips, by :func:`tile_counts`. No low-resolution
pre-pass is used: pyramid levels are separately (lossily) compressed averages, so a white
low-resolution pixel does not prove that the tile under it has no pixel below 200, and the
selection could then differ from the rule on slides with little tissue.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsimil.extract import grid
from wsimil.extract.cache import (
    SCALE_NAMES,
    Provenance,
    SlideSource,
    TileSettings,
    matches,
    read_h5,
    write_h5,
)
from wsimil.extract.ids import under
from wsimil.extract.slide import Scale, Slide, SlideRef, open_slide
from wsimil.extract.validate import selection_defect

log = logging.getLogger(__name__)

STRIP_PX = 4096  # widest region read in one call (pixels at the read level)
# The version of the rule above, recorded in every tiles and feature cache as
# ``tiles_code_version``. Bump it by hand when a change makes the same slide and settings
# keep other tiles (coords, grid, density, parent_index; this includes how
# wsimil.extract.slide reads and resizes them): caches of another version are then
# recomputed. Refactors and comment edits leave it, and the caches, alone.
# tests/test_golden.py pins what this version selects.
TILES_RULE = 1


@dataclass(frozen=True)
class Selection:
    """The kept tiles of one slide, in row-major order of their 10× grid position.

    Row i of the 20× arrays is the child of row i of the 10× arrays (``parent_index[i] == i``).
    Under the tissue rule (:mod:`wsimil.extract.grid`) the 20× arrays hold every kept tile,
    the 10× arrays each distinct parent once (``density``: the parent's tissue share), and
    ``parent_index[i]`` is the 10× row of tile i; ``n_grid`` counts the tissue grid's cells.
    """

    slide_id: str
    grid_10x: np.ndarray  # (K, 2) int64 (col, row) at 10×
    coords_10x: np.ndarray  # (K, 2) int64 level-0 (x, y) top-left
    density: np.ndarray  # (K,) float32 share of non-white pixels
    grid_20x: np.ndarray  # (K, 2) int64 (col, row) at 20×
    coords_20x: np.ndarray  # (K, 2) int64
    parent_index: np.ndarray  # (K,) int64 row of the 10× parent
    n_grid: int  # whole 10× tiles on the slide
    n_tissue: int  # tiles with density above min_density
    attrs: dict = field(default_factory=dict)  # Provenance.to_attrs() of slide and tiles

    @property
    def provenance(self) -> Provenance:
        """What the selection depends on: the slide and the tile settings."""
        return Provenance.from_attrs(self.attrs, extractor=False)

    @property
    def n_tiles(self) -> int:
        """Kept tiles at the finer scale (the bag size; the top-K rule has as many at 10×)."""
        return len(self.coords_20x)

    @property
    def tissue_rule(self) -> bool:
        """Whether the tiles are the tissue rule's (SPEC §1b) rather than the top-K rule's."""
        return self.provenance.tiles.tissue is not None

    @property
    def fewer_than_top_k(self) -> bool:
        return not self.tissue_rule and len(self.density) < int(self.attrs["top_k"])

    def coords(self, scale: str) -> np.ndarray:
        """(K, 2) level-0 (x, y) top-left of the tiles at ``scale`` ("10x" or "20x")."""
        return {"10x": self.coords_10x, "20x": self.coords_20x}[scale]

    def grid(self, scale: str) -> np.ndarray:
        """(K, 2) (col, row) of the tiles in the tile grid of ``scale``."""
        return {"10x": self.grid_10x, "20x": self.grid_20x}[scale]

    def scales(self, slide: Slide, names: tuple[str, ...] = SCALE_NAMES) -> tuple[Scale, ...]:
        """How the tiles are read from ``slide`` at each scale of ``names``.

        Raises:
            SlideError: ``slide`` is not the one the tiles were selected on (content or
                mpp differ).
        """
        if slide.quickhash != self.attrs["slide_quickhash"] or slide.mpp != self.attrs["mpp"]:
            raise slide.ref.error(
                "differs from the one its tiles were selected on (content or mpp changed); "
                "run `wsimil tiles` again"
            )
        tissue = self.provenance.tiles.tissue
        if tissue is not None:
            by_name = dict(zip(("10x", "20x"), grid.tissue_scales(slide, tissue), strict=True))
            return tuple(by_name[n] for n in names)
        return tile_scales(slide, int(self.attrs["tile_px"]), names)


def tile_scales(slide: Slide, tile_px: int, names: tuple[str, ...]) -> tuple[Scale, ...]:
    """How ``tile_px`` tiles of each scale in ``names`` are read from ``slide``."""
    return tuple(slide.scale(name, tile_px) for name in names)


def selection_provenance(slide: Slide, cfg) -> dict:
    """The provenance attributes of ``slide``'s selection under ``cfg`` (``TilesConfig``)."""
    rule = grid.TISSUE_RULE if cfg.rule == "tissue" else TILES_RULE
    record = Provenance(TileSettings.of(cfg, rule), slide=SlideSource.of(slide))
    return record.to_attrs()


# --- the rule -------------------------------------------------------------------------------


def count_nonwhite(tile: np.ndarray, threshold: int) -> int:
    """Pixels of an (H, W, 3) uint8 tile with at least one channel below ``threshold``."""
    return int(np.count_nonzero(tile.min(axis=2) < threshold))


def tile_counts(slide: Slide, scale: Scale, threshold: int) -> np.ndarray:
    """(rows, cols) non-white pixel counts of every whole tile of ``scale``.

    Reads each tile row as a few wide strips at ``scale.level``; a tile's pixels are the
    same as :meth:`Slide.read_tile` returns (same level, origin and resize).
    """
    rows, cols = scale.grid_shape(slide.dimensions)
    counts = np.zeros((rows, cols), np.int64)
    xs = scale.origins(np.stack([np.arange(cols), np.zeros(cols)], axis=1))[:, 0]  # (cols,)
    per_strip = max(1, STRIP_PX // scale.read_px)
    for r in range(rows):
        y0 = int(scale.origins(np.array([[0, r]]))[0, 1])
        for c0 in range(0, cols, per_strip):
            x_strip = xs[c0 : c0 + per_strip]
            offsets = np.rint((x_strip - x_strip[0]) / scale.level_downsample).astype(int)
            width = int(offsets[-1]) + scale.read_px
            strip = slide.read(scale.level, int(x_strip[0]), y0, width, scale.read_px)
            if scale.read_px == scale.tile_px:  # no resize: threshold the strip once
                nonwhite = strip.min(axis=2) < threshold  # (read_px, width)
                for j, o in enumerate(offsets):
                    counts[r, c0 + j] = np.count_nonzero(nonwhite[:, o : o + scale.read_px])
            else:
                for j, o in enumerate(offsets):
                    tile = scale.to_tile(strip[:, o : o + scale.read_px])
                    counts[r, c0 + j] = count_nonwhite(tile, threshold)
    return counts


def exhaustive_counts(slide: Slide, scale: Scale, threshold: int) -> np.ndarray:
    """The rule read literally: one :meth:`Slide.read_tile` per grid cell (reference, slow)."""
    rows, cols = scale.grid_shape(slide.dimensions)
    counts = np.zeros((rows, cols), np.int64)
    for r in range(rows):
        for c in range(cols):
            x0, y0 = scale.origins(np.array([[c, r]]))[0]
            counts[r, c] = count_nonwhite(slide.read_tile(scale, x0, y0), threshold)
    return counts


def rank_tiles(counts: np.ndarray, top_k: int, min_count: float) -> np.ndarray:
    """Flat row-major indices of the ``top_k`` densest cells with count > ``min_count``.

    A stable sort on the negated counts keeps row-major order among equal counts.
    """
    flat = counts.ravel()
    order = np.argsort(-flat, kind="stable")
    order = order[flat[order] > min_count]
    return order[:top_k]


def child_quadrants(slide_id: str, seed: int, shape: tuple[int, int]) -> np.ndarray:
    """(rows, cols) int in 0..3: which 20× quadrant (x + 2·y) is each 10× cell's child."""
    slide_key = int.from_bytes(hashlib.sha256(slide_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, slide_key]).integers(0, 4, size=shape)


def select_tiles(slide: Slide, cfg) -> Selection:
    """Apply ``cfg.rule`` to one slide: the rule above, or the tissue rule (:mod:`.grid`).

    Args:
        slide: an open slide.
        cfg: ``TilesConfig`` (tile_px, top_k, density_threshold, min_density, seed; or
            ``rule: tissue`` and its ``tissue`` section).

    Raises:
        SlideError: the slide is smaller than one 10× tile or has no tissue tile.
    """
    if cfg.rule == "tissue":
        return grid.select_tissue_tiles(slide, cfg)[0]
    return select_top_k(slide, cfg)


def select_top_k(slide: Slide, cfg) -> Selection:
    """The density top-K rule of the module docstring on one slide."""
    ref = slide.ref
    s10, s20 = tile_scales(slide, cfg.tile_px, ("10x", "20x"))
    rows, cols = s10.grid_shape(slide.dimensions)
    if rows * cols == 0:
        raise ref.error(
            f"is smaller than one 10× tile of {cfg.tile_px} px "
            f"({s10.tile_size_level0:.0f} level-0 px); lower tiles.tile_px"
        )
    start = time.perf_counter()
    counts = tile_counts(slide, s10, cfg.density_threshold)  # (rows, cols)
    area = cfg.tile_px * cfg.tile_px
    kept = rank_tiles(counts, cfg.top_k, cfg.min_density * area)
    n_tissue = int(np.count_nonzero(counts > cfg.min_density * area))
    if len(kept) == 0:
        raise ref.error(
            f"has no tissue: none of its {rows * cols} 10× tiles has a pixel with a channel "
            f"below {cfg.density_threshold}; check the file or drop it from slides.csv"
        )
    kept = np.sort(kept)  # row-major order in the cache
    grid10 = np.stack([kept % cols, kept // cols], axis=1).astype(np.int64)  # (K, 2)
    quadrant = child_quadrants(ref.slide_id, cfg.seed, (rows, cols)).ravel()[kept]  # (K,)
    grid20 = 2 * grid10 + np.stack([quadrant % 2, quadrant // 2], axis=1)  # (K, 2)
    sel = Selection(
        slide_id=ref.slide_id,
        grid_10x=grid10,
        coords_10x=s10.origins(grid10),
        density=(counts.ravel()[kept] / area).astype(np.float32),
        grid_20x=grid20.astype(np.int64),
        coords_20x=s20.origins(grid20),
        parent_index=np.arange(len(kept), dtype=np.int64),
        n_grid=rows * cols,
        n_tissue=n_tissue,
        attrs=selection_provenance(slide, cfg),
    )
    log.info(
        "slide %s: %d of %d 10x tiles are tissue, kept %d (%.2f s)",
        ref.slide_id, n_tissue, rows * cols, len(kept), time.perf_counter() - start,
    )  # fmt: skip
    if sel.fewer_than_top_k:
        log.warning(
            "slide %s has %d tissue tiles, fewer than top_k=%d: keeping all of them",
            ref.slide_id, n_tissue, cfg.top_k,
        )  # fmt: skip
    return sel


# --- the tiles cache ------------------------------------------------------------------------


def tiles_for_slide(ref: SlideRef, cfg, tiles_dir: Path) -> tuple[Selection, bool]:
    """The selection of one slide, reused from ``tiles_dir`` when its provenance matches.

    Returns:
        The selection, and True when it came from the cache.
    """
    tissue = cfg.rule == "tissue"
    with open_slide(ref, mpp_override=cfg.mpp_override) as slide:
        path = tiles_path(tiles_dir, ref.slide_id)
        qc = grid.qc_paths(tiles_dir, ref.slide_id).values() if tissue else ()
        if matches(path, selection_provenance(slide, cfg)) and all(p.is_file() for p in qc):
            defect = selection_defect(path)
            if defect is None:
                return read_selection(path), True
            log.warning("slide %s: tiles cache %s is damaged (%s); selecting again",
                        ref.slide_id, path, defect)  # fmt: skip
        if tissue:
            sel, tm = grid.select_tissue_tiles(slide, cfg)
            size = sel.scales(slide, ("20x",))[0].tile_size_level0
            grid.write_tissue_outputs(tiles_dir, sel, tm, size)
        else:
            sel = select_top_k(slide, cfg)
        write_selection(path, sel, slide)
        return sel, False


def tiles_path(tiles_dir: Path, slide_id: str) -> Path:
    """``<tiles_dir>/<slide_id>.h5``; an id that would leave the folder is refused."""
    return under(tiles_dir, slide_id, ".h5")


def write_selection(path: Path, sel: Selection, slide: Slide) -> None:
    """Write a selection atomically, with its provenance and the read geometry."""
    s10, s20 = sel.scales(slide, ("10x", "20x"))
    attrs = {
        **sel.attrs,
        "slide_path": str(slide.ref.path),
        "n_grid_tiles": sel.n_grid,
        "n_tissue_tiles": sel.n_tissue,
        "fewer_than_top_k": sel.fewer_than_top_k,
        "tile_size_level0_10x": s10.tile_size_level0,
        "tile_size_level0_20x": s20.tile_size_level0,
    }
    datasets = {
        "grid_10x": sel.grid_10x,
        "coords_10x": sel.coords_10x,
        "density_10x": sel.density,
        "grid_20x": sel.grid_20x,
        "coords_20x": sel.coords_20x,
        "parent_index": sel.parent_index,
    }
    dataset_attrs = {}
    if sel.tissue_rule:  # the grid's tiles as CLAM's coordinates file has them
        datasets["coords"] = sel.coords_20x
        dataset_attrs["coords"] = clam_coords_attrs(s20, slide)
    write_h5(path, datasets, attrs, dataset_attrs)


def clam_coords_attrs(scale: Scale, slide: Slide) -> dict:
    """The attributes CLAM and TRIDENT put on ``coords``, for tiles of ``scale``.

    ``patch_size`` is the tile side at the target scale and ``downsample`` level-0 px per
    target px, so ``patch_size · downsample`` (CLAM) and ``patch_size_level0`` (TRIDENT)
    are both the level-0 side; ``patch_level`` is the pyramid level the tiles are read from.
    """
    level_w, level_h = slide.osr.level_dimensions[scale.level]
    return {
        "patch_size": scale.tile_px,
        "patch_level": scale.level,
        "downsample": np.array([scale.downsample, scale.downsample]),
        "downsampled_level_dim": np.array([level_w, level_h], np.int64),
        "level_dim": np.array(slide.dimensions, np.int64),
        "patch_size_level0": int(round(scale.tile_size_level0)),
        "target_mpp": scale.mpp,
        "name": slide.ref.slide_id,
    }


def read_selection(path: Path) -> Selection:
    """Read a selection written by :func:`write_selection`."""
    data, attrs = read_h5(path)
    return Selection(
        slide_id=str(attrs["slide_id"]),
        grid_10x=data["grid_10x"],
        coords_10x=data["coords_10x"],
        density=data["density_10x"],
        grid_20x=data["grid_20x"],
        coords_20x=data["coords_20x"],
        parent_index=data["parent_index"],
        n_grid=int(attrs["n_grid_tiles"]),
        n_tissue=int(attrs["n_tissue_tiles"]),
        attrs=Provenance.from_attrs(attrs, extractor=False).to_attrs(),
    )
