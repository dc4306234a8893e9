"""Tile feature extractors: a small named table, any timm model, or a local file (SPEC §2).

``features.extractor`` names the network:

- a foundation-model recipe (:data:`wsimil.extract.recipes.RECIPES`: ``uni``, ``uni2-h``,
  ``virchow2``, ``h-optimus-0``, ``gigapath``, ``phikon-v2``, ``conch``, ``kaiko-*``, ...),
  with its own architecture, input size, normalisation and pooling;
- a table entry (:data:`EXTRACTORS`): ``resnet101`` (the DMSMIL paper: ImageNet ResNet-101,
  global average pool, 2048-D) or ``resnet50_trunc`` (CLAM / DTFD-MIL: ImageNet ResNet-50 up
  to layer3, global average pool, 1024-D);
- any other timm model name (``resnet18``, ``convnext_tiny.fb_in1k``, ...), pooled to a vector;
- a TorchScript file (``.pt``/``.pth``/``.ts``/``.jit``) mapping normalised (B, 3, H, W)
  images to (B, D);
- a hub name (``hf-hub:org/repo``), only with ``features.allow_network: true``.

``features.weights`` says where a timm architecture's weights come from: ``pretrained``
(the timm/Hugging Face/torch-hub caches on this machine; never the network unless
``allow_network``), a local state-dict file (``.pth``/``.pt``/``.bin``/``.safetensors``), or
``random`` (seeded random initialisation, for demos and smoke tests; recorded and warned).

This module holds the table, the timm builds and the per-process network; the built
network is a :class:`wsimil.extract.network.Extractor`, and files (state dicts, TorchScript)
are loaded by :mod:`wsimil.extract.extractor_files`.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from wsimil import cpu_isa
from wsimil.device import DeviceError, resolve_device
from wsimil.extract.cache import TORCHSCRIPT_SUFFIXES
from wsimil.extract.extractor_files import sha256_file, state_dict_extractor, torchscript_extractor
from wsimil.extract.network import Extractor, ExtractorError, Pooled, normalisation
from wsimil.extract.recipes import RECIPES, build_recipe
from wsimil.extract.stain import StainError, StainNormaliser
from wsimil.seeding import use_deterministic_algorithms

log = logging.getLogger(__name__)
__all__ = ["EXTRACTORS", "Extractor", "ExtractorError", "build_extractor", "shared_extractor"]


@dataclass(frozen=True)
class Entry:
    """A named extractor: a timm architecture, where to cut it, and what it outputs."""

    timm_name: str
    out_index: int | None  # keep feature stages up to this index (None: the whole trunk)
    dim: int
    note: str


EXTRACTORS: dict[str, Entry] = {
    "resnet101": Entry(
        "resnet101.tv_in1k", None, 2048, "DMSMIL paper: ImageNet ResNet-101, global average pool"
    ),
    "resnet50_trunc": Entry(
        "resnet50.tv_in1k", 3, 1024, "CLAM / DTFD-MIL: ImageNet ResNet-50 to layer3, average pool"
    ),
}


# --- building ---------------------------------------------------------------------------------


def build_extractor(cfg, tile_px: int) -> Extractor:
    """Build the extractor ``cfg`` (``FeaturesConfig``) names, without touching the network
    unless ``cfg.allow_network``, with its stain normalisation (``cfg.stain_norm``).

    Args:
        cfg: the ``features`` section.
        tile_px: tile side; the model sees ``cfg.input_px or tile_px`` pixels (a recipe:
            ``cfg.input_px`` or its own input size).

    Raises:
        ExtractorError: unknown name, missing or unfitting weights, hub without network,
            an unusable stain reference.
    """
    extractor = _network(cfg, tile_px)
    method = getattr(cfg, "stain_norm", None)
    if method:
        try:
            extractor.stain = StainNormaliser(method, cfg.stain_reference, extractor.device)
        except StainError as exc:
            raise ExtractorError(str(exc)) from None
    return extractor


def _network(cfg, tile_px: int) -> Extractor:
    name, weights = cfg.extractor, cfg.weights
    try:
        device = resolve_device(cfg.device, "features.device")
    except DeviceError as exc:
        raise ExtractorError(str(exc)) from None
    common = {"device": device, "probe_px": cfg.input_px or tile_px}
    hub = name.startswith("hf-hub:")
    if not hub and _looks_like_file(name):
        return torchscript_extractor(Path(name), weights, common)
    if hub and not cfg.allow_network:
        raise ExtractorError(
            f"extractor {name} is a hub model and features.allow_network is false; set it to "
            "true to download the weights once into the local cache, or point "
            "features.weights at a local copy"
        )
    if name in RECIPES:
        return build_recipe(RECIPES[name], cfg, common)
    import timm

    entry = EXTRACTORS.get(name)
    arch = entry.timm_name if entry else name
    if not hub and not timm.is_model(arch):
        raise ExtractorError(
            f"unknown extractor {name!r}: use a recipe ({', '.join(RECIPES)}; `wsimil "
            f"extractors`), one of {sorted(EXTRACTORS)}, a timm model name "
            "(timm.list_models()), a TorchScript file, or hf-hub:<repo> with allow_network"
        )
    if entry and entry.out_index is not None:  # truncated trunk: keep stages up to out_index
        kwargs = {"features_only": True, "out_indices": (entry.out_index,)}
    else:
        kwargs = {"num_classes": 0}  # timm: no classifier, pooled (B, D)
    if weights == "random":
        return _random(name, arch, kwargs, cfg.init_seed, common)
    if weights == "pretrained":
        return _pretrained(name, arch, kwargs, common, allow_network=cfg.allow_network)
    return state_dict_extractor(name, arch, lambda: _timm(arch, kwargs), Path(weights), common)


def _looks_like_file(name: str) -> bool:
    return Path(name).suffix in TORCHSCRIPT_SUFFIXES or os.sep in name


def _timm(arch: str, kwargs: dict, **extra) -> nn.Module:
    import timm

    return timm.create_model(arch, **kwargs, **extra)


def _random(name: str, arch: str, kwargs: dict, seed: int, common: dict) -> Extractor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _timm(arch, kwargs)
    log.warning(
        "extractor %s uses RANDOM weights (features.weights: random, seed %d): fine for a demo "
        "or a smoke test, meaningless for real results",
        name,
        seed,
    )
    return Extractor(
        name,
        Pooled(model),
        weights="random",
        init_seed=seed,
        weights_sha256="",
        **common,
        **normalisation(model),
    )


def cached_weights(arch: str) -> Path | None:
    """A local copy of timm's pretrained weights for ``arch`` (HF or torch-hub cache), if any."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(hit, str):
                return Path(hit)
    if cfg.url:
        local = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if local.is_file():
            return local
    return None


