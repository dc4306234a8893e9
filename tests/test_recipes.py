"""Foundation-model recipes (wsimil/extract/recipes.py): dimensions, pooling, weights, precision.

The big networks are built on the meta device only (no memory, no weights); the pooling is
checked with random weights on two real Kather tiles, independently of the recipe's own
pooling code, on the full ViT-S (kaiko-vits16) and on shallow copies (same tokens, fewer blocks)
of the large ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wsimil.config import FeaturesConfig
from wsimil.extract.extractors import build_extractor
from wsimil.extract.network import ExtractorError
from wsimil.extract.precision import autocast
from wsimil.extract.recipes import RECIPES, TokenPooled, make_model

BUILDABLE = [r for r in RECIPES.values() if r.loader != "conch"]


def kather(shared_data: Path) -> torch.Tensor:
    """The two real Kather patches as a uint8 (2, 3, 224, 224) batch."""
    from PIL import Image

    folder = shared_data / "patches-kather-tiatoolbox"
    tiles = [np.array(Image.open(folder / f"kather{i}.tif").convert("RGB")) for i in (1, 2)]
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()


def normalised(recipe, tiles: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(recipe.mean).view(1, 3, 1, 1)
    std = torch.tensor(recipe.std).view(1, 3, 1, 1)
    return (tiles.float() / 255 - mean) / std


@pytest.mark.parametrize("recipe", BUILDABLE, ids=lambda r: r.name)
def test_every_recipe_builds_on_meta_with_its_documented_dim(recipe):
    with torch.device("meta"):
        pooled = TokenPooled(make_model(recipe), recipe)
        out = pooled(torch.empty(2, 3, recipe.input_px, recipe.input_px))
    assert tuple(out.shape) == (2, recipe.dim)
    if recipe.loader == "timm":  # the recipe's register count is the network's
        assert pooled.model.num_prefix_tokens == recipe.prefix_tokens


def test_conch_without_its_package_says_what_to_install():
    pytest.importorskip("torch")
    try:
        import conch  # noqa: F401

        pytest.skip("the conch package is installed here")
    except ImportError:
        pass
    cfg = FeaturesConfig(extractor="conch", weights="random", device="cpu")
    with pytest.raises(ExtractorError, match="pip install git\\+https://github.com/Mahmoodlab"):
        build_extractor(cfg, 224)


FULL = {"kaiko-vits16"}  # built whole; the others as one-block copies (same tokens, pooling)
FORWARD = list(BUILDABLE)


@pytest.mark.parametrize("recipe", FORWARD, ids=lambda r: r.name)
def test_pooled_output_equals_pooling_of_the_token_outputs(recipe, shared_data):
    overrides = {} if recipe.name in FULL else {"depth": 1}
    torch.manual_seed(0)
    model = make_model(recipe, **overrides).eval()
    x = normalised(recipe, kather(shared_data))
    with torch.inference_mode():
        pooled = TokenPooled(model, recipe)(x)
        if recipe.loader == "transformers":
            tokens = model(pixel_values=x).last_hidden_state  # (2, 1 + N, C)
            n_prefix = 1
        else:
            tokens = model.forward_features(x)  # (2, prefix + N, C)
            n_prefix = model.num_prefix_tokens  # the network's own count, not the recipe's
        cls = tokens[:, 0]
        if recipe.pooling == "cls+mean":
            expected = torch.cat([cls, tokens[:, n_prefix:].mean(1)], dim=-1)
        else:
            expected = cls
        if recipe.loader == "timm" and recipe.pooling == "cls":
            torch.testing.assert_close(model(x), cls)  # timm's own head pooling agrees
    n_patches = (recipe.input_px // model_patch(model)) ** 2
    assert tokens.shape[1] == n_prefix + n_patches
    assert pooled.shape == (2, recipe.dim)
    torch.testing.assert_close(pooled, expected)
    assert not torch.allclose(pooled[0], pooled[1])  # two different tiles, two embeddings


def model_patch(model) -> int:
    if hasattr(model, "patch_embed"):
        return model.patch_embed.patch_size[0]
    return model.config.patch_size


def test_autocast_pooled_output_stays_close_to_float32(shared_data):
    """CPU bfloat16 autocast vs float32 on ViT-S/16: cosine ≥ 0.999, max abs error ≤ 0.05·max."""
    recipe = RECIPES["kaiko-vits16"]
    torch.manual_seed(0)
    pooled = TokenPooled(make_model(recipe).eval(), recipe)
    x = normalised(recipe, kather(shared_data))
    with torch.inference_mode():
        fp32 = pooled(x)
        with autocast(torch.device("cpu"), torch.bfloat16):
            amp = pooled(x).float()
    cos = torch.nn.functional.cosine_similarity(fp32, amp, dim=1)
    assert cos.min() >= 0.999, cos
    assert (fp32 - amp).abs().max() <= 0.05 * fp32.abs().max()
    assert not torch.equal(fp32, amp)  # the autocast path really ran in bfloat16


def test_recipe_extractor_embeds_uint8_tiles_and_records_itself(shared_data):
    cfg = FeaturesConfig(extractor="kaiko-vits16", weights="random", device="cpu")
    ex = build_extractor(cfg, 512)
    tiles = kather(shared_data)
    big = torch.nn.functional.interpolate(tiles.float(), size=512).round().to(torch.uint8)
    feats = ex(big)  # 512 px tiles resized to the recipe's 224 on the device
    assert feats.shape == (2, 384) and ex.dim == 384 and ex.resize_px == 224
    assert ex.precision == "float32"  # CPU stays float32 (bit-reproducible)
    assert ex.provenance()["extractor"] == "kaiko-vits16"
    assert ex.provenance()["weights"] == "random"


def test_missing_gated_weights_give_one_actionable_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    cfg = FeaturesConfig(extractor="uni2-h", weights="pretrained", device="cpu")
    with pytest.raises(ExtractorError) as err:
        build_extractor(cfg, 224)
    msg = str(err.value)
    assert "\n" not in msg
    for part in (
        "MahmoodLab/UNI2-h",
        "https://huggingface.co/MahmoodLab/UNI2-h",
        "huggingface-cli download MahmoodLab/UNI2-h",
        "features.weights",
        "allow_network",
    ):
        assert part in msg
    cfg = FeaturesConfig(extractor="uni2-h", weights=str(tmp_path), device="cpu")
    with pytest.raises(ExtractorError, match="folder without pytorch_model.bin"):
        build_extractor(cfg, 224)


def test_local_state_dict_is_loaded_and_hashed(tmp_path, shared_data):
    from safetensors.torch import save_file

    from wsimil.extract.extractor_files import sha256_file

    recipe = RECIPES["kaiko-vits16"]
    torch.manual_seed(1)
    model = make_model(recipe)
    snapshot = tmp_path / "kaiko"
    snapshot.mkdir()
    save_file(model.state_dict(), str(snapshot / "model.safetensors"))
    cfg = FeaturesConfig(extractor="kaiko-vits16", weights=str(snapshot), device="cpu")
    ex = build_extractor(cfg, 224)
    assert ex.weights_sha256 == sha256_file(snapshot / "model.safetensors")
    x = normalised(recipe, kather(shared_data))
    with torch.inference_mode():
        torch.testing.assert_close(ex(kather(shared_data)), model.eval().forward_features(x)[:, 0])
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(2)}, str(bad))
    cfg = FeaturesConfig(extractor="kaiko-vits16", weights=str(bad), device="cpu")
    with pytest.raises(ExtractorError, match="does not fit extractor kaiko-vits16"):
        build_extractor(cfg, 224)


def test_extractors_command_lists_every_recipe_one_line_each(tmp_path, repo_root):
    import os
    import subprocess
    import sys

    from wsimil.extract.recipes import listing

    folder = tmp_path / "uni2-h"
    folder.mkdir()
    rows = listing(FeaturesConfig(extractor="uni2-h", weights=str(folder)))
    found = {r[0]: r[6] for r in rows[1:]}
    assert found["uni2-h"] == str(folder) and found["virchow2"] in ("no", "HF cache")
    env = {**os.environ, "PYTHONPATH": str(repo_root), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "wsimil", "extractors", "-p", str(repo_root / "params.yaml")],
        capture_output=True, text=True, env=env, check=True,
    ).stdout.splitlines()  # fmt: skip
    for name, recipe in RECIPES.items():
        (line,) = [x for x in out if x.split()[0] == name]
        assert line.split()[1:4] == [str(recipe.dim), str(recipe.input_px), f"{recipe.mpp:g}"]
        assert recipe.hf_repo in line and recipe.licence in line


def test_model_card_shows_the_recipe_and_its_dimension():
    from wsimil.serve.model_card import model_card
    from wsimil.serve.registry import version_tags
    from wsimil.train.manifest import Manifest

    doc = Manifest("abmil", {}, ("20x",), (1536,), ("normal", "tumour"), (0, 1))
    extraction = {"extractor": "uni2-h", "weights": "random", "weights_sha256": ""}
    extraction |= {"feature_dim": 1536, "stain_norm": "macenko"}
    tags = version_tags(doc, {}, extraction)
    assert tags["extractor_dim"] == "1536" and tags["stain_norm"] == "macenko"
    card = model_card("wsimil-demo", doc, tags)
    assert "extractor `uni2-h` (recipe: Chen et al." in card
    assert "`MahmoodLab/UNI2-h`" in card and "1536-D" in card
    assert "stain normalisation macenko" in card
    plain = model_card("wsimil-demo", doc, {"extractor": "resnet18", "extractor_dim": "512"})
    assert "extractor `resnet18`,\n  512-D" in plain


def test_a_snapshot_folder_in_params_is_project_relative(tmp_path):
    from wsimil.config import Params

    (tmp_path / "models" / "uni2-h").mkdir(parents=True)
    params = Params(features=FeaturesConfig(extractor="uni2-h", weights="models/uni2-h"))
    resolved = params.under(tmp_path)
    assert resolved.features.weights == str(tmp_path / "models" / "uni2-h")
    assert resolved.relative_to(tmp_path).features.weights == "models/uni2-h"
