"""The classic MIL benchmarks (Musk1, Fox, Tiger, Elephant) with their fixed CV splits.

Reads the JLD files of ``komartom/MIDatasets.jl`` (Julia's HDF5 layout; see
``data/mil-benchmarks-midatasets-jl/SOURCE.md``) with plain h5py:

- ``X``: one object reference per bag to a float32 ``(n_features, n_instances)`` array
  (Julia is column-major, so each is transposed here);
- ``y``: a Julia BitArray of bag labels, True = positive;
- ``folds``: 5 repetitions x 10 folds, each a BitArray over the bags, True = training.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

DATASETS = ("Musk1", "Fox", "Tiger", "Elephant")


@dataclass(frozen=True)
class MILBenchmark:
    """One benchmark: bags, labels and the published 5x10-fold CV splits."""

    name: str
    bags: list[np.ndarray]  # per bag (n_instances, n_features) float32
    labels: np.ndarray  # (n_bags,) int64, 1 = positive
    train_masks: np.ndarray  # (n_repeats, n_folds, n_bags) bool, True = training

    @property
    def n_instances(self) -> int:
        return sum(b.shape[0] for b in self.bags)

    @property
    def n_features(self) -> int:
        return self.bags[0].shape[1]

    def splits(self) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """``(repeat, fold, train_idx, test_idx)`` for every fold of every repetition."""
        for r, repeat in enumerate(self.train_masks):
            for f, train in enumerate(repeat):
                yield r, f, np.flatnonzero(train), np.flatnonzero(~train)


def _bits(f: h5py.File, bitarray: np.void) -> np.ndarray:
    """Decode a Julia BitArray (LSB-first bits in uint64 chunks) to a bool vector."""
    chunks = f[bitarray["chunks_"]][()].astype("<u8")
    bits = np.unpackbits(chunks.view(np.uint8), bitorder="little")
    return bits[: int(bitarray["len_"])].astype(bool)


def load_jld(path: Path | str) -> MILBenchmark:
    """Load one ``<Name>.jld`` file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a MIDatasets.jl JLD file (names the missing dataset).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such MIL benchmark file")
    with h5py.File(path, "r") as f:
        missing = [k for k in ("X", "y", "folds") if k not in f]
        if missing:
            raise ValueError(
                f"{path}: not a MIDatasets.jl JLD file (no dataset {', '.join(missing)})"
            )
        bags = [np.ascontiguousarray(f[ref][()].T, dtype=np.float32) for ref in f["X"][()]]
        labels = _bits(f, f["y"][()]).astype(np.int64)
        masks = [[_bits(f, f[fold][()]) for fold in f[rep][()]] for rep in f["folds"][()]]
    if len(labels) != len(bags):
        raise ValueError(f"{path}: {len(bags)} bags but {len(labels)} labels")
    return MILBenchmark(path.stem, bags, labels, np.array(masks, dtype=bool))
