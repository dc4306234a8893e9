"""The CPU instruction set the kernels use: pinned, so results are the same bits on any CPU.

PyTorch picks its CPU kernels by the widest instruction set the processor has: ATen's own
kernels (element-wise maths, reductions, the fused Adam), oneDNN's convolutions and MKL's
matrix products each run AVX-512 code where the CPU has it and AVX2 code where it does not.
The two round differently, so the same code, data, params and seed gave other feature caches
and fold weights on an AVX-512 machine than on an AVX2 one (README "Reproducibility").

So every wsimil process pins the three libraries to one instruction set before its first
kernel runs: ``avx2`` by default, which every x86-64 server CPU of the last decade has.
``WSIMIL_CPU_ISA`` picks another:

    avx2     ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2
    avx512   the same, AVX-512 (bit-identical only among AVX-512 machines)
    native   no pin: each CPU's widest kernels (the bits then depend on the CPU)

A library variable already set in the environment wins over the pin. A CPU without AVX2
(or not x86-64) is left native. The pin must come before the process runs any torch kernel:
the CLI applies it first thing, the served model when it loads, the test suite in its
conftest; the processes they start inherit it. Runs record the kernels they used
(:func:`in_use`, tag ``cpu_kernels``), which ``wsimil reproduce`` compares.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

ENV = "WSIMIL_CPU_ISA"
DEFAULT = "avx2"
# The libraries' own variables for each choice, and the CPU flags it needs (Linux names).
PINS: dict[str, dict[str, str]] = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    },
    "avx512": {
        "ATEN_CPU_CAPABILITY": "avx512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512",
    },
    "native": {},
}
LIBRARY_VARIABLES = tuple(PINS["avx2"])  # the same three names in every choice
NEEDS = {
    "avx2": {"avx2", "fma"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "native": set(),
}


class CpuIsaError(ValueError):
    """``WSIMIL_CPU_ISA`` names no choice, or one this CPU lacks."""


def unpinned(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without ``WSIMIL_CPU_ISA`` and the libraries' variables: for a child
    process that is to pin by its own choice."""
    drop = (ENV, *LIBRARY_VARIABLES)
    return {k: v for k, v in environ.items() if k not in drop}


@functools.cache
def _cpuinfo(key: str) -> str | None:
    """The first ``key`` line of ``/proc/cpuinfo`` (Linux), read once per process."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key):
            return line.partition(":")[2].strip()
    return None


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (Linux), or None where they cannot be read."""
    flags = _cpuinfo("flags")
    return None if flags is None else set(flags.split())


def choice(flags: set[str] | None = None, machine: str | None = None) -> str:
    """The instruction set this process pins to: ``WSIMIL_CPU_ISA``, else the default.

    The default falls back to ``native`` on a CPU that lacks it or is not x86-64.

    Raises:
        CpuIsaError: ``WSIMIL_CPU_ISA`` names no choice, or one the CPU lacks.
    """
    flags = cpu_flags() if flags is None else flags
    machine = platform.machine() if machine is None else machine
    asked = os.environ.get(ENV)
    name = (asked or DEFAULT).strip().lower()
    if name not in PINS:
        raise CpuIsaError(f"{ENV}={asked!r}: choose one of {', '.join(PINS)}")
    x86 = machine.lower() in ("x86_64", "amd64")
    if name == "native" or (x86 and flags is not None and NEEDS[name] <= flags):
        return name
    if asked is None:
        return "native"  # the default cannot apply here
    if not x86:
        raise CpuIsaError(
            f"{ENV}={asked}: this is a {machine} CPU, not x86-64; unset {ENV} or set it to native"
        )
    missing = ", ".join(sorted(NEEDS[name] - (flags or set())))
    raise CpuIsaError(
        f"{ENV}={asked}: this CPU lacks {missing or 'readable flags'}; set {ENV} to avx2 or native"
    )


def pin() -> str:
    """Pin the kernels of this process and the processes it starts; return the choice.

    Call before the first torch kernel runs (importing torch is fine). Variables already
    set win.

    Raises:
        CpuIsaError: as :func:`choice`.
    """
    name = choice()
    for key, value in PINS[name].items():
        os.environ.setdefault(key, value)
    return name


def in_use() -> str:
    """The kernels this process computes with, as runs record them (tag ``cpu_kernels``).

    ``avx2`` or ``avx512`` when the three libraries are pinned to it; otherwise ``native``
    with ATen's capability and any library variable set by hand, e.g. ``native (AVX512)``.
    Imports torch.
    """
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    for name, pins in PINS.items():
        pinned = pins and all(os.environ.get(k) == v for k, v in pins.items())
        if pinned and capability.lower() == pins["ATEN_CPU_CAPABILITY"]:
            return name
    by_hand = [f"{k}={os.environ[k]}" for k in LIBRARY_VARIABLES if k in os.environ]
    return f"native ({', '.join([capability, *by_hand])})"


def cpu_model() -> str:
    """The processor's name (Linux ``model name``), else the platform's, for run tags."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or sys.platform
