"""Batched embedding of a slide's selected tiles → its 10× and 20× feature caches.

Tiles are read by DataLoader worker processes that serve one slide after another (each
keeps its own OpenSlide handles), the network runs in the calling thread under
``torch.inference_mode`` (CUDA autocast on a GPU), and both scales of a slide go through
the network in the same batches. The result is
written as one HDF5 file per scale (contract in :mod:`wsimil.extract.cache`).

Workers start from a forkserver, not by forking the caller: the caller runs several
threads (Prefect tasks, OpenMP, CUDA), and a fork taken while another thread holds a lock
can leave the child stuck or dead.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from wsimil.extract.cache import bag_path, matches, source_version, write_h5
from wsimil.extract.extractors import Extractor
from wsimil.extract.slide import Scale, Slide, SlideRef, open_slide, rgba_to_rgb
from wsimil.extract.tiles import Selection
from wsimil.extract.validate import cache_defect, scale_datasets

log = logging.getLogger(__name__)

CODE_MODULES = (
    "wsimil.extract.slide",
    "wsimil.extract.tiles",
    "wsimil.extract.extractors",
    "wsimil.extract.features",
)


@dataclass(frozen=True)
class TileRequest:
    """One tile to read: a slide file, how its scale is read, the level-0 top-left."""

    path: str
    scale: Scale
    x0: int
    y0: int
    out_px: int | None = None  # resize for the network (None: as cut)


class TileReader(Dataset):
    """``reader[request]`` is the requested tile as a uint8 (3, H, W) tensor.

    Any tile of any slide: each process keeps its last ``max_open`` slides open, so one
    worker process can serve one slide after another.
    """

    def __init__(self, max_open: int = 4):
        self.max_open = max_open
        self._handles: OrderedDict[str, object] = OrderedDict()

    def __getstate__(self) -> dict:  # a worker opens its own handles
        return {**self.__dict__, "_handles": OrderedDict()}

    def _handle(self, path: str):
        if path in self._handles:
            self._handles.move_to_end(path)
        else:
            import openslide

            self._handles[path] = openslide.OpenSlide(path)
            if len(self._handles) > self.max_open:
                self._handles.popitem(last=False)[1].close()
        return self._handles[path]

    def __getitem__(self, req: TileRequest) -> torch.Tensor:
        scale = req.scale
        region = self._handle(req.path).read_region(
            (req.x0, req.y0), scale.level, (scale.read_px, scale.read_px)
        )
        tile = scale.to_tile(rgba_to_rgb(np.asarray(region)))  # (tile_px, tile_px, 3)
        if req.out_px and req.out_px != tile.shape[0]:
            from PIL import Image

            size = (req.out_px, req.out_px)
            tile = np.array(Image.fromarray(tile).resize(size, Image.Resampling.BILINEAR))
        return torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1)  # (3, H, W)

    def close(self) -> None:
        while self._handles:
            self._handles.popitem()[1].close()


class TileDataset(Dataset):
    """Tiles of one slide as uint8 (3, H, W) tensors.

    Args:
        path: the slide file.
        scales: how each scale is read (from :meth:`Slide.scale`).
        tiles: (scale index, x0, y0) per tile, level-0 top-left.
        out_px: resize tiles to this side for the network (None: as read).
    """

    def __init__(self, path: Path, scales: list[Scale], tiles: np.ndarray, out_px: int | None):
        self.path, self.scales, self.tiles, self.out_px = str(path), scales, tiles, out_px
        self._reader = TileReader(max_open=1)

    def __len__(self) -> int:
        return len(self.tiles)

    def request(self, i: int) -> TileRequest:
        s, x0, y0 = (int(v) for v in self.tiles[i])
        return TileRequest(self.path, self.scales[s], x0, y0, self.out_px)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._reader[self.request(i)]

    def close(self) -> None:
        self._reader.close()


class _Batches:
    """A batch sampler whose batches are replaced before each slide."""

    def __init__(self):
        self.batches: list[list[TileRequest]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class TileLoader:
    """A DataLoader over a :class:`TileReader` whose worker processes outlive one slide."""

    def __init__(self, num_workers: int, *, pin_memory: bool):
        self.sampler = _Batches()
        self.loader = DataLoader(
            TileReader(),
            batch_sampler=self.sampler,
            num_workers=num_workers,
            persistent_workers=True,
            pin_memory=pin_memory,
            prefetch_factor=4,
            multiprocessing_context=worker_context(),
        )

    def batches(self, requests: list[TileRequest], batch_size: int):
        """An iterator of uint8 (B, 3, H, W) batches of ``requests``, in order."""
        self.sampler.batches = [
            requests[i : i + batch_size] for i in range(0, len(requests), batch_size)
        ]
        return iter(self.loader)


@cache
def worker_context():
    """The forkserver context, with this module (and so torch, OpenSlide) preloaded once."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


_local = threading.local()  # one TileLoader per thread and setting (= per slide in flight)


def _thread_loader(num_workers: int, pin_memory: bool, *, fresh: bool = False) -> TileLoader:
    loaders = _local.__dict__.setdefault("loaders", {})
    key = (num_workers, pin_memory)
    if fresh or key not in loaders:  # a dropped loader's workers exit when it is collected
        loaders[key] = TileLoader(num_workers, pin_memory=pin_memory)
    return loaders[key]


