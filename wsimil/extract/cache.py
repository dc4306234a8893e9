"""The feature cache: one HDF5 file per slide and scale (the contract other stages rely on).

Layout, compatible with CLAM and TRIDENT readers::

    <features_dir>/10x/<slide_id>.h5 and <features_dir>/20x/<slide_id>.h5
      features      (N, D) float32   one row per tile
      coords        (N, 2) int64     level-0 (x, y) top-left; attrs patch_size,
                                     patch_size_level0, target_magnification (TRIDENT names)
      grid          (N, 2) int64     (col, row) of the tile in the scale's tile grid
      parent_index  (N,)   int64     20× only: row of the 10× parent tile
      density       (N,)   float32   10× only: share of non-white pixels
      attrs         the :class:`Provenance` record (slide, tile settings, extractor) plus
                    facts of the run: slide_path, scale, target_mpp, level,
                    tile_size_level0, precision, n_tissue_tiles, torch_version, ...

A cache is reused while its :class:`Provenance` matches what it would be made from now.
The code's part of that is a declared rule version per stage, not a hash of the source:
``tiles_code_version`` is :data:`wsimil.extract.tiles.TILES_RULE` (which tiles a slide
keeps) and ``code_version`` is :data:`wsimil.extract.embed.FEATURES_RULE` (how kept
tiles become features). Editing the code leaves every cache valid; a change that alters
the output must bump its rule by hand, and ``tests/test_golden.py`` fails until it does.

Files are written under a temporary name and renamed, so an interrupted run leaves either
the old file or the new one. :func:`read_bag` also reads bags made by CLAM or TRIDENT
(``features`` + ``coords``), deriving ``grid`` from the coordinates and tile size.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import h5py
import numpy as np

from wsimil.extract.ids import under
from wsimil.extract.validate import array_defect, remedy

SCALE_NAMES = ("10x", "20x")
# An extractor named by a file with one of these suffixes is a TorchScript file; its cache
# folder is named after the file's stem.
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".jit")


# --- writing and comparing ------------------------------------------------------------------


def write_h5(
    path: Path,
    datasets: dict[str, np.ndarray],
    attrs: dict,
    dataset_attrs: dict[str, dict] | None = None,
) -> None:
    """Write datasets and file attributes to ``path`` atomically (temporary name, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            for name, value in datasets.items():
                f.create_dataset(name, data=value)
            for name, extra in (dataset_attrs or {}).items():
                f[name].attrs.update(_h5_safe(extra))
            f.attrs.update(_h5_safe(attrs))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporaries of ``path`` left by writers that were killed (their pid is gone)."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 : -len(".tmp")]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def read_h5(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """All top-level datasets and the file attributes of an HDF5 file."""
    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in f if isinstance(f[k], h5py.Dataset)}
        return data, _plain(f.attrs)


def read_attrs(path: Path) -> dict | None:
    """The file attributes, or None when the file is missing or unreadable."""
    try:
        with h5py.File(path, "r") as f:
            return _plain(f.attrs)
    except (OSError, KeyError):
        return None


def matches(path: Path, expected: dict) -> bool:
    """True when ``path`` exists and carries every ``expected`` attribute with equal value."""
    attrs = read_attrs(path)
    if attrs is None:
        return False
    return all(k in attrs and attrs[k] == v for k, v in _plain(expected).items())


def _h5_safe(attrs: dict) -> dict:
    """HDF5-storable values: None becomes 'none', str subclasses plain str."""
    return {
        k: "none" if v is None else str(v) if isinstance(v, str) else v for k, v in attrs.items()
    }


def _plain(attrs) -> dict:
    """Attributes as plain Python values (str, int, float, bool, lists) for comparison."""
    out = {}
    for key, value in dict(attrs).items():
        if value is None:
            value = "none"
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


# --- provenance: what a cache was made from -------------------------------------------------


class ProvenanceError(Exception):
    """Attributes that lack part of the provenance record; the message lists the keys."""


@dataclass(frozen=True)
class SlideSource:
    """Which slide, at which magnification (one per slide)."""

    slide_id: str
    slide_quickhash: str  # OpenSlide's content hash of the file
    mpp: float  # level-0 µm/px
    mpp_source: str  # openslide.mpp-x, openslide.objective-power or an override

    @classmethod
    def of(cls, slide) -> SlideSource:
        """The source of an open :class:`wsimil.extract.slide.Slide`."""
        return cls(slide.ref.slide_id, slide.quickhash, float(slide.mpp), slide.mpp_source)


@dataclass(frozen=True)
class TileSettings:
    """How tiles are kept (params.yaml → tiles, SPEC §1) and the tile rule's version."""

    tile_px: int
    top_k: int
    density_threshold: int
    min_density: float
    seed: int
    rule: int | None = None  # tiles.TILES_RULE or grid.TISSUE_RULE; None: before rule versions
    # The tissue rule's settings (``TissueConfig`` as sorted JSON); None: the DMSMIL rule.
    tissue_settings: str | None = None

    @classmethod
    def of(cls, cfg, rule: int) -> TileSettings:
        """The settings of a ``TilesConfig`` under tile rule version ``rule``."""
        tissue = None
        if getattr(cfg, "rule", "density_top_k") == "tissue":
            tissue = json.dumps(cfg.tissue.model_dump(mode="json"), sort_keys=True)
        return cls(
            int(cfg.tile_px), int(cfg.top_k), int(cfg.density_threshold),
            float(cfg.min_density), int(cfg.seed), rule, tissue,
        )  # fmt: skip

    @property
    def tissue(self) -> dict | None:
        """The tissue rule's ``TissueConfig`` fields, or None under the DMSMIL rule."""
        return None if self.tissue_settings is None else json.loads(self.tissue_settings)

    @property
    def cut_px(self) -> int:
        """The side of the tiles the rule cuts (``TilesConfig.cut_px``)."""
        return int(self.tissue["tile_px"]) if self.tissue is not None else self.tile_px

    def params(self) -> dict:
        """The ``TilesConfig`` fields (everything but the rule version)."""
        out = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("rule", "tissue_settings")
        }
        if self.tissue is not None:
            out.update(rule="tissue", tissue=self.tissue)
        return out


