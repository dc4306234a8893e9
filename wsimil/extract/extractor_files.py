"""Extractors made from local files: a state dict for a timm architecture, or TorchScript.

Also how such files are read and identified: :func:`load_state_dict` (safetensors or a
weights-only torch pickle), :func:`is_torchscript` and :func:`sha256_file`, which the
registry uses too when it ships an extractor's weights with a model.
"""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from wsimil.extract.network import Extractor, ExtractorError, Pooled, normalisation

HEAD_PREFIXES = ("fc.", "head.", "classifier.", "layer4.")  # keys a truncated model may ignore


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch pickle (weights only), unwrapped.

    Raises:
        ExtractorError: the file cannot be read as a state dict.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ExtractorError(f"{path}: cannot be read as a state dict ({exc})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ExtractorError(f"{path}: not a state dict (got {type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def state_dict_extractor(
    name: str, arch: str, make_model: Callable[[], nn.Module], path: Path, common: dict
) -> Extractor:
    """A state-dict file loaded into a fresh ``make_model()`` of timm architecture ``arch``.

    Keys of a classifier head or of stages a truncated trunk drops are ignored.

    Raises:
        ExtractorError: the file is missing, is TorchScript, cannot be read, or does not fit.
    """
    if not path.is_file():
        raise ExtractorError(
            f"features.weights {path} does not exist; give a state-dict file, 'pretrained' "
            "or 'random'"
        )
    if is_torchscript(path):
        raise ExtractorError(f"{path} is a TorchScript model: set features.extractor to it")
    state = load_state_dict(path)
    model = make_model()
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
        **normalisation(model),
    )


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a saved TorchScript module (a zip with its code and constants)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def torchscript_extractor(path: Path, weights: str, common: dict) -> Extractor:
    """A TorchScript file as the extractor: it carries its own weights.

    Raises:
        ExtractorError: missing, not TorchScript, or ``weights`` set to something else.
    """
    if not path.is_file():
        raise ExtractorError(f"extractor file {path} does not exist")
    if not is_torchscript(path):
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
