"""The one embed path: a slide's selected tiles → (K, D) features per scale.

Tiles are read by DataLoader worker processes that serve one slide after another (each
keeps its own OpenSlide handles), the network runs in the calling thread under
``torch.inference_mode`` (CUDA autocast on a GPU), and all scales of a slide go through
the network in the same batches. :func:`embed_selection` is what both the ``features``
stage (:mod:`wsimil.extract.features`, which writes the caches) and a served model's
slide input (:mod:`wsimil.extract.replay`) call, so the two embed a slide alike.

Workers start from a forkserver, not by forking the caller: the caller runs several
threads (Prefect tasks, OpenMP, CUDA), and a fork taken while another thread holds a lock
can leave the child stuck or dead.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from wsimil.extract.cache import SCALE_NAMES, ExtractorSettings
from wsimil.extract.network import Extractor
from wsimil.extract.slide import Scale, Slide, rgba_to_rgb
from wsimil.extract.tiles import Selection

log = logging.getLogger(__name__)

# The version of how kept tiles become features, recorded in every feature cache as
# ``code_version``. Bump it by hand when a change gives other features for the same tiles
# and weights (tile reading or resizing, input_px resizing, normalisation, pooling,
# precision): caches of another version are then re-embedded. Refactors and comment edits
# leave it, and the caches, alone. tests/test_golden.py pins what this version embeds.
FEATURES_RULE = 1


def extractor_settings(extractor: Extractor, input_px: int | None) -> ExtractorSettings:
    """The extractor part of the features' provenance, under :data:`FEATURES_RULE`."""
    return ExtractorSettings(
        **extractor.provenance(),
        input_px=int(input_px or 0),
        feature_dim=extractor.dim,
        weights_path=extractor.weights_path,
        rule=FEATURES_RULE,
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
class Embedded:
    """A selection's features at some scales, and how each scale was read."""

    scales: tuple[Scale, ...]
    features: tuple[np.ndarray, ...]  # one (K, D) float32 per scale


def selection_dataset(
    slide: Slide, sel: Selection, scales: tuple[str, ...], input_px: int | None
) -> TileDataset:
    """The tiles of ``sel`` at ``scales``, scale after scale, as one dataset.

    Raises:
        SlideError: ``slide`` is not the slide the tiles were selected on.
    """
    readers = sel.scales(slide, scales)
    tiles = np.concatenate(
        [
            np.column_stack([np.full(len(sel.coords(s.name)), i, np.int64), sel.coords(s.name)])
            for i, s in enumerate(readers)
        ]
    )  # (K_10x + K_20x, 3): scale index, x0, y0 (the tissue rule has fewer 10x parents)
    return TileDataset(slide.ref.path, list(readers), tiles, input_px)


def embed_selection(
    slide: Slide,
    sel: Selection,
    extractor: Extractor,
    scales: tuple[str, ...] = SCALE_NAMES,
    *,
    input_px: int | None,
    batch_size: int,
    num_workers: int,
    desc: str = "",
) -> Embedded:
    """Embed the tiles ``sel`` keeps on ``slide`` at ``scales``, in one pass through the network.

    Args:
        slide: the open slide the tiles were selected on.
        sel: its selection.
        extractor: the network.
        scales: which scales to embed, in this order.
        input_px: resize tiles to this side for the network (None: as cut).
        batch_size, num_workers: as in :func:`embed`.
        desc: the progress bar's label.

    Raises:
        SlideError: another slide than the selection's, or tiles that cannot be read or
            embedded. A plain I/O error of this process is raised as is (the caller may retry).
    """
    dataset = selection_dataset(slide, sel, scales, input_px)
    try:
        feats = embed(extractor, dataset, batch_size=batch_size, num_workers=num_workers, desc=desc)
    except Exception as exc:
        from_worker = str(exc).startswith("Caught ")  # re-raised with the worker's traceback text
        if isinstance(exc, OSError) and not from_worker:
            raise  # a plain I/O error: the caller may retry
        log.debug("slide %s: embedding failed", slide.ref.slide_id, exc_info=True)
        raise slide.ref.error(f"could not read or embed its tiles: {_last_line(exc)}") from None
    finally:
        dataset.close()
    ends = np.cumsum([len(sel.coords(s)) for s in scales])
    return Embedded(tuple(dataset.scales), tuple(np.split(feats, ends[:-1])))


def _last_line(exc: Exception) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