@dataclass(frozen=True)
class ExtractorSettings:
    """How kept tiles become features: the network, its weights and the feature rule."""

    extractor: str  # table name, timm model or file name
    weights: str  # random | timm:<arch> | a weights file name
    weights_sha256: str  # "" for random weights
    input_px: int  # tiles resized to this for the network; 0: as cut
    feature_dim: int = field(compare=False)  # follows from the network
    weights_path: str = field(default="", compare=False)  # this machine's copy
    init_seed: int | None = None  # random weights only
    rule: int | None = None  # embed.FEATURES_RULE; None: recorded before rule versions
    stain_norm: str | None = None  # macenko | reinhard; None: no stain normalisation
    stain_reference_sha256: str | None = None  # the reference tile's hash


RULE_ATTRS = {TileSettings: "tiles_code_version", ExtractorSettings: "code_version"}


@dataclass(frozen=True)
class Provenance:
    """What a cache was made from: the one record of extraction provenance.

    A tiles cache records ``slide`` and ``tiles``, a feature cache all three, and the
    extraction a served model replays (:mod:`wsimil.extract.replay`) is ``tiles`` and
    ``extractor``, the same for every slide of a cohort. Stored as flat attributes named
    as the fields, except each ``rule`` (:data:`RULE_ATTRS`); None values are left out.
    """

    tiles: TileSettings
    extractor: ExtractorSettings | None = None
    slide: SlideSource | None = None

    def _parts(self) -> list:
        return [p for p in (self.slide, self.tiles, self.extractor) if p is not None]

    def to_attrs(self) -> dict:
        """Every recorded attribute."""
        return {k: v for part in self._parts() for k, v in _flat(part, matched=False).items()}

    def matched(self) -> dict:
        """The attributes a cache must carry to be up to date (not the recorded-only ones)."""
        return {k: v for part in self._parts() for k, v in _flat(part, matched=True).items()}

    @classmethod
    def from_attrs(cls, attrs: dict, *, slide: bool = True, extractor: bool = True) -> Provenance:
        """Read the record (``slide``/``extractor``: whether that part is expected).

        Raises:
            ProvenanceError: a required attribute is missing.
        """
        missing: list[str] = []
        tiles = _parse(TileSettings, attrs, missing)
        ex = _parse(ExtractorSettings, attrs, missing) if extractor else None
        source = _parse(SlideSource, attrs, missing) if slide else None
        if missing:
            raise ProvenanceError(f"no {', '.join(missing)}")
        return cls(tiles, ex, source)


def _attr(part_type: type, name: str) -> str:
    return RULE_ATTRS[part_type] if name == "rule" else name


def _flat(part, *, matched: bool) -> dict:
    out = {}
    for f in fields(part):
        value = getattr(part, f.name)
        if value is not None and (f.compare or not matched):
            out[_attr(type(part), f.name)] = value
    return out


_TYPES = {"str": str, "int": int, "float": float}


def _parse(part_type: type, attrs: dict, missing: list[str]):
    """One part of the record from ``attrs``; None (and ``missing`` extended) when incomplete."""
    values, absent = {}, []
    for f in fields(part_type):
        key = _attr(part_type, f.name)
        value = attrs.get(key)
        if value is None or value == "none":
            if f.default is MISSING:
                absent.append(key)
        elif f.name == "rule":  # older caches hold a hash of the source there: no rule
            values["rule"] = value if type(value) is int else None
        else:
            values[f.name] = _TYPES[f.type.removesuffix(" | None")](value)
    missing.extend(absent)
    return None if absent else part_type(**values)


# --- paths ----------------------------------------------------------------------------------


