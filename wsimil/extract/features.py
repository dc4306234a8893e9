"""A slide's selected tiles → its 10× and 20× feature caches (the ``features`` stage).

Both scales are embedded in one pass by :func:`wsimil.extract.embed.embed_selection` and
written as one HDF5 file per scale (contract in :mod:`wsimil.extract.cache`), skipped
when the files already carry the provenance they would be made with.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wsimil.extract.cache import SCALE_NAMES, Provenance, bag_path, matches, write_h5
from wsimil.extract.embed import embed_selection, extractor_settings
from wsimil.extract.network import Extractor
from wsimil.extract.slide import Scale, SlideRef, open_slide
from wsimil.extract.tiles import Selection
from wsimil.extract.validate import cache_defect, scale_datasets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureResult:
    paths: dict[str, Path]  # scale -> file
    n_tiles: int
    skipped: bool  # the caches already matched; nothing was computed
    seconds: float
    repaired: str = ""  # caches that matched but were damaged, and what was wrong


def feature_provenance(sel: Selection, extractor: Extractor, input_px: int | None) -> Provenance:
    """Everything the features depend on: the selection plus the network."""
    return dataclasses.replace(sel.provenance, extractor=extractor_settings(extractor, input_px))


def features_for_slide(
    ref: SlideRef,
    sel: Selection,
    extractor: Extractor,
    cfg,
    features_root: Path,
    *,
    mpp_override: float | None = None,
) -> FeatureResult:
    """Embed a slide's selected tiles and write its 10× and 20× caches (skip if up to date).

    Args:
        ref: the slide.
        sel: its selected tiles.
        extractor: the network.
        cfg: ``FeaturesConfig`` (batch_size, num_workers, input_px).
        features_root: ``<out_dir>/<extractor tag>``.
        mpp_override: params.yaml → tiles.mpp_override (to reopen the slide as selected).

    Raises:
        SlideError: the slide changed since its tiles were selected, or its tiles cannot be
            read or embedded.
    """
    start = time.perf_counter()
    record = feature_provenance(sel, extractor, cfg.input_px)
    paths = {s: bag_path(features_root, ref.slide_id, s) for s in SCALE_NAMES}
    repaired = ""
    if all(matches(p, {**record.matched(), "scale": s}) for s, p in paths.items()):
        defects = {
            p: cache_defect(p, scale_datasets(sel, s), extractor.dim) for s, p in paths.items()
        }
        if not any(defects.values()):
            return FeatureResult(paths, sel.n_tiles, True, time.perf_counter() - start)
        repaired = "; ".join(f"{p}: {d}" for p, d in defects.items() if d)
        repaired = f"slide {ref.slide_id}: damaged cache recomputed ({repaired})"
    with open_slide(ref, mpp_override=mpp_override) as slide:
        embedded = embed_selection(
            slide,
            sel,
            extractor,
            SCALE_NAMES,
            input_px=cfg.input_px,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            desc=ref.slide_id,
        )
    common = {
        **record.to_attrs(),
        "slide_path": str(ref.path),
        "precision": extractor.precision,
        "n_tissue_tiles": sel.n_tissue,
        "n_grid_tiles_10x": sel.n_grid,
        "fewer_than_top_k": sel.fewer_than_top_k,
        "torch_version": str(torch.__version__),
    }
    for scale, feats in zip(embedded.scales, embedded.features, strict=True):
        datasets, attrs, coords_attrs = _scale_file(sel, scale, feats, slide.mpp)
        write_h5(paths[scale.name], datasets, {**common, **attrs}, {"coords": coords_attrs})
    seconds = time.perf_counter() - start
    n_embedded = sum(len(f) for f in embedded.features)
    log.info("slide %s: embedded %d tiles in %.1f s", ref.slide_id, n_embedded, seconds)
    return FeatureResult(paths, sel.n_tiles, False, seconds, repaired)


def _scale_file(
    sel: Selection, scale: Scale, feats: np.ndarray, level0_mpp: float
) -> tuple[dict, dict, dict]:
    """One scale's datasets, file attributes and ``coords`` attributes."""
    datasets = {"features": feats, **scale_datasets(sel, scale.name)}
    attrs = {
        "scale": scale.name,
        "target_mpp": scale.mpp,
        "level": scale.level,
        "tile_size_level0": scale.tile_size_level0,
    }
    coords_attrs = {  # the names TRIDENT and CLAM readers look for
        "patch_size": scale.tile_px,
        "patch_size_level0": int(round(scale.tile_size_level0)),
        "patch_level": scale.level,
        "downsample": np.array([scale.downsample, scale.downsample]),  # level-0 px per px
        "target_magnification": round(10.0 / scale.mpp, 3),  # 20 at 0.5 µm/px
        "level0_magnification": 10.0 / level0_mpp,
    }
    return datasets, attrs, coords_attrs
