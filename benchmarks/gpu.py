"""GPU figures in one command: extraction tiles/s, MIL epoch times, the served ensemble's p50.

On one GPU (CUDA when present, else the CPU), within about 8 minutes, and prints one table:

- extraction throughput of ``resnet50_trunc``, ``resnet101`` and a ViT-L
  (timm ``vit_large_patch16_224``), float32 and autocast (bfloat16 where supported, else
  float16), tiles/s of the network on 224 px tiles already on the device;
- DMSMIL seconds per epoch at 546 slides x (200 + 200) tiles x 2048-D, one slide per
  step (the shared fit loop's step), next to the paper's 4.05 s on an RTX 3060;
- DTFD-MIL seconds per epoch at 270 slides x 8,000 tiles x 1024-D, timed on a subset of
  slides and scaled to 270;
- the served fold ensemble (5 DMSMIL fold models, one 200 + 200 x 2048-D bag, model only):
  p50 of one fold model, fold by fold, and one pass (:mod:`wsimil.serve.one_pass`).

Weights are random (``features.weights: random``, seeded) and bags are random: the cost
does not depend on them, and nothing is downloaded. It is not part of the test suite
(tests/test_gpu_bench.py runs ``--quick`` only). Asserts nothing.

    python benchmarks/gpu.py            # the full table (meant for a GPU machine)
    python benchmarks/gpu.py --quick    # tiny sizes, any machine, seconds: checks it runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve_latency import make_model, random_bag  # noqa: E402

from wsimil.config import FeaturesConfig, ModelConfig, TrainConfig  # noqa: E402
from wsimil.extract.extractors import build_extractor  # noqa: E402
from wsimil.extract.instances import SlideBag  # noqa: E402
from wsimil.models import MODELS, build_model  # noqa: E402
from wsimil.serve.fold_ensemble import FoldEnsemble  # noqa: E402
from wsimil.train.fit import adam, batches, clip_groups, train_step  # noqa: E402

PAPER_EPOCH_S = 4.05  # DMSMIL paper, 546 TCGA-BRCA slides, RTX 3060


@dataclass(frozen=True)
class Sizes:
    """What is measured; :data:`FULL` is the issue's scale, :data:`QUICK` a smoke run."""

    extractors: tuple[str, ...]
    tile_px: int
    batch: int
    extract_batches: int
    dmsmil: tuple[int, int, int, int]  # (slides in an epoch, slides timed, tiles/scale, dim)
    dtfd: tuple[int, int, int, int]
    folds: int
    serve_bag: tuple[int, int]  # (tiles per scale, dim)
    serve_repeats: int


