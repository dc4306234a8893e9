"""Tile feature extractors: a small named table, any timm model, or a local file (SPEC §2).

``features.extractor`` names the network:

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
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from wsimil.device import DeviceError, resolve_device
from wsimil.extract.cache import TORCHSCRIPT_SUFFIXES
from wsimil.seeding import use_deterministic_algorithms

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_PREFIXES = ("fc.", "head.", "classifier.", "layer4.")  # keys a truncated model may ignore


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


class ExtractorError(Exception):
    """An extractor that cannot be built; the message says what to set instead."""


class Pooled(nn.Module):
    """Wrap a trunk so that it returns (B, D): last feature map, global-average-pooled."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.trunk(x)
        if isinstance(y, list | tuple):  # timm features_only: one map per out_index
            y = y[-1]
        if y.ndim == 4:
            y = y.mean(dim=(2, 3))  # (B, C, H, W) -> (B, C)
        return y.flatten(1)  # (B, D)


class Extractor:
    """A ready network plus what the cache records about it.

    Calling it maps a uint8 (B, 3, H, W) batch to float32 (B, D) features on the CPU. Calls
    from several threads are serialised, so concurrent slides share one device.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        *,
        weights: str,
        weights_sha256: str,
        weights_path: str = "",
        init_seed: int | None = None,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        device: str | torch.device = "cpu",
        probe_px: int = 224,
    ):
        self.name = name
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.weights = weights
        self.weights_sha256 = weights_sha256
        self.weights_path = weights_path
        self.init_seed = init_seed
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.cuda = self.device.type == "cuda"
        self.amp_dtype = None
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.precision = (
            f"{self.amp_dtype}-autocast".replace("torch.", "") if self.cuda else "float32"
        )
        self.lock = threading.Lock()
        try:  # one dry batch: the feature width, and a clear error if the tile size does not fit
            probe = self(torch.zeros(1, 3, probe_px, probe_px, dtype=torch.uint8))
        except RuntimeError as exc:
            raise ExtractorError(
                f"extractor {name} cannot embed {probe_px} px tiles ({exc}); "
                "set features.input_px to the size it expects"
            ) from None
        if probe.ndim != 2:
            raise ExtractorError(f"extractor {name} returns {tuple(probe.shape)}, not (B, D)")
        self.dim = int(probe.shape[1])

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        amp = (
            torch.autocast("cuda", dtype=self.amp_dtype) if self.cuda else contextlib.nullcontext()
        )
        with self.lock, torch.inference_mode(), amp:
            x = batch.to(self.device, non_blocking=True).float()  # (B, 3, H, W) in 0..255
            x = (x / 255.0 - self.mean) / self.std
            if self.cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.model(x).float().cpu()  # (B, D)

    def provenance(self) -> dict:
        """What the features depend on (matched when deciding to re-extract)."""
        out = {
            "extractor": self.name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
        }
        if self.init_seed is not None:
            out["init_seed"] = self.init_seed
        return out


# --- building ---------------------------------------------------------------------------------


def build_extractor(cfg, tile_px: int) -> Extractor:
    """Build the extractor ``cfg`` (``FeaturesConfig``) names, without touching the network
    unless ``cfg.allow_network``.

    Args:
        cfg: the ``features`` section.
        tile_px: tile side; the model sees ``cfg.input_px or tile_px`` pixels.

    Raises:
        ExtractorError: unknown name, missing or unfitting weights, hub without network.
    """
    name, weights = cfg.extractor, cfg.weights
    try:
        device = resolve_device(cfg.device, "features.device")
    except DeviceError as exc:
        raise ExtractorError(str(exc)) from None
    common = {"device": device, "probe_px": cfg.input_px or tile_px}
    hub = name.startswith("hf-hub:")
    if not hub and _looks_like_file(name):
        return _torchscript(Path(name), weights, common)
    if hub and not cfg.allow_network:
        raise ExtractorError(
            f"extractor {name} is a hub model and features.allow_network is false; set it to "
            "true to download the weights once into the local cache, or point "
            "features.weights at a local copy"
        )
    import timm

    entry = EXTRACTORS.get(name)
    arch = entry.timm_name if entry else name
    if not hub and not timm.is_model(arch):
        raise ExtractorError(
            f"unknown extractor {name!r}: use one of {sorted(EXTRACTORS)}, a timm model name "
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
    return _state_dict(name, arch, kwargs, Path(weights), common)


def _looks_like_file(name: str) -> bool:
    return Path(name).suffix in TORCHSCRIPT_SUFFIXES or os.sep in name


def _timm(arch: str, kwargs: dict, **extra) -> nn.Module:
    import timm

    return timm.create_model(arch, **kwargs, **extra)


def _norm(model: nn.Module) -> dict:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {
        "mean": tuple(cfg.get("mean", IMAGENET_MEAN)),
        "std": tuple(cfg.get("std", IMAGENET_STD)),
    }


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
        **_norm(model),
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
        **_norm(model),
    )


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch pickle (weights only), unwrapped."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ExtractorError(f"{path}: not a state dict (got {type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _state_dict(name: str, arch: str, kwargs: dict, path: Path, common: dict) -> Extractor:
    if not path.is_file():
        raise ExtractorError(
            f"features.weights {path} does not exist; give a state-dict file, 'pretrained' "
            "or 'random'"
        )
    if _is_torchscript(path):
        raise ExtractorError(f"{path} is a TorchScript model: set features.extractor to it")
    try:
        state = load_state_dict(path)
    except ExtractorError:
        raise
    except Exception as exc:
        raise ExtractorError(f"{path}: cannot be read as a state dict ({exc})") from None
    model = _timm(arch, kwargs)
    misfit = f"{path} does not fit extractor {name} (timm {arch})"
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).strip().splitlines()[1:2] or [str(exc)]
        raise ExtractorError(f"{misfit}: {first[0].strip()}") from None
    unexpected = [k for k in result.unexpected_keys if not k.startswith(HEAD_PREFIXES)]
    if result.missing_keys or unexpected:
        raise ExtractorError(
            f"{misfit}: {len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    return Extractor(
        name,
        Pooled(model),
        weights=path.name,
        weights_sha256=sha256_file(path),
        weights_path=str(path),
        **common,
        **_norm(model),
    )


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _torchscript(path: Path, weights: str, common: dict) -> Extractor:
    if not path.is_file():
        raise ExtractorError(f"extractor file {path} does not exist")
    if not _is_torchscript(path):
        raise ExtractorError(
            f"{path} is not a TorchScript model; for a state dict set features.extractor to "
            "its timm architecture and features.weights to the file"
        )
    if weights != "pretrained":
        raise ExtractorError(
            f"extractor {path} is TorchScript and carries its own weights; "
            f"leave features.weights at 'pretrained' (got {weights!r})"
        )
    with warnings.catch_warnings():  # torch 2.15 marks TorchScript as deprecated
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(str(path), map_location="cpu")
    return Extractor(
        path.name,
        Pooled(model),
        weights=path.name,
        weights_sha256=sha256_file(path),
        weights_path=str(path),
        **common,
    )


_HASHES: dict[tuple, str] = {}


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, memoised per (path, size, mtime)."""
    stat = Path(path).stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


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
    stamps = []
    for name in (cfg.extractor, cfg.weights):
        path = Path(name)
        if path.suffix and path.is_file():
            stat = path.stat()
            stamps.append((str(path), stat.st_size, stat.st_mtime_ns))
    return (*(getattr(cfg, f) for f in fields), tile_px, *stamps)
