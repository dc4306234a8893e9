"""The one seeding rule: every random stream of a fit is derived from (seed, fold, trial).

SPEC §6: the same code, data, params and seed give byte-identical fold weights and metrics in
any process. No model, fold or trial may depend on the global RNG's state, which changes with
whatever ran before in the process (another fold, a test, an import). So each fit gets its
own :class:`FitSeeds`, derived with NumPy's ``SeedSequence`` from the run's ``train.seed``,
the fold and the tuning trial, and the model's initial weights and the training loop's draws
(slide order, dropout) are made under a forked, seeded torch RNG that leaves the caller's
untouched.

``deterministic`` additionally asks torch for deterministic kernels (CUDA: cuBLAS workspace,
no cuDNN autotuning), for the GPU paths where bit-identity is not free.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

INIT, TRAIN = 0, 1  # the purposes a fit draws for; each gets its own stream
CUBLAS_WORKSPACE = ":4096:8"  # what torch's reproducibility notes ask for on CUDA >= 10.2


@dataclass(frozen=True)
class FitSeeds:
    """The seeds of one fit, named by the run's seed, the fold and the tuning trial."""

    seed: int
    fold: int = 0
    trial: int | None = None  # None outside a tuning study

    def stream(self, purpose: int) -> int:
        """A 63-bit seed for ``purpose`` (``INIT`` or ``TRAIN``), distinct per fold and trial."""
        trial = 0 if self.trial is None else self.trial + 1
        entropy = [self.seed, purpose, self.fold, trial]
        return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)

    @property
    def init(self) -> int:
        return self.stream(INIT)

    @property
    def train(self) -> int:
        return self.stream(TRAIN)


@contextlib.contextmanager
def torch_rng(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU (and CUDA) RNG seeded to ``seed``; restore it after."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def use_deterministic_algorithms(enabled: bool) -> None:
    """Ask torch for deterministic kernels, or stop asking.

    On CUDA this also needs ``CUBLAS_WORKSPACE_CONFIG`` before the first cuBLAS call; it is set
    here unless the environment already has it, and cuDNN's autotuner is turned off. An op
    with no deterministic CUDA kernel (``grid_sample``'s backward, in DMSMIL's deformable
    attention) warns, naming itself, instead of stopping the run.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    if "torch._inductor" in sys.modules or not hasattr(torch._C, "_set_deterministic_algorithms"):
        torch.use_deterministic_algorithms(enabled, warn_only=True)
    else:
        # what torch.use_deterministic_algorithms does, less importing torch._inductor only
        # to set its flag: ~3.7 s in every process (each fold worker), for torch.compile,
        # which wsimil never calls; a later import of torch._inductor would read the default
        torch._C._set_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    if enabled:
        torch.backends.cudnn.benchmark = False
