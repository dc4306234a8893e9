"""The HDF5 cache contract: atomic writes, provenance matching, and one reader for
wsimil, CLAM and TRIDENT bags."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from wsimil.extract.cache import (
    BagError,
    ExtractorSettings,
    Provenance,
    ProvenanceError,
    SlideSource,
    TileSettings,
    bag_path,
    extractor_tag,
    features_dir,
    matches,
    read_attrs,
    read_bag,
    read_pair,
    write_h5,
)


def test_write_then_match_and_mismatch(tmp_path):
    path = tmp_path / "a" / "s.h5"
    attrs = {"slide_id": "s", "mpp": 0.499, "top_k": 200, "fewer": False, "extra": None}
    write_h5(path, {"features": np.ones((3, 4), np.float32)}, attrs)
    assert matches(path, attrs)
    assert matches(path, {"slide_id": "s", "top_k": 200})  # a subset is enough
    assert not matches(path, {**attrs, "top_k": 199})
    assert not matches(path, {**attrs, "new_key": 1})
    assert not matches(tmp_path / "missing.h5", attrs)
    path.write_bytes(b"not an hdf5 file")
    assert not matches(path, attrs)  # unreadable counts as stale, never as an error


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    write_h5(path, {"features": np.zeros((2, 2), np.float32)}, {"version": 1})
    before = path.read_bytes()

    class BoomError(RuntimeError):
        pass

    def explode(self, name, **kw):
        raise BoomError("killed mid-write")

    monkeypatch.setattr(h5py.Group, "create_dataset", explode)
    with pytest.raises(BoomError):
        write_h5(path, {"features": np.ones((2, 2), np.float32)}, {"version": 2})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]
    with pytest.raises(BoomError):
        write_h5(tmp_path / "new.h5", {"features": np.ones(1)}, {})
    assert not (tmp_path / "new.h5").exists()


def _clam_file(path, coords, **coord_attrs):
    with h5py.File(path, "w") as f:
        f["features"] = np.arange(len(coords) * 3, dtype=np.float16).reshape(len(coords), 3)
        f["coords"] = np.asarray(coords, np.int32)
        f["coords"].attrs.update(coord_attrs)


def test_reads_a_clam_bag_and_derives_the_grid(tmp_path):
    path = tmp_path / "clam.h5"
    _clam_file(path, [[512, 1024], [1024, 1024], [2048, 512]], patch_size=256, patch_level=1,
               downsample=np.array([2.0, 2.0]))  # fmt: skip
    bag = read_bag(path)
    assert bag.features.dtype == np.float32 and bag.features.shape == (3, 3)
    assert bag.coords.dtype == np.int64
    assert bag.tile_size_level0 == 512
    np.testing.assert_array_equal(bag.grid, [[1, 2], [2, 2], [4, 1]])
    assert bag.parent_index is None and bag.attrs["patch_size"] == 256


def test_reads_a_trident_bag_and_falls_back_to_coordinate_spacing(tmp_path):
    trident = tmp_path / "trident.h5"
    _clam_file(trident, [[0, 0], [448, 0], [448, 448]], patch_size_level0=448)
    np.testing.assert_array_equal(read_bag(trident).grid, [[0, 0], [1, 0], [1, 1]])
    bare = tmp_path / "bare.h5"
    _clam_file(bare, [[100, 300], [400, 300], [700, 600]])  # spacing 300, no attributes
    bag = read_bag(bare)
    assert bag.tile_size_level0 == 300
    np.testing.assert_array_equal(bag.grid, [[0, 1], [1, 1], [2, 2]])
    assert read_bag(bare, tile_size_level0=100).grid.tolist()[0] == [1, 3]


def test_squeezes_a_leading_batch_axis(tmp_path):
    path = tmp_path / "b.h5"
    with h5py.File(path, "w") as f:
        f["features"] = np.ones((1, 4, 8), np.float32)
        f["coords"] = np.zeros((4, 2), np.int64)
    assert read_bag(path).features.shape == (4, 8)


def test_bad_files_raise_bag_errors_naming_the_file(tmp_path):
    with pytest.raises(BagError, match="cannot open"):
        read_bag(tmp_path / "missing.h5")
    path = tmp_path / "nofeat.h5"
    with h5py.File(path, "w") as f:
        f["coords"] = np.zeros((2, 2))
    with pytest.raises(BagError, match=r"nofeat.h5: no 'features' dataset"):
        read_bag(path)


def _pair(root, parent):
    n = len(parent)
    for scale in ("10x", "20x"):
        data = {"features": np.ones((n, 2), np.float32), "coords": np.zeros((n, 2), np.int64)}
        data["grid"] = np.zeros((n, 2), np.int64)
        if scale == "20x":
            data["parent_index"] = np.asarray(parent, np.int64)
        write_h5(bag_path(root, "s", scale), data, {"tile_size_level0": 256.0})


def test_read_pair_checks_the_parent_index(tmp_path):
    _pair(tmp_path, [0, 1, 2])
    b10, b20 = read_pair(tmp_path, "s")
    assert len(b10) == len(b20) == 3 and b20.parent_index.tolist() == [0, 1, 2]
    _pair(tmp_path, [0, 1, 3])
    with pytest.raises(BagError, match="parent_index does not index the 3 10x tiles"):
        read_pair(tmp_path, "s")
    with pytest.raises(BagError, match="cannot open"):
        read_pair(tmp_path, "other")


def test_feature_folders_are_named_after_the_extractor(tmp_path):
    assert extractor_tag("resnet101") == "resnet101"
    assert extractor_tag("models/uni.pt") == "uni"
    assert extractor_tag("models/uni.jit") == "uni"  # every TorchScript suffix
    assert extractor_tag("hf-hub:MahmoodLab/UNI") == "hf-hub_MahmoodLab_UNI"
    assert features_dir(tmp_path, "resnet18") == tmp_path / "resnet18"
    assert bag_path(tmp_path, "s1", "20x") == tmp_path / "20x" / "s1.h5"


def test_caches_are_redone_when_a_rule_version_changes_and_only_then(
    tiny_cohort, tmp_path, monkeypatch
):
    """The code's part of a cache's provenance is the declared rule versions, not its source."""
    from wsimil.config import FeaturesConfig, TilesConfig
    from wsimil.extract import embed, features, tiles
    from wsimil.extract.extractors import build_extractor
    from wsimil.extract.slide import SlideRef

    out, table = tiny_cohort
    ref = SlideRef("s0", out / table.path[0])
    tcfg = TilesConfig(tile_px=64, top_k=4)
    fcfg = FeaturesConfig(extractor="resnet18", weights="random", num_workers=0)
    ex = build_extractor(fcfg, tile_px=64)
    tiles_dir, root = tmp_path / "tiles", tmp_path / "features"

    def run() -> tuple[bool, bool]:  # (tiles reused, features reused)
        sel, cached = tiles.tiles_for_slide(ref, tcfg, tiles_dir)
        return cached, features.features_for_slide(ref, sel, ex, fcfg, root).skipped

    assert run() == (False, False)
    assert run() == (True, True)
    attrs = read_bag(bag_path(root, "s0", "20x")).attrs
    assert attrs["tiles_code_version"] == tiles.TILES_RULE
    assert attrs["code_version"] == embed.FEATURES_RULE
    monkeypatch.setattr(embed, "FEATURES_RULE", embed.FEATURES_RULE + 1)
    assert run() == (True, False)  # same tiles, embedded again
    assert run() == (True, True)
    monkeypatch.setattr(tiles, "TILES_RULE", tiles.TILES_RULE + 1)
    assert run() == (False, False)  # selected again, so embedded again


def test_the_provenance_record_round_trips_through_the_attributes_caches_carry(tmp_path):
    record = Provenance(
        TileSettings(64, 8, 200, 0.0, 0, rule=1),
        ExtractorSettings("resnet18", "random", "", 0, 512, "", init_seed=0, rule=1),
        SlideSource("s", "abc", 0.499, "openslide.mpp-x"),
    )
    attrs = record.to_attrs()
    assert attrs["tiles_code_version"] == attrs["code_version"] == 1  # the existing names
    assert "rule" not in attrs and "weights_path" in attrs
    assert set(attrs) - set(record.matched()) == {"weights_path", "feature_dim"}
    path = tmp_path / "s.h5"
    write_h5(path, {"features": np.zeros((1, 512), np.float32)}, {**attrs, "extra": 1})
    assert Provenance.from_attrs(read_attrs(path)) == record
    assert matches(path, record.matched())
    cohort = Provenance.from_attrs(attrs, slide=False)
    assert cohort.slide is None and "slide_id" not in cohort.to_attrs()
    older = {**attrs, "code_version": "0.4.0+0123456789ab"}  # a source hash: no rule
    assert Provenance.from_attrs(older).extractor.rule is None
    with pytest.raises(ProvenanceError, match="no extractor, feature_dim"):
        Provenance.from_attrs(
            {k: v for k, v in attrs.items() if k not in ("extractor", "feature_dim")}
        )
