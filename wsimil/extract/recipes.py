"""Pathology foundation-model recipes: one entry per model, everything its embedding needs.

Each :class:`Recipe` fixes what users get wrong when they build these models by hand
(SPEC §2): the architecture and its arguments, the input size and magnification, the
normalisation, how the embedding is pooled from the token outputs (class token, or class
token ⊕ mean of the patch tokens with register tokens excluded), the output dimension,
the dtype its authors run it in, and where its weights live. ``features.extractor`` set to
a recipe name builds it (:func:`build_recipe`); any other name still goes to timm.

Every entry was checked against the model's reference code or card; the ``source`` field
names what was read. Weights never come from the network unless ``allow_network``; a
missing or gated model's error says where to request access and how to download it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from wsimil.extract.extractor_files import load_state_dict, sha256_file
from wsimil.extract.network import IMAGENET_MEAN, IMAGENET_STD, Extractor, ExtractorError

log = logging.getLogger(__name__)

KAIKO_MEAN = KAIKO_STD = (0.5, 0.5, 0.5)
BIOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
BIOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
TRIDENT = "mahmoodlab/TRIDENT trident/patch_encoder_models/load.py"


@dataclass(frozen=True)
class Recipe:
    """How one foundation model turns a tile into its documented embedding."""

    name: str
    loader: Literal["timm", "transformers", "conch"]
    arch: str  # timm architecture (timm), model class (transformers), model config (conch)
    kwargs: dict  # architecture arguments; callables name timm layers (resolved at build)
    input_px: int
    mpp: float  # µm/px the model was trained at (0.5 = 20×)
    pooling: Literal["cls", "cls+mean"]
    prefix_tokens: int  # class + register tokens before the patch tokens
    dim: int
    dtype: Literal["float32", "bfloat16", "float16"]  # autocast advice on a GPU
    hf_repo: str
    files: tuple[str, ...]  # weight files of the HF repo, in the order tried
    licence: str  # gating and where; the licence itself is on the model card
    paper: str
    source: str  # what this entry was checked against
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    package: str = field(default="", compare=False)  # pip install line if not shipped

    @property
    def gated(self) -> bool:
        return self.licence.startswith("gated")


def _swiglu() -> dict:
    import timm.layers

    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}


SWIGLU = "swiglu"  # kwargs marker: SwiGLU-packed MLP with SiLU (Virchow, UNI2-h)
_VIRCHOW = {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, SWIGLU: True}
_DINOV2_G = {"img_size": 224, "init_values": 1e-5, "global_pool": "token"}

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "uni", "timm", "vit_large_patch16_224",
            {"img_size": 224, "patch_size": 16, "init_values": 1e-5},
            224, 0.5, "cls", 1, 1024, "float16", "MahmoodLab/UNI", ("pytorch_model.bin",),
            "gated: request access at https://huggingface.co/MahmoodLab/UNI",
            "Chen et al., Nat. Med. 2024", f"{TRIDENT} UNIInferenceEncoder; TRIDENT README 1024-D",
        ),
        Recipe(
            "uni2-h", "timm", "vit_giant_patch14_224",
            {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
             "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
             "no_embed_class": True, "reg_tokens": 8, SWIGLU: True},
            224, 0.5, "cls", 9, 1536, "bfloat16", "MahmoodLab/UNI2-h",
            ("pytorch_model.bin", "model.safetensors"),
            "gated: request access at https://huggingface.co/MahmoodLab/UNI2-h",
            "Chen et al., Nat. Med. 2024 (UNI2-h model card)", f"{TRIDENT} UNIv2InferenceEncoder",
        ),
        Recipe(
            "virchow2", "timm", "vit_huge_patch14_224", {**_VIRCHOW, "reg_tokens": 4},
            224, 0.5, "cls+mean", 5, 2560, "float16", "paige-ai/Virchow2",
            ("model.safetensors", "pytorch_model.bin"),
            "gated: request access at https://huggingface.co/paige-ai/Virchow2",
            "Zimmermann et al., arXiv 2408.00738",
            f"{TRIDENT} Virchow2InferenceEncoder: class token ⊕ mean of output[:, 5:]",
        ),
        Recipe(
            "virchow", "timm", "vit_huge_patch14_224", _VIRCHOW,
            224, 0.5, "cls+mean", 1, 2560, "float16", "paige-ai/Virchow",
            ("model.safetensors", "pytorch_model.bin"),
            "gated: request access at https://huggingface.co/paige-ai/Virchow",
            "Vorontsov et al., Nat. Med. 2024",
            f"{TRIDENT} VirchowInferenceEncoder: class token ⊕ mean of output[:, 1:]",
        ),
        Recipe(
            "h-optimus-0", "timm", "vit_giant_patch14_reg4_dinov2", _DINOV2_G,
            224, 0.5, "cls", 5, 1536, "float16", "bioptimus/H-optimus-0",
            ("model.safetensors", "pytorch_model.bin"),
            "gated: request access at https://huggingface.co/bioptimus/H-optimus-0",
            "Saillard et al., H-optimus-0 (Bioptimus 2024)",
            f"{TRIDENT} HOptimus0InferenceEncoder (mean/std there)",
            BIOPTIMUS_MEAN, BIOPTIMUS_STD,
        ),
        Recipe(
            "h-optimus-1", "timm", "vit_giant_patch14_reg4_dinov2", _DINOV2_G,
            224, 0.5, "cls", 5, 1536, "float16", "bioptimus/H-optimus-1",
            ("model.safetensors", "pytorch_model.bin"),
            "gated: request access at https://huggingface.co/bioptimus/H-optimus-1",
            "Bioptimus, H-optimus-1 (2025)", f"{TRIDENT} HOptimus1InferenceEncoder",
            BIOPTIMUS_MEAN, BIOPTIMUS_STD,
        ),
        Recipe(
            "gigapath", "timm", "vit_giant_patch14_dinov2",
            {"img_size": 224, "patch_size": 16, "embed_dim": 1536, "depth": 40,
             "num_heads": 24, "mlp_ratio": 5.33334},
            224, 0.5, "cls", 1, 1536, "float16", "prov-gigapath/prov-gigapath",
            ("pytorch_model.bin",),
            "gated: request access at https://huggingface.co/prov-gigapath/prov-gigapath",
            "Xu et al., Nature 2024 (tile encoder)",
            f"{TRIDENT} GigaPathInferenceEncoder (resize 256, centre crop 224 there; here 224)",
        ),
        Recipe(
            "phikon-v2", "transformers", "Dinov2Model",
            {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
             "patch_size": 16, "image_size": 224},
            224, 0.5, "cls", 1, 1024, "float32", "owkin/phikon-v2",
            ("model.safetensors", "config.json"),
            "open: https://huggingface.co/owkin/phikon-v2",
            "Filiot et al., arXiv 2409.09173",
            f"{TRIDENT} Phikonv2InferenceEncoder: last_hidden_state[:, 0]; ViT-L/16 Dinov2 "
            "(TRIDENT README 1024-D); a snapshot folder loads with its own config.json",
        ),
        Recipe(
            "conch", "conch", "conch_ViT-B-16", {},
            448, 0.5, "cls", 0, 512, "float32", "MahmoodLab/CONCH", ("pytorch_model.bin",),
            "gated: request access at https://huggingface.co/MahmoodLab/CONCH",
            "Lu et al., Nat. Med. 2024",
            f"{TRIDENT} Conchv1InferenceEncoder: encode_image(proj_contrast=False, "
            "normalize=False); TRIDENT README 512-D, 512 px at 20x (resized to 448)",
            (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711),
            package="pip install git+https://github.com/Mahmoodlab/CONCH.git",
        ),
        Recipe(
            "kaiko-vits16", "timm", "vit_small_patch16_224", {"img_size": 224},
            224, 0.5, "cls", 1, 384, "float32",
            "1aurent/vit_small_patch16_224.kaiko_ai_towards_large_pathology_fms",
            ("model.safetensors",), "open (timm port by 1aurent)",
            "Aben et al., arXiv 2404.15217", f"{TRIDENT} KaikoS16InferenceEncoder",
            KAIKO_MEAN, KAIKO_STD,
        ),
        Recipe(
            "kaiko-vitb16", "timm", "vit_base_patch16_224", {"img_size": 224},
            224, 0.5, "cls", 1, 768, "float32",
            "1aurent/vit_base_patch16_224.kaiko_ai_towards_large_pathology_fms",
            ("model.safetensors",), "open (timm port by 1aurent)",
            "Aben et al., arXiv 2404.15217", f"{TRIDENT} KaikoB16InferenceEncoder",
            KAIKO_MEAN, KAIKO_STD,
        ),
        Recipe(
            "kaiko-vitl14", "timm", "vit_large_patch14_reg4_dinov2", {"img_size": 518},
            224, 0.5, "cls", 5, 1024, "float32",
            "1aurent/vit_large_patch14_reg4_dinov2.kaiko_ai_towards_large_pathology_fms",
            ("model.safetensors",), "open (timm port by 1aurent)",
            "Aben et al., arXiv 2404.15217",
            f"{TRIDENT} KaikoL14InferenceEncoder (built at 518, run at 224)",
            KAIKO_MEAN, KAIKO_STD,
        ),
    )
}  # fmt: skip


# --- building ---------------------------------------------------------------------------------


def make_model(recipe: Recipe, **overrides) -> nn.Module:
    """The recipe's network with random weights (``overrides``: e.g. ``depth`` for tests)."""
    kwargs = {**recipe.kwargs, **overrides}
    if recipe.loader == "timm":
        import timm

        if kwargs.pop(SWIGLU, False):
            kwargs.update(_swiglu())
        return timm.create_model(
            recipe.arch, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs
        )
    if recipe.loader == "transformers":
        from transformers import Dinov2Config, Dinov2Model

        if "depth" in kwargs:
            kwargs["num_hidden_layers"] = kwargs.pop("depth")
        return Dinov2Model(Dinov2Config(**kwargs))
    return _conch()[0]


