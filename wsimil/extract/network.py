"""The extractor network as the pipeline uses it: uint8 tiles in, (B, D) float32 out.

:class:`Extractor` wraps a built network (see :mod:`wsimil.extract.extractors`) with its
normalisation, device and precision, and carries what the feature cache records about it.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from wsimil.extract.precision import autocast, autocast_dtype, precision_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
        dtype_advice: str | None = None,
        resize_px: int | None = None,
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
        self.amp_dtype = autocast_dtype(self.device, dtype_advice)  # None on the CPU
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.precision = precision_name(self.amp_dtype)
        self.resize_px = resize_px  # a recipe's input side (tiles resized on the device)
        self.stain = None  # a wsimil.extract.stain.StainNormaliser, set by build_extractor
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
        with self.lock, torch.inference_mode(), autocast(self.device, self.amp_dtype):
            batch = batch.to(self.device, non_blocking=True)  # (B, 3, H, W) uint8
            if self.stain is not None:
                batch = self.stain(batch)
            x = batch.float()  # (B, 3, H, W) in 0..255
            if self.resize_px and x.shape[-1] != self.resize_px:
                size = (self.resize_px, self.resize_px)
                x = F.interpolate(x, size=size, mode="bilinear", antialias=True)
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
        if self.stain is not None:
            out.update(self.stain.provenance())
        return out


def normalisation(model: nn.Module) -> dict:
    """The mean and std a timm model was trained with (ImageNet's when it does not say)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {
        "mean": tuple(cfg.get("mean", IMAGENET_MEAN)),
        "std": tuple(cfg.get("std", IMAGENET_STD)),
    }