FULL = Sizes(
    ("resnet50_trunc", "resnet101", "vit_large_patch16_224"),
    224, 128, 20, (546, 546, 200, 2048), (270, 40, 8000, 1024), 5, (200, 2048), 50,
)  # fmt: skip
QUICK = Sizes(
    ("resnet18",), 32, 2, 1, (546, 2, 16, 32), (270, 2, 64, 32), 2, (16, 32), 2
)  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``, after one warm-up call."""
    fn()
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def extraction_rows(s: Sizes, device: torch.device) -> list[tuple]:
    """Tiles/s of each extractor's network, float32 and autocast, on device-resident tiles."""
    rows = []
    for name in s.extractors:
        cfg = FeaturesConfig(extractor=name, weights="random", device=device.type)
        ext = build_extractor(cfg, s.tile_px)
        net = ext.model
        tiles = torch.rand(s.batch, 3, s.tile_px, s.tile_px, device=device)
        if device.type == "cuda":
            tiles = tiles.contiguous(memory_format=torch.channels_last)
        amp_dtype = ext.amp_dtype or torch.bfloat16  # CPU autocast: bfloat16
        for precision in ("float32", "autocast"):

            def run(net=net, tiles=tiles, precision=precision, amp_dtype=amp_dtype):
                with (
                    torch.inference_mode(),
                    torch.autocast(device.type, dtype=amp_dtype, enabled=precision == "autocast"),
                ):
                    return net(tiles)

            secs = timed(run, device, s.extract_batches)
            dtype = str(amp_dtype).replace("torch.", "")
            label = precision if precision == "float32" else f"autocast {dtype}"
            rate = s.batch / statistics.median(secs)
            rows.append(("extract", f"{name}, {label}", f"{rate:,.3g} tiles/s", ""))
        del ext, net, tiles
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def random_slides(n: int, n_scales: int, tiles: int, dim: int, seed: int = 0) -> list[SlideBag]:
    """``n`` random bags with a compact tile grid per scale."""
    gen = torch.Generator().manual_seed(seed)
    side = int(np.ceil(np.sqrt(tiles)))
    cells = torch.arange(tiles)
    grid = torch.stack([cells % side, cells // side], 1)  # (tiles, 2) (col, row)
    return [
        SlideBag(
            f"s{i}",
            i % 2,
            tuple(torch.randn(tiles, dim, generator=gen) for _ in range(n_scales)),
            tuple(grid for _ in range(n_scales)),
        )
        for i in range(n)
    ]


def epoch_seconds(family: str, shape: tuple[int, int, int, int], device: torch.device) -> float:
    """One epoch of ``shape[0]`` slides (one per step), timed on ``shape[1]`` and scaled."""
    n_epoch, n_timed, tiles, dim = shape
    n_scales = MODELS[family].n_scales
    bags = random_slides(n_timed, n_scales, tiles, dim)
    model = build_model(family, ModelConfig(), [dim] * n_scales, 2).to(device).train()
    cfg = TrainConfig(grad_clip=5.0 if family == "dtfd" else None)
    opt = adam(model, cfg)
    groups = clip_groups(model)
    steps = batches(bags, 1, np.arange(len(bags)))
    for batch in steps[: min(3, len(steps))]:  # warm-up (allocator, kernels)
        train_step(model, batch, opt, groups, cfg.grad_clip, device)
    sync(device)
    t0 = time.perf_counter()
    for batch in steps:
        train_step(model, batch, opt, groups, cfg.grad_clip, device)
    sync(device)
    return (time.perf_counter() - t0) * n_epoch / n_timed


def training_rows(s: Sizes, device: torch.device) -> list[tuple]:
    rows = []
    for family, shape in (("dmsmil", s.dmsmil), ("dtfd", s.dtfd)):
        n_epoch, n_timed, tiles, dim = shape
        secs = epoch_seconds(family, shape, device)
        per_scale = " + ".join([str(tiles)] * MODELS[family].n_scales)
        what = f"{family} epoch, {n_epoch} x ({per_scale}) x {dim}-D"
        if n_timed != n_epoch:
            what += f", timed on {n_timed}, scaled"
        ref = f"paper {PAPER_EPOCH_S} s on an RTX 3060" if family == "dmsmil" else ""
        rows.append(("train", what, f"{secs:.2f} s", ref))
    return rows


def serving_rows(s: Sizes, device: torch.device) -> list[tuple]:
    """p50 of the served DMSMIL fold ensemble's forward on one bag (no HTTP)."""
    tiles, dim = s.serve_bag
    xs, grids = random_bag(tiles, dim, 2)
    with tempfile.TemporaryDirectory(prefix="wsimil-gpu-") as tmp:
        models_dir, _ = make_model("dmsmil", s.folds, dim, Path(tmp))
        ens = FoldEnsemble.load(models_dir, device.type)
    k = len(ens.models)
    cases = (
        ("one fold model", FoldEnsemble(ens.manifest, ens.models[:1], ens.device)),
        (f"{k} folds, fold by fold", FoldEnsemble(ens.manifest, ens.models, ens.device,
                                                  one_pass=False)),
        (f"{k} folds, one pass (served on a GPU)", FoldEnsemble(ens.manifest, ens.models,
                                                                ens.device, one_pass=True)),
    )  # fmt: skip
    rows, single = [], None
    for name, e in cases:
        p50 = statistics.median(timed(lambda e=e: e.predict(xs, grids), device, s.serve_repeats))
        single = single or p50
        what = f"serve dmsmil {tiles} + {tiles} x {dim}-D, {name}"
        rows.append(("serve", what, f"{p50 * 1e3:.1f} ms p50", f"{p50 / single:.2f}x one fold"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--only", nargs="+", choices=["extract", "train", "serve"])
    args = ap.parse_args()
    s = QUICK if args.quick else FULL
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    start = time.perf_counter()
    rows = measure(s, device, args.only)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    threads = torch.get_num_threads()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{name} ({device}), torch {torch.__version__}, {threads} CPU threads, load {load}")
    print(f"{'quick (tiny sizes)' if args.quick else 'full sizes'}; "
          f"{time.perf_counter() - start:.0f} s in all\n")  # fmt: skip
    print(table(rows))


def measure(s: Sizes, device: torch.device, only: list[str] | None = None) -> list[tuple]:
    """The rows of every part (or of those in ``only``)."""
    parts = {"extract": extraction_rows, "train": training_rows, "serve": serving_rows}
    return [row for key, part in parts.items() if only is None or key in only
            for row in part(s, device)]  # fmt: skip


def table(rows: list[tuple]) -> str:
    lines = ["| part | what | figure | beside it |", "|---|---|---|---|"]
    return "\n".join(lines + [f"| {' | '.join(row)} |" for row in rows])


if __name__ == "__main__":
    from wsimil import cpu_isa

    cpu_isa.pin()  # the kernels the pipeline computes with (wsimil/cpu_isa.py)
    main()
