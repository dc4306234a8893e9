"""The one device rule: a ``device`` setting (``auto`` | ``cpu`` | ``cuda``) → a torch device.

The feature extractor (``features.device``), the fit loop (``train.device``) and the served
fold ensemble (``serve.device``) all resolve their setting here. It imports only torch:
the served model's pinned requirements leave out scikit-learn, which importing
:mod:`wsimil.train` would pull in.
"""

from __future__ import annotations

import torch


class DeviceError(RuntimeError):
    """A device that was asked for and is not there; the message names the setting."""


def resolve_device(name: str, setting: str) -> torch.device:
    """``auto``: CUDA when a GPU is visible, else CPU; ``cpu`` and ``cuda`` as given.

    Args:
        name: the setting's value.
        setting: where it is set (e.g. ``train.device``), named in the error.

    Raises:
        DeviceError: ``cuda`` while no CUDA device is visible.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"{setting} is 'cuda' but no CUDA device is visible; set {setting} to auto or cpu"
        )
    return torch.device(name)
