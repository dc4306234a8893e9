"""One slide file → its bag, the way the pipeline made the training bags.

A served model that accepts slide paths must select tiles and embed them exactly as the
feature caches it was trained on were made. Those caches record everything needed in their
HDF5 attributes (:mod:`wsimil.extract.cache`): the tile rule (``tile_px``, ``top_k``,
``density_threshold``, ``min_density``, ``seed``) and the extractor (name, weights, their
SHA-256, ``init_seed``, ``input_px``). :func:`recorded_extraction` reads them at
registration; :func:`slide_bag` replays them with :func:`wsimil.extract.tiles.select_tiles` and
:func:`wsimil.extract.features.embed`, the same functions the ``tiles`` and ``features`` stages run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsimil.config import FeaturesConfig, TilesConfig
from wsimil.extract.cache import read_attrs

TILE_KEYS = ("tile_px", "top_k", "density_threshold", "min_density", "seed")
EXTRACTOR_KEYS = ("extractor", "weights", "weights_sha256", "weights_path", "input_px")
RECORDED_KEYS = (*TILE_KEYS, *EXTRACTOR_KEYS, "init_seed", "feature_dim")


class ExtractionError(Exception):
    """Recorded extraction settings that are missing or inconsistent; names the files."""


@dataclass(frozen=True)
class SlideInstances:
    """A slide's instances at the scales a model reads (one entry per scale)."""

    x: tuple[np.ndarray, ...]  # (K, D) float32
    coords: tuple[np.ndarray, ...]  # (K, 2) int64 level-0 (x, y)
    grid: tuple[np.ndarray, ...]  # (K, 2) int64 (col, row)


def recorded_extraction(features_root: Path, scales: tuple[str, ...]) -> dict:
    """The tile and extractor settings every cache under ``features_root`` agrees on.

    Raises:
        ExtractionError: no cache file, a file without the attributes, or files made with
            different settings (a half-finished re-extraction).
    """
    files = sorted(f for s in scales for f in (Path(features_root) / s).glob("*.h5"))
    if not files:
        raise ExtractionError(
            f"{features_root}: no feature caches for scales {', '.join(scales)}; "
            "run `wsimil features` (or `dvc repro`)"
        )
    seen: dict[str, object] | None = None
    for path in files:
        attrs = read_attrs(path) or {}
        missing = [k for k in RECORDED_KEYS if k not in attrs and k != "init_seed"]
        if missing:
            raise ExtractionError(f"{path}: not a wsimil cache (no {', '.join(missing)})")
        values = {k: attrs.get(k) for k in RECORDED_KEYS}
        if seen is None:
            seen, first = values, path
        elif values != seen:
            diff = sorted(k for k in RECORDED_KEYS if values[k] != seen[k])
            raise ExtractionError(
                f"{path} and {first} were made with different {', '.join(diff)}; "
                "run `wsimil features` so that every cache comes from one extractor"
            )
    return dict(seen)


def tiles_config(extraction: dict) -> TilesConfig:
    """The ``tiles`` settings the caches were made with."""
    return TilesConfig(**{k: extraction[k] for k in TILE_KEYS})


def build_recorded_extractor(extraction: dict, weights_file: Path | None, device: str):
    """The recorded extractor, checked against the recorded weights hash.

    Args:
        extraction: from :func:`recorded_extraction`.
        weights_file: the weights (or TorchScript) file shipped with the model; None for
            ``weights: random`` (rebuilt from ``init_seed``).
        device: ``auto`` | ``cpu`` | ``cuda``.

    Raises:
        ExtractionError: the weights are needed but absent, or they hash differently.
    """
    from wsimil.extract.extractors import build_extractor

    name, weights = str(extraction["extractor"]), str(extraction["weights"])
    if weights != "random" and weights_file is None:
        raise ExtractionError(
            f"extractor {name} ({weights}) needs its weight file, which this model does not "
            "carry (registered with registry.include_extractor: false or without the file)"
        )
    if weights == "random":
        cfg = {"extractor": name, "weights": "random"}
    elif Path(name).suffix in {".pt", ".pth", ".ts", ".jit"}:  # TorchScript carries weights
        cfg = {"extractor": str(weights_file), "weights": "pretrained"}
    else:
        cfg = {"extractor": name, "weights": str(weights_file)}
    seed = extraction.get("init_seed")
    features = FeaturesConfig(
        **cfg,
        init_seed=int(seed) if seed not in (None, "none") else 0,
        input_px=int(extraction["input_px"]) or None,
        device=device,
    )
    extractor = build_extractor(features, int(extraction["tile_px"]))
    # A carried state dict was re-saved as safetensors: its own hash was recorded then.
    expected = str(extraction.get("weights_file_sha256") or extraction["weights_sha256"])
    if extractor.weights_sha256 != expected:
        raise ExtractionError(
            f"extractor {name}: weights hash {extractor.weights_sha256[:12]} differs from the "
            f"recorded {expected[:12]}; the model was trained on features of other weights"
        )
    if extractor.dim != int(extraction["feature_dim"]):
        raise ExtractionError(
            f"extractor {name} gives {extractor.dim}-D features, the caches hold "
            f"{extraction['feature_dim']}-D"
        )
    return extractor


def slide_bag(
    path: Path,
    slide_id: str,
    extraction: dict,
    extractor,
    scales: tuple[str, ...],
    *,
    batch_size: int,
) -> SlideInstances:
    """Select a slide's tiles and embed them at ``scales`` with the recorded settings.

    ``slide_id`` seeds the draw of each 10x tile's 20x child, as the slide_id column of
    slides.csv did when the caches were made: the same id gives the same bag.

    Raises:
        wsimil.extract.slide.SlideError: the slide cannot be opened, has no magnification, or has
            no tissue.
    """
    from wsimil.extract.features import TileDataset, embed
    from wsimil.extract.slide import SlideRef, open_slide
    from wsimil.extract.tiles import select_tiles

    ref = SlideRef(slide_id, Path(path))
    cfg = tiles_config(extraction)
    with open_slide(ref) as slide:
        sel = select_tiles(slide, cfg)
        readers = [slide.scale(s, cfg.tile_px) for s in scales]
    placed = {"10x": (sel.coords_10x, sel.grid_10x), "20x": (sel.coords_20x, sel.grid_20x)}
    k = len(sel.density)
    tiles = np.concatenate(
        [np.column_stack([np.full(k, i), placed[s][0]]) for i, s in enumerate(scales)]
    )  # (S·K, 3): scale index, x0, y0
    dataset = TileDataset(ref.path, readers, tiles, int(extraction["input_px"]) or None)
    feats = embed(extractor, dataset, batch_size=batch_size, num_workers=0)
    return SlideInstances(
        x=tuple(feats[i * k : (i + 1) * k] for i in range(len(scales))),
        coords=tuple(placed[s][0] for s in scales),
        grid=tuple(placed[s][1] for s in scales),
    )
