"""Stain normalisation before the network (SPEC §2): Macenko or Reinhard, by torchstain.

``features.stain_norm: macenko | reinhard`` with ``features.stain_reference`` (an RGB
tile image) maps every tile's colours onto the reference's. It runs on the extractor's
device (the GPU when there is one). The method and the reference's SHA-256 are part of the
feature provenance, so changing either re-embeds.

A tile where the method is undefined (a flat tile, or Macenko on a tile with almost no
stained pixels: the stain plane cannot be estimated) is passed through unchanged; that is
a property of the tile, so it is deterministic; :attr:`StainNormaliser.passed` counts them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from wsimil.extract.extractor_files import sha256_file

log = logging.getLogger(__name__)
METHODS = ("macenko", "reinhard")


class StainError(Exception):
    """A stain-normalisation setting that cannot be used; the message says what to set."""


def read_rgb(path: Path) -> torch.Tensor:
    """An image file as a uint8 (3, H, W) tensor."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise StainError(
            f"features.stain_reference {path} cannot be read as an image ({exc}); "
            "point it at an RGB tile (PNG, JPEG or TIFF)"
        ) from None
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)


class StainNormaliser:
    """Fit once on the reference tile, then map uint8 (B, 3, H, W) batches onto it."""

    def __init__(self, method: str, reference: Path, device: torch.device):
        if method not in METHODS:
            raise StainError(f"features.stain_norm {method!r}: use one of {METHODS} or null")
        reference = Path(reference)
        if not reference.is_file():
            raise StainError(
                f"features.stain_reference {reference} does not exist; set it to a reference "
                "tile image when features.stain_norm is set"
            )
        from torchstain.torch.normalizers import TorchMacenkoNormalizer, TorchReinhardNormalizer

        self.method, self.device, self.passed = method, device, 0
        self.reference_sha256 = sha256_file(reference)
        target = read_rgb(reference)
        self.norm = TorchMacenkoNormalizer() if method == "macenko" else TorchReinhardNormalizer()
        try:
            self.norm.fit(target)
        except RuntimeError as exc:
            raise StainError(
                f"features.stain_reference {reference}: {method} cannot be fitted on it ({exc}); "
                "choose a tile with tissue"
            ) from None
        for name in ("HERef", "maxCRef", "target_means", "target_stds"):
            if hasattr(self.norm, name):
                setattr(self.norm, name, getattr(self.norm, name).to(device))

    def tile(self, tile: torch.Tensor) -> torch.Tensor:
        """One uint8 (3, H, W) tile, normalised (or unchanged where undefined)."""
        if tile.float().std(dim=(1, 2)).min() < 1.0:  # flat (e.g. blank): nothing to map
            self.passed += 1
            return tile
        try:
            if self.method == "macenko":
                out, _, _ = self.norm.normalize(tile, stains=False)  # (H, W, 3) int
                out = out.permute(2, 0, 1)
            else:
                out = self.norm.normalize(tile).permute(2, 0, 1)  # (H, W, 3) uint8 -> (3, H, W)
        except (RuntimeError, IndexError):  # too few stained pixels for the stain plane
            self.passed += 1
            return tile
        return out.clamp(0, 255).to(torch.uint8)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """A uint8 (B, 3, H, W) batch, each tile normalised on the normaliser's device."""
        batch = batch.to(self.device)
        return torch.stack([self.tile(t) for t in batch])  # (B, 3, H, W)

    def provenance(self) -> dict:
        """What the features depend on: the method and the reference tile's hash."""
        return {"stain_norm": self.method, "stain_reference_sha256": self.reference_sha256}


def macenko_stains(tile: torch.Tensor) -> torch.Tensor:
    """The (3, 2) Macenko stain matrix (H and E optical-density vectors) of a uint8 tile."""
    from torchstain.torch.normalizers import TorchMacenkoNormalizer

    probe = TorchMacenkoNormalizer()
    probe.fit(tile)
    return probe.HERef  # (3, 2): columns H, E