def _conch(checkpoint: str | None = None):
    try:
        from conch.open_clip_custom import create_model_from_pretrained
    except ImportError:
        raise ExtractorError(
            "extractor conch needs MahmoodLab's conch package, which wsimil does not ship: "
            f"{RECIPES['conch'].package}"
        ) from None
    return create_model_from_pretrained(RECIPES["conch"].arch, checkpoint_path=checkpoint)


class TokenPooled(nn.Module):
    """A recipe's network as (B, 3, H, W) → (B, D): its documented pooling of the tokens."""

    def __init__(self, model: nn.Module, recipe: Recipe):
        super().__init__()
        self.model, self.recipe = model, recipe

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) final-normed tokens: class, registers, then patches."""
        if self.recipe.loader == "transformers":
            return self.model(pixel_values=x).last_hidden_state
        return self.model.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recipe.loader == "conch":
            return self.model.encode_image(x, proj_contrast=False, normalize=False)  # (B, 512)
        t = self.tokens(x)  # (B, T, C)
        cls = t[:, 0]  # (B, C)
        if self.recipe.pooling == "cls":
            return cls
        patches = t[:, self.recipe.prefix_tokens :]  # (B, N, C), registers excluded
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)  # (B, 2C)


def weight_file(recipe: Recipe, weights: str, *, allow_network: bool) -> Path | None:
    """Where the recipe's weights are: ``weights`` is a file, an HF snapshot folder,
    ``pretrained`` (the local Hugging Face cache) or ``random`` (None).

    Raises:
        ExtractorError: not found; the message says how to get them.
    """
    if weights == "random":
        return None
    if weights != "pretrained":
        path = Path(weights)
        if path.is_dir():
            hit = next((path / f for f in recipe.files if (path / f).is_file()), None)
            if hit is None:
                raise ExtractorError(
                    f"features.weights {path} is a folder without {' or '.join(recipe.files)}; "
                    f"point it at the snapshot of {recipe.hf_repo} ({download_hint(recipe)})"
                )
            return hit
        if not path.is_file():
            raise ExtractorError(f"features.weights {path} does not exist; {download_hint(recipe)}")
        return path
    local = cached_file(recipe)
    if local is not None:
        return local
    if allow_network:
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(recipe.hf_repo, recipe.files[0]))
        except Exception as exc:  # gated without a token, offline, ...
            raise ExtractorError(
                f"extractor {recipe.name}: download of {recipe.hf_repo} failed "
                f"({type(exc).__name__}); {download_hint(recipe)}"
            ) from None
    raise ExtractorError(
        f"extractor {recipe.name}: weights of {recipe.hf_repo} are not in the local "
        f"Hugging Face cache and features.allow_network is false; {download_hint(recipe)}"
    )


def download_hint(recipe: Recipe) -> str:
    """One line: where to get access, the download command, where to point ``weights``."""
    access = f"{recipe.licence}; " if recipe.gated else ""
    folder = f"models/{recipe.name}"
    return (
        f"{access}then `huggingface-cli download {recipe.hf_repo} --local-dir {folder}` and "
        f"set features.weights: {folder} (or keep 'pretrained' after a download into the cache)"
    )


def cached_file(recipe: Recipe) -> Path | None:
    """The recipe's weight file in the local Hugging Face cache, if any (never the network)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in recipe.files:
        if filename.endswith(".json"):
            continue
        hit = try_to_load_from_cache(recipe.hf_repo, filename)
        if isinstance(hit, str):
            return Path(hit)
    return None


