"""Tiles per second of each foundation-model recipe (random weights), fp32 and autocast.

    python benchmarks/extractors.py [--recipes kaiko-vits16 uni ...] [--tiles 64] [--batch 32]
                                    [--device cpu|cuda|auto] [--json out.json]

For each recipe (default: every buildable one on CUDA; the ones up to ViT-L on the CPU)
and each precision (float32; on CUDA also the recipe's autocast dtype, on the CPU
bfloat16 autocast only with --cpu-autocast), the real Kather tiles
(../shared/data/patches-kather-tiatoolbox, repeated to --tiles) go through

- the pipeline: :class:`wsimil.extract.network.Extractor` on uint8 batches (host-to-device
  copy, resize to the recipe's input, normalisation, autocast, pooling, copy back), and
- the bare forward: the pooled network on batches already normalised on the device,

and the table prints tiles/s of both and their ratio (pipeline/bare; 1.0 = no overhead).
One warm-up batch per configuration is not timed; CUDA timings synchronise. Weights are
random (the speed does not depend on them), so nothing is downloaded.

:func:`measure` is the function other benchmarks call (benchmarks/gpu.py for the ViT-L
extraction figure). Anchor: a TRIDENT user reports under 2 minutes for ~15,000 patches
with UNI2-h on one GPU (TRIDENT#183), i.e. >= 125 tiles/s.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

KATHER = Path(__file__).resolve().parents[1].parent / "shared/data/patches-kather-tiatoolbox"
CPU_DEFAULT = ("kaiko-vits16", "kaiko-vitb16", "phikon-v2", "uni")


def kather_tiles(n: int, folder: Path = KATHER) -> torch.Tensor:
    """``n`` real 224 px Kather tiles (the two patches, repeated) as uint8 (n, 3, 224, 224)."""
    from PIL import Image

    tiles = [np.array(Image.open(folder / f"kather{i}.tif").convert("RGB")) for i in (1, 2)]
    batch = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()
    return batch.repeat((n + 1) // 2, 1, 1, 1)[:n]


def _time(fn, batches, sync) -> float:
    fn(batches[0])  # warm-up: kernels, allocator
    sync()
    start = time.perf_counter()
    for b in batches:
        fn(b)
    sync()
    return time.perf_counter() - start


def measure(
    recipe: str, device: str = "cpu", *, n_tiles: int = 64, batch_size: int = 32, amp: bool = False
) -> dict:
    """Pipeline and bare-forward tiles/s of ``recipe`` on ``device`` (random weights).

    Args:
        recipe: a name in :data:`wsimil.extract.recipes.RECIPES`.
        device: ``cpu`` or ``cuda``.
        n_tiles: tiles timed (real Kather tiles, repeated).
        batch_size: tiles per batch.
        amp: autocast in the recipe's dtype (bfloat16 on the CPU).

    Returns:
        recipe, device, precision, n_tiles, pipeline and bare tiles/s, their ratio, params (B).
    """
    from wsimil.config import FeaturesConfig
    from wsimil.extract.extractors import build_extractor
    from wsimil.extract.precision import autocast

    cfg = FeaturesConfig(extractor=recipe, weights="random", device=device)
    ex = build_extractor(cfg, 224)
    if amp and ex.amp_dtype is None:  # the CPU: bfloat16 on request
        ex.amp_dtype = torch.bfloat16
        ex.precision = "bfloat16-autocast"
    if not amp:
        ex.amp_dtype, ex.precision = None, "float32"
    tiles = kather_tiles(n_tiles)
    batches = list(tiles.split(batch_size))
    cuda = ex.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    pipeline_s = _time(ex, batches, sync)
    ready = [((b.to(ex.device).float() / 255 - ex.mean) / ex.std) for b in batches]

    def bare(x):
        with torch.inference_mode(), autocast(ex.device, ex.amp_dtype):
            return ex.model(x)

    bare_s = _time(bare, ready, sync)
    n_params = sum(p.numel() for p in ex.model.parameters()) / 1e9
    return {
        "recipe": recipe,
        "device": device,
        "precision": "autocast" if amp else "float32",
        "n_tiles": n_tiles,
        "pipeline_tiles_s": n_tiles / pipeline_s,
        "bare_tiles_s": n_tiles / bare_s,
        "ratio": bare_s / pipeline_s,
        "params_b": n_params,
    }


def main() -> None:
    from wsimil.extract.recipes import RECIPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", nargs="*")
    ap.add_argument("--tiles", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--cpu-autocast", action="store_true", help="also time bfloat16 on CPU")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    buildable = [n for n, r in RECIPES.items() if r.loader != "conch"]
    names = args.recipes or (buildable if device == "cuda" else list(CPU_DEFAULT))
    amps = (False, True) if device == "cuda" or args.cpu_autocast else (False,)
    head = f"{'recipe':14} {'device':6} {'precision':9} {'params':>7} {'pipeline':>10} "
    print(head + f"{'bare':>10} {'ratio':>6}   (tiles/s; {args.tiles} tiles, batch {args.batch})")
    rows = []
    for name in names:
        for amp in amps:
            r = measure(name, device, n_tiles=args.tiles, batch_size=args.batch, amp=amp)
            rows.append(r)
            if device == "cuda":  # the previous network is gone: give its memory back
                torch.cuda.empty_cache()
            print(
                f"{name:14} {device:6} {r['precision']:9} {r['params_b']:6.2f}B "
                f"{r['pipeline_tiles_s']:10.1f} {r['bare_tiles_s']:10.1f} {r['ratio']:6.2f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    from wsimil import cpu_isa

    cpu_isa.pin()  # the kernels the pipeline computes with (wsimil/cpu_isa.py)
    main()