def extractor_tag(extractor: str) -> str:
    """A folder name for an extractor: its name, or a file's stem, made path-safe."""
    tag = Path(extractor).stem if Path(extractor).suffix in TORCHSCRIPT_SUFFIXES else extractor
    return re.sub(r"[^A-Za-z0-9._-]+", "_", tag)


def features_dir(out_dir: Path, extractor: str) -> Path:
    """``<out_dir>/<extractor tag>``: where one extractor's bags live."""
    return Path(out_dir) / extractor_tag(extractor)


def bag_path(features_root: Path, slide_id: str, scale: str) -> Path:
    """``<features_root>/<scale>/<slide_id>.h5``; an id that would leave the folder is refused."""
    return under(under(features_root, scale), slide_id, ".h5")


# --- reading bags ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Bag:
    """One slide's instances at one scale.

    Attributes:
        features: (N, D) float32.
        coords: (N, 2) int64 level-0 (x, y) top-left.
        grid: (N, 2) int64 (col, row) in the scale's tile grid.
        tile_size_level0: tile side in level-0 pixels.
        parent_index: (N,) int64 row of the 10× parent (20× wsimil bags), else None.
        attrs: file attributes (for foreign files, merged with the coords attributes).
        path: the file.
    """

    features: np.ndarray
    coords: np.ndarray
    grid: np.ndarray
    tile_size_level0: float
    parent_index: np.ndarray | None
    attrs: dict
    path: Path

    def __len__(self) -> int:
        return len(self.features)


class BagError(Exception):
    """A feature file that does not follow the contract; the message names the file."""


def read_bag(path: Path, *, tile_size_level0: float | None = None) -> Bag:
    """Read a wsimil, CLAM or TRIDENT feature file.

    Args:
        path: an HDF5 file with ``features`` (N, D) and ``coords`` (N, 2).
        tile_size_level0: tile side in level-0 pixels, used to derive ``grid`` when the file
            has no ``grid`` dataset; by default read from the attributes (wsimil
            ``tile_size_level0``, TRIDENT ``patch_size_level0``, CLAM ``patch_size`` ×
            ``downsample``) or, failing those, the smallest spacing between coordinates.

    Raises:
        BagError: the file is missing or lacks ``features``/``coords``.
    """
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise BagError(f"{path}: cannot open feature file ({exc})") from None
    with f:
        for name in ("features", "coords"):
            if name not in f:
                raise BagError(f"{path}: no '{name}' dataset; not a feature bag")
        attrs = {**_plain(f["coords"].attrs), **_plain(f.attrs)}
        try:
            features = np.asarray(f["features"][()], dtype=np.float32)
            if features.ndim == 3 and features.shape[0] == 1:  # some tools save (1, N, D)
                features = features[0]
            coords = np.asarray(f["coords"][()]).reshape(-1, 2).astype(np.int64)
            grid = np.asarray(f["grid"][()], dtype=np.int64) if "grid" in f else None
            parent = (
                np.asarray(f["parent_index"][()], dtype=np.int64) if "parent_index" in f else None
            )
        except (TypeError, ValueError, OSError) as exc:
            raise BagError(f"{path}: unreadable datasets ({exc}){remedy(attrs)}") from None
    defect = array_defect(features, coords, grid, parent)
    if defect:
        raise BagError(f"{path}: {defect}{remedy(attrs)}")
    size = tile_size_level0 or _tile_size_from(attrs, coords)
    if grid is None:
        grid = np.rint(coords / size).astype(np.int64) if size else np.zeros_like(coords)
    return Bag(features, coords, grid, float(size or 0.0), parent, attrs, path)


def _tile_size_from(attrs: dict, coords: np.ndarray) -> float | None:
    """Tile side in level-0 px from wsimil, TRIDENT or CLAM attributes, else coord spacing."""
    if "tile_size_level0" in attrs:
        return float(attrs["tile_size_level0"])
    if "patch_size_level0" in attrs:
        return float(attrs["patch_size_level0"])
    if "patch_size" in attrs:
        downsample = np.atleast_1d(attrs.get("downsample", 1.0))[0]
        return float(attrs["patch_size"]) * float(downsample)
    steps = [np.diff(np.unique(coords[:, i])) for i in (0, 1)]
    steps = np.concatenate([s[s > 0] for s in steps])
    return float(steps.min()) if len(steps) else None


def read_pair(features_root: Path, slide_id: str) -> tuple[Bag, Bag]:
    """The 10× and 20× bags of a slide, checked to pair up (one child per parent).

    Raises:
        BagError: a file is missing or the two do not pair.
    """
    bag10, bag20 = (read_bag(bag_path(features_root, slide_id, s)) for s in SCALE_NAMES)
    parent = bag20.parent_index
    if parent is None:
        raise BagError(f"{bag20.path}: no 'parent_index'; cannot pair it with {bag10.path}")
    if len(parent) != len(bag20) or (
        len(parent) and not 0 <= parent.min() <= parent.max() < len(bag10)
    ):
        raise BagError(f"{bag20.path}: parent_index does not index the {len(bag10)} 10x tiles")
    return bag10, bag20
