"""sha256 of the pipeline's outputs, to compare two runs (SPEC §6: bit-identical on CPU).

Prints one line per output: every feature cache's datasets (one digest over all slides
and scales; file attributes are left out, since they name the project folder), the tile
selections, ``splits.json``, and per model family each fold's weights and ``metrics.json``.
Run it after two ``dvc repro -f`` (or in two clones) and diff the output.

    python benchmarks/output_hashes.py                  # this project
    python benchmarks/output_hashes.py --root ../other  # another checkout
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import h5py


def datasets_digest(files: list[Path], root: Path) -> str:
    """One sha256 over the datasets (name, dtype, shape, bytes) of ``files``, in path order."""
    digest = hashlib.sha256()
    for path in sorted(files):
        with h5py.File(path, "r") as f:
            for name in sorted(k for k in f if isinstance(f[k], h5py.Dataset)):
                data = f[name][()]
                digest.update(f"{path.relative_to(root)}:{name}:{data.dtype}:{data.shape}".encode())
                digest.update(data.tobytes())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="the project folder")
    root = parser.parse_args().root.resolve()
    rows = []
    for name in ("tiles", "features"):
        files = list((root / "data" / name).rglob("*.h5"))
        if files:
            rows.append(
                (f"data/{name} ({len(files)} files, datasets)", datasets_digest(files, root))
            )
    if (root / "data" / "splits.json").is_file():
        rows.append(("data/splits.json", file_digest(root / "data" / "splits.json")))
    for results in sorted((root / "results").glob("*/*/models")):
        family = results.parent.relative_to(root)
        for path in sorted(results.glob("*.safetensors")):
            rows.append((f"{family}/models/{path.name}", file_digest(path)))
        if (results.parent / "metrics.json").is_file():
            rows.append((f"{family}/metrics.json", file_digest(results.parent / "metrics.json")))
    for label, digest in rows:
        print(f"{digest[:16]}  {label}")


if __name__ == "__main__":
    main()
