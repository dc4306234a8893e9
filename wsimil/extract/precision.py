"""Which precision the extractor runs in: fp32 on the CPU, autocast on a GPU (per recipe).

A recipe advises a dtype (``bfloat16``/``float16``, what its authors run it in, or
``float32`` for models that are not validated in half precision); on a GPU that lacks
bfloat16 the advice falls back to float16. On the CPU the default is float32, so CPU
features stay bit-reproducible; :func:`autocast` also takes the CPU so that the parity of
the two paths can be tested without a GPU (tests/test_recipes.py).
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_dtype(device: torch.device, advice: str | None = None) -> torch.dtype | None:
    """The autocast dtype for ``device`` (None: plain float32).

    Args:
        device: where the network runs; only CUDA autocasts by default.
        advice: the recipe's dtype (None: bfloat16 where supported, else float16).
    """
    if device.type != "cuda" or advice == "float32":
        return None
    want = DTYPES[advice] if advice else torch.bfloat16
    if want is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return torch.float16
    return want


def autocast(device: torch.device, dtype: torch.dtype | None):
    """A context that runs under ``dtype`` autocast on ``device`` (a no-op for None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def precision_name(dtype: torch.dtype | None) -> str:
    """What the cache records: ``float32`` or ``bfloat16-autocast``/``float16-autocast``."""
    return "float32" if dtype is None else f"{str(dtype).removeprefix('torch.')}-autocast"