def embed(
    extractor: Extractor,
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    desc: str = "",
) -> np.ndarray:
    """(N, D) float32 features of every item of ``dataset``, in order.

    With ``num_workers`` > 0 a :class:`TileDataset` is read by the calling thread's
    reader processes, which stay up from slide to slide (starting them costs more than
    embedding a small slide); after a failure they are replaced.
    """
    from tqdm.auto import tqdm

    persistent = num_workers > 0 and isinstance(dataset, TileDataset)
    if persistent:
        requests = [dataset.request(i) for i in range(len(dataset))]
        batches = _thread_loader(num_workers, extractor.cuda).batches(requests, batch_size)
    else:
        batches = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=extractor.cuda,
            prefetch_factor=4 if num_workers else None,
            multiprocessing_context=worker_context() if num_workers else None,
        )
    out = np.empty((len(dataset), extractor.dim), np.float32)
    n_batches = -(-len(dataset) // batch_size)
    i = 0
    try:
        for batch in tqdm(batches, desc=desc, total=n_batches, unit="batch", leave=False,
                          disable=None):  # fmt: skip
            feats = extractor(batch)  # (B, D)
            out[i : i + len(feats)] = feats.numpy()
            i += len(feats)
    except BaseException:
        if persistent:
            _thread_loader(num_workers, extractor.cuda, fresh=True)
        raise
    return out


@dataclass(frozen=True)
class FeatureResult:
    paths: dict[str, Path]  # scale -> file
    n_tiles: int
    skipped: bool  # the caches already matched; nothing was computed
    seconds: float
    repaired: str = ""  # caches that matched but were damaged, and what was wrong


def feature_provenance(sel: Selection, extractor: Extractor, input_px: int | None) -> dict:
    """Everything the features depend on: the selection plus the network."""
    return {
        **sel.attrs,
        **extractor.provenance(),
        "input_px": int(input_px or 0),
        "code_version": source_version(*CODE_MODULES),
    }


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
    """
    start = time.perf_counter()
    expected = feature_provenance(sel, extractor, cfg.input_px)
    paths = {s: bag_path(features_root, ref.slide_id, s) for s in ("10x", "20x")}
    repaired = ""
    if all(matches(p, {**expected, "scale": s}) for s, p in paths.items()):
        defects = {
            p: cache_defect(p, scale_datasets(sel, s), extractor.dim) for s, p in paths.items()
        }
        if not any(defects.values()):
            return FeatureResult(paths, len(sel.density), True, time.perf_counter() - start)
        repaired = "; ".join(f"{p}: {d}" for p, d in defects.items() if d)
        repaired = f"slide {ref.slide_id}: damaged cache recomputed ({repaired})"
    with open_slide(ref, mpp_override=mpp_override) as slide:
        _check_same_slide(slide, sel)
        tile_px = int(sel.attrs["tile_px"])
        scales = [slide.scale("10x", tile_px), slide.scale("20x", tile_px)]
    k = len(sel.density)
    tiles = np.concatenate(  # both scales in one pass through the network
        [
            np.column_stack([np.zeros(k, np.int64), sel.coords_10x]),
            np.column_stack([np.ones(k, np.int64), sel.coords_20x]),
        ]
    )  # (2K, 3): scale index, x0, y0
    dataset = TileDataset(ref.path, scales, tiles, cfg.input_px)
    try:
        feats = embed(
            extractor,
            dataset,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            desc=ref.slide_id,
        )
    except Exception as exc:
        from_worker = str(exc).startswith("Caught ")  # re-raised with the worker's traceback text
        if isinstance(exc, OSError) and not from_worker:
            raise  # a plain I/O error: the caller may retry
        log.debug("slide %s: embedding failed", ref.slide_id, exc_info=True)
        raise ref.error(f"could not read or embed its tiles: {_last_line(exc)}") from None
    finally:
        dataset.close()
    common = {
        **expected,
        "slide_path": str(ref.path),
        "weights_path": extractor.weights_path,
        "feature_dim": extractor.dim,
        "precision": extractor.precision,
        "n_tissue_tiles": sel.n_tissue,
        "n_grid_tiles_10x": sel.n_grid,
        "fewer_than_top_k": sel.fewer_than_top_k,
        "torch_version": str(torch.__version__),
    }
    for i, scale in enumerate(scales):
        datasets = {"features": feats[i * k : (i + 1) * k], **scale_datasets(sel, scale.name)}
        attrs = {
            **common,
            "scale": scale.name,
            "target_mpp": scale.mpp,
            "level": scale.level,
            "tile_size_level0": scale.tile_size_level0,
        }
        coords_attrs = {  # the names TRIDENT and CLAM readers look for
            "patch_size": scale.tile_px,
            "patch_size_level0": int(round(scale.tile_size_level0)),
            "target_magnification": 20 if scale.name == "20x" else 10,
            "level0_magnification": 10.0 / slide.mpp,
        }
        write_h5(paths[scale.name], datasets, attrs, {"coords": coords_attrs})
    seconds = time.perf_counter() - start
    log.info("slide %s: embedded %d tiles in %.1f s", ref.slide_id, 2 * k, seconds)
    return FeatureResult(paths, k, False, seconds, repaired)


def _check_same_slide(slide: Slide, sel: Selection) -> None:
    if slide.quickhash != sel.attrs["slide_quickhash"] or slide.mpp != sel.attrs["mpp"]:
        raise slide.ref.error(
            "differs from the one its tiles were selected on (content or mpp changed); "
            "run `wsimil tiles` again"
        )


def _last_line(exc: Exception) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
