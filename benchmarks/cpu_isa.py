"""What pinning the CPU kernels to AVX2 costs, against each CPU's own widest kernels.

Every wsimil process pins ATen, oneDNN and MKL to AVX2 (``WSIMIL_CPU_ISA``,
``wsimil/cpu_isa.py``) so that results are the same bits on AVX2 and AVX-512 machines. On
an AVX-512 CPU that gives up the wider kernels; this measures by how much, in one run:
each repeat starts one fresh process per choice (the kernels are fixed per process),
alternating, and each process times

- extraction: tiles/s of the demo's ResNet-18 (128 px tiles) and of ``resnet50_trunc``
  (224 px), random weights, float32, through the pipeline's :class:`Extractor`;
- training: seconds per epoch at the DMSMIL paper's scale (546 slides x 200 tiles x
  2048-D, timed on ``--slides`` and scaled), the fit's own step
  (``benchmarks/train_epoch.py``);

and prints the medians, their ratio, and a digest of one embedding batch per choice (equal
digests: the choices computed the same bits). No timing asserts: this only measures.

    python benchmarks/cpu_isa.py                       # avx2 against native, 3 repeats
    python benchmarks/cpu_isa.py --choices avx2 avx512 native --slides 40 --repeats 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

EXTRACTORS = (("resnet18", 128), ("resnet50_trunc", 224))
FAMILIES = ("abmil", "dtfd", "dmsmil")


def worker(slides: int, tiles: int, threads: int) -> dict:
    """Time this process's kernels (pinned by ``WSIMIL_CPU_ISA`` before the first one)."""
    from wsimil import cpu_isa

    choice = cpu_isa.pin()
    import torch

    torch.set_num_threads(threads)
    from wsimil.config import FeaturesConfig
    from wsimil.extract.extractors import build_extractor

    out: dict = {"choice": choice, "kernels": cpu_isa.in_use()}
    gen = torch.Generator().manual_seed(0)
    for name, px in EXTRACTORS:
        ex = build_extractor(FeaturesConfig(extractor=name, weights="random", device="cpu"), px)
        batch = torch.randint(0, 256, (48, 3, px, px), generator=gen, dtype=torch.uint8)
        first = ex(batch)  # warm-up, and the bits this choice computes
        out[f"digest {name}"] = hashlib.sha256(first.numpy().tobytes()).hexdigest()[:16]
        start = time.perf_counter()
        for _ in range(max(1, tiles // 48)):
            ex(batch)
        out[f"extract {name} tiles/s"] = max(1, tiles // 48) * 48 / (time.perf_counter() - start)

    sys.path.insert(0, str(Path(__file__).parent))
    from train_epoch import epoch_seconds, make_bags

    for family in FAMILIES:
        from wsimil.models import MODELS

        bags = make_bags(slides, MODELS[family].n_scales)
        out[f"train {family} s/epoch"] = epoch_seconds(family, bags, torch.device("cpu"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--choices", nargs="+", default=["avx2", "native"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slides", type=int, default=30, help="slides timed per epoch (scaled)")
    ap.add_argument("--tiles", type=int, default=192, help="tiles timed per extractor")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.slides, args.tiles, args.threads)))
        return

    from wsimil import cpu_isa

    base = cpu_isa.unpinned(os.environ)
    cmd = [sys.executable, __file__, "--worker", "--slides", str(args.slides)]
    cmd += ["--tiles", str(args.tiles), "--threads", str(args.threads)]
    runs: dict[str, list[dict]] = {c: [] for c in args.choices}
    for r in range(args.repeats):
        for choice in args.choices:
            env = {**base, cpu_isa.ENV: choice}
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            runs[choice].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"repeat {r + 1}/{args.repeats} {choice}: done", file=sys.stderr)

    first = args.choices[0]
    print(f"CPU: {cpu_isa.cpu_model()}; load average {os.getloadavg()[0]:.1f}")
    print("kernels: " + ", ".join(f"{c} -> {runs[c][0]['kernels']}" for c in args.choices))
    head = f"{'measure':32s}" + "".join(f"{c:>14s}" for c in args.choices)
    print(head + "".join(f"{c + '/' + first:>16s}" for c in args.choices[1:]))
    for key in runs[first][0]:
        if key in ("choice", "kernels") or key.startswith("digest"):
            continue
        med = {c: statistics.median(run[key] for run in runs[c]) for c in args.choices}
        line = f"{key:32s}" + "".join(f"{med[c]:14.2f}" for c in args.choices)
        print(line + "".join(f"{med[c] / med[first]:16.3f}" for c in args.choices[1:]))
    for key in (k for k in runs[first][0] if k.startswith("digest")):
        digests = {c: {run[key] for run in runs[c]} for c in args.choices}
        print(f"{key:32s}" + "".join(f"{'/'.join(sorted(d)):>18s}" for d in digests.values()))


if __name__ == "__main__":
    main()
