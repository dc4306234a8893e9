"""Stain normalisation (wsimil/extract/stain.py) on the real Kather patches, and its provenance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsimil.config import ConfigError, FeaturesConfig
from wsimil.extract.cache import matches, write_h5
from wsimil.extract.embed import extractor_settings
from wsimil.extract.extractors import build_extractor
from wsimil.extract.network import ExtractorError
from wsimil.extract.stain import StainNormaliser, macenko_stains, read_rgb


@pytest.fixture()
def kather(shared_data):
    folder = shared_data / "patches-kather-tiatoolbox"
    return folder / "kather1.tif", folder / "kather2.tif"


def lab_stats(tile: torch.Tensor) -> np.ndarray:
    from skimage.color import rgb2lab

    lab = rgb2lab(tile.permute(1, 2, 0).numpy())  # (H, W, 3)
    return np.concatenate([lab.mean(axis=(0, 1)), lab.std(axis=(0, 1))])


def test_macenko_brings_the_stain_vectors_to_the_reference(kather):
    source, reference = kather
    tile, ref = read_rgb(source), read_rgb(reference)
    out = StainNormaliser("macenko", reference, torch.device("cpu"))(tile[None])[0]
    assert out.dtype == torch.uint8 and out.shape == tile.shape
    target = macenko_stains(ref)  # (3, 2)
    before = torch.linalg.norm(macenko_stains(tile) - target)
    after = torch.linalg.norm(macenko_stains(out) - target)
    assert after < 0.25 * before, (before, after)


def test_reinhard_brings_the_lab_statistics_to_the_reference(kather):
    source, reference = kather
    tile, ref = read_rgb(source), read_rgb(reference)
    out = StainNormaliser("reinhard", reference, torch.device("cpu"))(tile[None])[0]
    target = lab_stats(ref)
    before = np.linalg.norm(lab_stats(tile) - target)
    after = np.linalg.norm(lab_stats(out) - target)
    assert after < 0.5 * before, (before, after)


def test_a_blank_tile_passes_through_unchanged(kather):
    norm = StainNormaliser("macenko", kather[1], torch.device("cpu"))
    blank = torch.full((3, 32, 32), 250, dtype=torch.uint8)
    assert torch.equal(norm(blank[None])[0], blank) and norm.passed == 1


def test_stain_setting_is_in_the_provenance_so_changing_it_re_embeds(kather, tmp_path):
    plain = FeaturesConfig(extractor="resnet18", weights="random", device="cpu")
    ex = build_extractor(plain, 32)
    settings = extractor_settings(ex, None)
    cache = tmp_path / "bag.h5"
    write_h5(cache, {"features": np.zeros((1, ex.dim), np.float32)}, settings.__dict__ | {})
    old = {k: v for k, v in settings.__dict__.items() if v is not None}
    assert matches(cache, old)
    for method in ("macenko", "reinhard"):
        cfg = plain.model_copy(update={"stain_norm": method, "stain_reference": kather[1]})
        stained = build_extractor(cfg, 32)
        new = extractor_settings(stained, None)
        assert new.stain_norm == method and len(new.stain_reference_sha256) == 64
        assert new != settings
        record = {k: v for k, v in new.__dict__.items() if v is not None}
        assert not matches(cache, record)  # the old cache no longer counts: re-embed
    other = plain.model_copy(update={"stain_norm": "macenko", "stain_reference": kather[0]})
    assert extractor_settings(build_extractor(other, 32), None) != new  # another reference


def test_stain_settings_are_checked(tmp_path):
    with pytest.raises((ConfigError, ValueError), match="stain_reference"):
        FeaturesConfig(stain_norm="macenko")
    cfg = FeaturesConfig(
        extractor="resnet18", weights="random", device="cpu", stain_norm="macenko",
        stain_reference=tmp_path / "nope.png",
    )  # fmt: skip
    with pytest.raises(ExtractorError, match="stain_reference .*nope.png does not exist"):
        build_extractor(cfg, 32)


def test_features_for_slide_re_embeds_when_the_stain_setting_changes(tiny_cohort, tmp_path, kather):
    from wsimil.config import TilesConfig
    from wsimil.extract.cache import features_dir, read_bag
    from wsimil.extract.features import features_for_slide
    from wsimil.extract.slide import SlideRef
    from wsimil.extract.tiles import tiles_for_slide

    out, table = tiny_cohort
    ref = SlideRef("s0", out / table.path[0])
    sel, _ = tiles_for_slide(ref, TilesConfig(tile_px=64, top_k=4), tmp_path / "tiles")
    plain = FeaturesConfig(extractor="kaiko-vits16", weights="random", num_workers=0, device="cpu")
    root = features_dir(tmp_path / "features", plain.extractor)
    assert root == tmp_path / "features" / "kaiko-vits16"  # data/features/<recipe>/...
    first = features_for_slide(ref, sel, build_extractor(plain, 64), plain, root)
    bag = read_bag(root / "10x" / "s0.h5")
    assert bag.features.shape == (4, 384) and bag.attrs["feature_dim"] == 384
    assert bag.attrs["extractor"] == "kaiko-vits16" and "stain_norm" not in bag.attrs
    stained = plain.model_copy(update={"stain_norm": "macenko", "stain_reference": kather[1]})
    ex = build_extractor(stained, 64)
    second = features_for_slide(ref, sel, ex, stained, root)
    assert not first.skipped and not second.skipped
    attrs = read_bag(root / "10x" / "s0.h5").attrs
    assert attrs["stain_norm"] == "macenko" and len(attrs["stain_reference_sha256"]) == 64
    assert features_for_slide(ref, sel, ex, stained, root).skipped  # same setting: reused