def _pretrained(
    name: str, arch: str, kwargs: dict, common: dict, *, allow_network: bool
) -> Extractor:
    from timm.models import get_pretrained_cfg

    local = cached_weights(arch)
    if local is not None:
        model = _timm(arch, kwargs, pretrained=True, pretrained_cfg_overlay={"file": str(local)})
    elif allow_network:
        model = _timm(arch, kwargs, pretrained=True)  # downloads into the local cache
        local = cached_weights(arch)
    else:
        cfg = get_pretrained_cfg(arch)
        where = " or ".join(x for x in (cfg and cfg.url, cfg and f"hf-hub {cfg.hf_hub_id}") if x)
        raise ExtractorError(
            f"extractor {name} (timm {arch}) needs pretrained weights and none are on this "
            f"machine; weights are never downloaded by default. Either set "
            f"features.allow_network: true once, or download them yourself ({where or 'n/a'}) "
            "and set features.weights to the file, or set features.weights: random for a "
            "smoke test"
        )
    digest = sha256_file(local) if local else ""
    return Extractor(
        name,
        Pooled(model),
        weights=f"timm:{arch}",
        weights_sha256=digest,
        weights_path=str(local or ""),
        **common,
        **normalisation(model),
    )


# --- one network per process --------------------------------------------------------------

_shared: dict[tuple, Extractor] = {}
_shared_lock = threading.Lock()


def shared_extractor(cfg, tile_px: int) -> Extractor:
    """The extractor of :func:`build_extractor`, built once per process and then reused.

    Every slide task of a process calls this instead of receiving the network as an
    argument, so a Dask worker builds it once instead of unpickling it for every slide, and
    the threads of one process share one model (and one GPU). Only the latest network is
    kept, so a long-lived worker that switches extractors frees the previous one. A weights
    or TorchScript file that changed on disk gives a new key, so it is rebuilt.
    """
    try:  # a Dask worker or a Prefect deployment's process embeds here first
        cpu_isa.pin()
    except cpu_isa.CpuIsaError as exc:
        raise ExtractorError(str(exc)) from None
    use_deterministic_algorithms(cfg.deterministic)  # features.deterministic (GPU kernels)
    key = _shared_key(cfg, tile_px)
    with _shared_lock:  # concurrent first calls build once; the others wait for it
        if key not in _shared:
            _shared.clear()
            _shared[key] = build_extractor(cfg, tile_px)
        return _shared[key]


def _shared_key(cfg, tile_px: int) -> tuple:
    """What the network depends on, including the size and time stamp of a local file."""
    fields = ("extractor", "weights", "allow_network", "init_seed", "input_px", "device")
    fields += ("stain_norm", "stain_reference")
    stamps = []
    for name in (cfg.extractor, cfg.weights, str(getattr(cfg, "stain_reference", ""))):
        path = Path(name)
        if path.suffix and path.is_file():
            stat = path.stat()
            stamps.append((str(path), stat.st_size, stat.st_mtime_ns))
    return (*(getattr(cfg, f, None) for f in fields), tile_px, *stamps)