def build_recipe(recipe: Recipe, cfg, common: dict) -> Extractor:
    """The recipe's :class:`Extractor` with the weights ``cfg.weights`` names.

    Raises:
        ExtractorError: weights missing, gated, unreadable or not fitting the recipe.
    """
    path = weight_file(recipe, cfg.weights, allow_network=cfg.allow_network)
    if path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            model = make_model(recipe)
        log.warning("extractor %s uses RANDOM weights (seed %d)", recipe.name, cfg.init_seed)
    else:
        model = _load(recipe, path)
    return Extractor(
        recipe.name,
        TokenPooled(model, recipe),
        weights="random" if path is None else f"{recipe.hf_repo}:{path.name}",
        weights_sha256="" if path is None else sha256_file(path),
        weights_path=str(path or ""),
        init_seed=cfg.init_seed if path is None else None,
        mean=recipe.mean,
        std=recipe.std,
        dtype_advice=recipe.dtype,
        resize_px=cfg.input_px or recipe.input_px,
        **common,
    )


def _load(recipe: Recipe, path: Path) -> nn.Module:
    if recipe.loader == "conch":
        return _conch(str(path))[0]
    if recipe.loader == "transformers":
        from transformers import Dinov2Model

        try:  # the snapshot folder carries the model's own config.json
            return Dinov2Model.from_pretrained(str(path.parent), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ExtractorError(
                f"{path.parent}: not a {recipe.hf_repo} snapshot ({exc}); {download_hint(recipe)}"
            ) from None
    state = load_state_dict(path)
    model = make_model(recipe)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = (str(exc).strip().splitlines()[1:2] or [str(exc)])[0].strip()
        raise ExtractorError(f"{path} does not fit extractor {recipe.name}: {first}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ExtractorError(
            f"{path} does not fit extractor {recipe.name}: {len(result.missing_keys)} missing "
            f"keys (e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:3]})"
        )
    return model


def weights_found(recipe: Recipe, cfg=None) -> str:
    """Where this machine has the recipe's weights: a path, or ``no``."""
    if (
        cfg is not None
        and cfg.extractor == recipe.name
        and cfg.weights
        not in (
            "pretrained",
            "random",
        )
    ):
        return cfg.weights if Path(cfg.weights).exists() else "no"
    local = cached_file(recipe)
    return "HF cache" if local else "no"


def listing(cfg=None) -> list[tuple[str, ...]]:
    """One row per recipe for ``wsimil extractors``, after a header row."""
    rows = [("name", "dim", "px", "mpp", "dtype", "weights (HF repo)", "found here", "licence")]
    for r in RECIPES.values():
        found = weights_found(r, cfg)
        if r.package:
            found += f" (needs: {r.package})"
        facts = (str(r.dim), str(r.input_px), f"{r.mpp:g}", r.dtype, r.hf_repo)
        rows.append((r.name, *facts, found, r.licence))
    return rows
