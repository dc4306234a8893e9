"""What DMSMIL's ``attribution`` score costs at evaluation (prints, asserts nothing).

Times, in one run, the eval-mode forward pass of one bag without the score
(``attribution=False``: logits and ``contribution``) and with it (the default in eval mode:
one more forward and a backward pass), at the demo's and the paper's bag sizes, and prints
the ratio. The model has the params.yaml defaults (d 512, 8 heads, 4 points, exact OT).

Run from the repository root:
    python benchmarks/dmsmil_attribution.py --tiles 48 200 --repeats 20
"""

from __future__ import annotations

import argparse
import time

import torch

from wsimil.config import DMSMILConfig
from wsimil.models import collate
from wsimil.models.dmsmil import DMSMIL


def bag(n: int, dim: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    side = int(n**0.5) + 1
    cells = torch.randperm(side * side, generator=gen)[:n]
    grid = torch.stack([cells % side, cells // side], -1)
    return collate([[torch.randn(n, dim, generator=gen), torch.randn(n, dim, generator=gen)]],
                   [[grid, grid]])  # fmt: skip


def seconds(model: DMSMIL, bags, attribution: bool, repeats: int) -> float:
    with torch.no_grad():
        model(bags, attribution=attribution)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            model(bags, attribution=attribution)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, nargs="+", default=[48, 200])
    ap.add_argument("--dim", type=int, default=512, help="feature dimension (ResNet-18: 512)")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = DMSMIL(DMSMILConfig(), [args.dim, args.dim], 2).eval()
    print(f"{'tiles':>6} {'without ms':>11} {'with ms':>9} {'ratio':>6}")
    for n in args.tiles:
        bags = bag(n, args.dim, seed=n)
        without = seconds(model, bags, False, args.repeats)
        with_ = seconds(model, bags, True, args.repeats)
        print(f"{n:>6} {without * 1e3:>11.1f} {with_ * 1e3:>9.1f} {with_ / without:>6.2f}")


if __name__ == "__main__":
    from wsimil import cpu_isa

    cpu_isa.pin()  # the kernels the pipeline computes with (wsimil/cpu_isa.py)
    main()
