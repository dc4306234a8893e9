"""Open a slide and resolve its magnification (SPEC §1).

OpenSlide reads the slide (Aperio, Hamamatsu, Leica, MIRAX, Philips, Sakura, Ventana,
DICOM, generic tiled TIFF, ...). Magnification comes from ``openslide.mpp-x``, else from
``openslide.objective-power`` (20× ≙ 0.5 µm/px), else from an ``mpp_override`` given for
the slide in ``slides.csv`` or globally in params.yaml. Each target scale is read from the
pyramid level whose downsample is the largest one not above the needed downsample, and
resized from there (:class:`Scale`).

Every failure is a :class:`SlideError` whose message names the slide, its file and what to
do, so a cohort run can record it and go on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

MPP_20X = 0.5  # µm/px at 20×; 10× is twice that
SCALES = {"10x": 2 * MPP_20X, "20x": MPP_20X}
LEVEL_SLACK = 0.01  # a level up to 1 % coarser than needed still counts as "not above"
MAX_UPSAMPLE = 1.1  # level 0 may be at most this much coarser than 20×


class SlideError(Exception):
    """A slide that cannot be used; the message says which slide and what to do."""


@dataclass(frozen=True)
class SlideRef:
    """One row of ``slides.csv``: what to open and any per-slide mpp override."""

    slide_id: str
    path: Path
    mpp_override: float | None = None

    def error(self, problem: str) -> SlideError:
        return SlideError(f"slide {self.slide_id} ({self.path}) {problem}")


def read_slide_table(csv_path: Path) -> list[SlideRef]:
    """Read ``slides.csv``; relative paths are relative to the csv's folder.

    Raises:
        SlideError: the table is missing, empty, not UTF-8 or malformed, lacks a required
            column, has an empty slide_id or path, an unsafe or repeated slide_id, or an
            mpp_override that is not a positive number (see :mod:`wsimil.extract.tables`).
    """
    from wsimil.extract.tables import TableError, read_table

    csv_path = Path(csv_path)
    try:
        table = read_table(
            csv_path,
            ("slide_id", "path"),
            missing_hint="no such slide table; set tiles.slides_csv in params.yaml",
            dtype={"path": str},
        )
    except TableError as exc:
        raise SlideError(str(exc)) from None
    overrides = [None] * len(table)
    if "mpp_override" in table.columns:
        given = table["mpp_override"].notna()
        numbers = pd.to_numeric(table["mpp_override"], errors="coerce")
        bad = given & ~(numbers > 0)
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            raise SlideError(
                f"{csv_path}: line {table.attrs['lines'][i]}: mpp_override "
                f"{table['mpp_override'].iloc[i]!r} is not a positive number (µm/px); fix it "
                "or leave the cell empty"
            )
        overrides = [float(v) if given.iloc[i] else None for i, v in enumerate(numbers)]
    refs = []
    for row, override in zip(table.itertuples(index=False), overrides, strict=True):
        path = Path(row.path)
        path = path if path.is_absolute() else csv_path.parent / path
        refs.append(SlideRef(str(row.slide_id), path, override))
    return refs


@dataclass(frozen=True)
class Scale:
    """How tiles of one magnification are read from a slide.

    A tile at grid position (col, row) covers target pixels ``[col·tile_px, (col+1)·tile_px)``
    (likewise in y). Its level-0 top-left is ``round(col·tile_px·downsample)``; it is read as a
    ``read_px`` square at pyramid ``level`` and resized to ``tile_px`` when the two differ.
    """

    name: str  # "10x" | "20x"
    mpp: float  # target µm/px
    downsample: float  # level-0 pixels per target pixel
    level: int
    level_downsample: float
    tile_px: int
    read_px: int  # side of the square read at ``level`` for one tile

    @property
    def tile_size_level0(self) -> float:
        return self.tile_px * self.downsample

    def grid_shape(self, dimensions: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of whole tiles that fit in the level-0 ``dimensions`` (w, h)."""
        w, h = dimensions
        return int(h // self.tile_size_level0), int(w // self.tile_size_level0)

    def origins(self, grid: np.ndarray) -> np.ndarray:
        """(N, 2) level-0 (x, y) top-left of tiles at (N, 2) grid positions (col, row)."""
        return np.rint(np.asarray(grid, dtype=np.float64) * self.tile_size_level0).astype(np.int64)

    def to_tile(self, rgb: np.ndarray) -> np.ndarray:
        """Resize one ``read_px`` square to ``tile_px`` (area averaging when shrinking)."""
        if rgb.shape[0] == self.tile_px and rgb.shape[1] == self.tile_px:
            return rgb
        method = Image.Resampling.BOX if self.read_px > self.tile_px else Image.Resampling.BILINEAR
        return np.array(Image.fromarray(rgb).resize((self.tile_px, self.tile_px), method))


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Drop alpha; fully transparent pixels (outside the scanned area) become white."""
    rgb = rgba[..., :3].copy()
    rgb[rgba[..., 3] == 0] = 255
    return rgb


class Slide:
    """An open slide with its magnification resolved.

    Attributes:
        ref: the table row it came from.
        mpp: level-0 µm/px.
        mpp_source: where ``mpp`` came from (``openslide.mpp-x``, ``openslide.objective-power``,
            ``slides.csv mpp_override`` or ``params mpp_override``).
        quickhash: OpenSlide's content hash of the file (the slide's identity in caches).
    """

    def __init__(self, ref: SlideRef, osr, mpp: float, mpp_source: str):
        self.ref = ref
        self.osr = osr
        self.mpp = mpp
        self.mpp_source = mpp_source
        self.quickhash = osr.properties.get("openslide.quickhash-1", "")

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.osr.dimensions

    def close(self) -> None:
        self.osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def scale(self, name: str, tile_px: int, *, mpp: float | None = None) -> Scale:
        """Where and how to read ``tile_px`` tiles at scale ``name`` ("10x" or "20x").

        ``mpp`` reads the scale at another µm/px than the name's (the tissue rule's grid).
        """
        target = SCALES[name] if mpp is None else mpp
        downsample = target / self.mpp
        if downsample < 1 / MAX_UPSAMPLE:
            raise self.ref.error(
                f"has level 0 at {self.mpp:g} µm/px, coarser than {name} ({target:g} µm/px); "
                "wsimil needs slides scanned at 20× or finer (check its mpp or mpp_override)"
            )
        level_ds = self.osr.level_downsamples
        fitting = [i for i, d in enumerate(level_ds) if d <= downsample * (1 + LEVEL_SLACK)]
        level = max(fitting, key=lambda i: level_ds[i]) if fitting else 0
        read_px = max(1, round(tile_px * downsample / level_ds[level]))
        return Scale(name, target, downsample, level, float(level_ds[level]), tile_px, read_px)

    def read(self, level: int, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """RGB (height, width, 3) uint8 at ``level`` from level-0 top-left (x0, y0)."""
        try:
            region = self.osr.read_region((int(x0), int(y0)), level, (int(width), int(height)))
        except Exception as exc:  # OpenSlideError: a corrupt tile or an unsupported codec
            if isinstance(exc, OSError):
                raise
            raise self.ref.error(f"cannot be decoded at level {level}: {exc}") from None
        return rgba_to_rgb(np.asarray(region))

    def read_tile(self, scale: Scale, x0: int, y0: int) -> np.ndarray:
        """One (tile_px, tile_px, 3) tile of ``scale`` at level-0 top-left (x0, y0)."""
        return scale.to_tile(self.read(scale.level, x0, y0, scale.read_px, scale.read_px))


def resolve_mpp(properties, ref: SlideRef, mpp_override: float | None) -> tuple[float, str]:
    """Level-0 µm/px and its source, in the order mpp-x, objective power, overrides.

    Raises:
        SlideError: none of them is available.
    """
    mpp = _positive(properties.get("openslide.mpp-x"))
    if mpp is not None:
        return mpp, "openslide.mpp-x"
    power = _positive(properties.get("openslide.objective-power"))
    if power is not None:
        return 10.0 / power, "openslide.objective-power"  # 20× ≙ 0.5 µm/px
    if ref.mpp_override is not None:
        return ref.mpp_override, "slides.csv mpp_override"
    if mpp_override is not None:
        return mpp_override, "params mpp_override"
    raise ref.error(
        "has no mpp or objective power; set mpp_override for it in slides.csv "
        "or in params.yaml → tiles.mpp_override"
    )


def _positive(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def open_slide(ref: SlideRef, *, mpp_override: float | None = None) -> Slide:
    """Open ``ref`` with OpenSlide and resolve its magnification.

    Args:
        ref: the slide.
        mpp_override: the global fallback (params.yaml → tiles.mpp_override).

    Raises:
        SlideError: missing file, a format OpenSlide does not read, or no magnification.
    """
    import openslide

    if not ref.path.is_file():
        raise ref.error("does not exist; fix its path in slides.csv")
    try:
        osr = openslide.OpenSlide(ref.path)
    except openslide.OpenSlideUnsupportedFormatError:
        if not _is_an_image(ref.path):  # truncated, random bytes, or not an image at all
            raise ref.error(
                "is not a format OpenSlide reads: the file is damaged or not a slide "
                "(truncated, or no image format at all); replace it with an intact copy"
            ) from None
        raise ref.error(
            "is not a format OpenSlide reads (a plain, untiled TIFF or an image?); convert it "
            "to a tiled pyramidal TIFF with its resolution, e.g. `vips tiffsave IN OUT.tif "
            "--tile --pyramid --compression jpeg --xres PX_PER_MM --yres PX_PER_MM`"
        ) from None
    except openslide.OpenSlideError as exc:
        raise ref.error(f"cannot be opened by OpenSlide: {exc}") from None
    try:
        mpp, source = resolve_mpp(osr.properties, ref, mpp_override)
    except SlideError:
        osr.close()
        raise
    return Slide(ref, osr, mpp, source)


def _is_an_image(path: Path) -> bool:
    """Whether Pillow recognises ``path`` as an image (it reads the header only)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd EXIF and large-image warnings
            Image.open(path).close()
    except Image.DecompressionBombError:  # an image, only a very large one
        return True
    except Exception:  # UnidentifiedImageError, or a header that breaks a format plugin
        return False
    return True
