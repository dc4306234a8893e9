"""Seconds per training epoch at the DMSMIL paper's TCGA-BRCA scale.

546 slides x 200 tiles per scale x 2048-D features (random, made here), one slide per
step, the shared fit loop's step (forward, the model's own loss, backward, Adam; DTFD with
its per-tier clipping). ``--adam foreach fused`` times the optimiser fits used before
(foreach) beside the fit's (fused), in one run. Prints a table; the DMSMIL paper reports
4.05 s per epoch on an RTX 3060. No timing asserts: this only measures.

    python benchmarks/train_epoch.py                 # all three, CPU (+ CUDA when present)
    python benchmarks/train_epoch.py --slides 100    # a shorter epoch, scaled up to 546
    python benchmarks/train_epoch.py --deterministic both   # the cost of train.deterministic
    python benchmarks/train_epoch.py --adam foreach fused   # before and after the fused Adam
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from wsimil.config import ModelConfig, TrainConfig
from wsimil.models import MODELS, build_model
from wsimil.seeding import use_deterministic_algorithms
from wsimil.train.fit import (
    ADAM_IMPLEMENTATIONS,
    SlideBag,
    adam,
    batches,
    clip_groups,
    to_model_input,
    train_step,
)

PAPER_SLIDES, TILES, DIM = 546, 200, 2048
PAPER_SECONDS = 4.05  # DMSMIL paper, RTX 3060


def make_bags(n_slides: int, n_scales: int, seed: int = 0) -> list[SlideBag]:
    gen = torch.Generator().manual_seed(seed)
    side = int(np.ceil(np.sqrt(TILES)))
    cells = torch.arange(TILES)
    grid = torch.stack([cells % side, cells // side], 1)  # (200, 2) (col, row)
    return [
        SlideBag(
            f"s{i}",
            i % 2,
            tuple(torch.randn(TILES, DIM, generator=gen) for _ in range(n_scales)),
            tuple(grid for _ in range(n_scales)),
        )
        for i in range(n_slides)
    ]


def epoch_seconds(
    family: str, bags: list[SlideBag], device: torch.device, implementation: str = "fused"
) -> float:
    model = build_model(family, ModelConfig(), [DIM] * MODELS[family].n_scales, 2).to(device)
    cfg = TrainConfig(grad_clip=5.0 if family == "dtfd" else None)
    opt = adam(model, cfg, implementation)
    groups = clip_groups(model)
    model.train()
    order = np.arange(len(bags))
    steps = batches(bags, 1, order)
    for batch in steps[:3]:  # warm-up (allocator, kernels)
        inputs, y = to_model_input(batch, device)
        model.loss(model(inputs), y)[0].backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in steps:
        train_step(model, batch, opt, groups, cfg.grad_clip, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * PAPER_SLIDES / len(bags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=PAPER_SLIDES, help="slides timed")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--models", nargs="+", default=["abmil", "dtfd", "dmsmil"])
    parser.add_argument(
        "--deterministic", choices=["off", "on", "both"], default="off",
        help="train.deterministic (torch's deterministic kernels); both: time each",
    )  # fmt: skip
    parser.add_argument(
        "--adam", nargs="+", choices=ADAM_IMPLEMENTATIONS, default=["fused"],
        help="Adam implementations to time (the fit's: fused; before: foreach)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.deterministic]
    rows = []
    for device in devices:
        for family in args.models:
            bags = make_bags(args.slides, MODELS[family].n_scales)
            for mode in modes:
                use_deterministic_algorithms(mode)
                for impl in args.adam:
                    secs = epoch_seconds(family, bags, device, impl)
                    rows.append((family, str(device), mode, impl, secs))
    use_deterministic_algorithms(False)
    print(f"\nseconds per epoch, {PAPER_SLIDES} slides x {TILES} tiles/scale x {DIM}-D")
    print(f"(timed on {args.slides} slides, scaled; CPU threads {args.threads})")
    print(
        f"{'model':8s} {'device':6s} {'determ.':7s} {'adam':7s} {'s/epoch':>9s}"
        "  vs paper (DMSMIL, 4.05 s)"
    )
    for family, device, mode, impl, secs in rows:
        det = "on" if mode else "off"
        print(
            f"{family:8s} {device:6s} {det:7s} {impl:7s} {secs:9.2f}  x{secs / PAPER_SECONDS:.1f}"
        )


if __name__ == "__main__":
    from wsimil import cpu_isa

    cpu_isa.pin()  # the kernels the pipeline computes with (wsimil/cpu_isa.py)
    main()
