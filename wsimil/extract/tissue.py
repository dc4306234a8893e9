"""Tissue segmentation on a low-resolution image of the slide (SPEC §1b).

The recipe CLAM, TRIDENT and STAMP share, with OpenCV doing every image operation:

1. Read the slide at about ``mask_mpp`` µm/px: the pyramid level whose downsample is the
   largest one not above the needed one, area-resized to the exact mask grid (mask pixel
   ``(j, i)`` covers level-0 ``[j·d, (j+1)·d) × [i·d, (i+1)·d)``, ``d = mask_mpp / mpp``).
2. HSV saturation, median blur, then Otsu's threshold (or a fixed one). Stained tissue is
   saturated; glass, background and most dust are not.
3. Optionally drop pen ink by colour: strongly saturated blue (hue 95-125 of 180) or green
   (35-90), or near-black (value < 50); the ink is dilated by one pixel.
4. Morphological closing (elliptical kernel of ``close_px``).
5. Contours with their holes (``cv2.RETR_CCOMP``): regions below ``min_tissue_um2`` are
   dropped, holes below ``min_hole_um2`` filled. The mask is then redrawn from the kept
   polygons, so the mask, the GeoJSON and the tile grid all say the same thing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from wsimil.extract.slide import LEVEL_SLACK, Slide

log = logging.getLogger(__name__)

PEN_HUES = ((95, 125), (35, 90))  # blue, green ink (OpenCV hue 0-180)
PEN_MIN_SATURATION = 150
PEN_MAX_VALUE = 50  # black ink
QC_MIN_PX = 1024  # a QC thumbnail's long side is enlarged towards this


@dataclass(frozen=True)
class TissueMask:
    """A slide's tissue mask and the polygons it was drawn from.

    Attributes:
        mask: (h, w) bool, one pixel per ``downsample`` level-0 pixels.
        downsample: level-0 pixels per mask pixel (``mask_mpp / mpp``).
        polygons: per tissue region, its rings in level-0 (x, y): the exterior first, then
            its holes; each an (n, 2) float array.
        thumbnail: (h, w, 3) uint8, the image the mask was computed on.
        level: the pyramid level read.
    """

    mask: np.ndarray
    downsample: float
    polygons: list[list[np.ndarray]]
    thumbnail: np.ndarray
    level: int

    @property
    def tissue_fraction(self) -> float:
        """Share of the mask's pixels that are tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def read_low_res(slide: Slide, mask_mpp: float) -> tuple[np.ndarray, float, int]:
    """The slide as an RGB image at ``mask_mpp`` µm/px (capped at level 0).

    Returns:
        (h, w, 3) uint8 with ``h = ceil(H0 / d)``, ``w = ceil(W0 / d)``; ``d`` (level-0 px per
        pixel); the pyramid level read.
    """
    d = max(1.0, mask_mpp / slide.mpp)
    w0, h0 = slide.dimensions
    size = (int(np.ceil(w0 / d)), int(np.ceil(h0 / d)))
    level_ds = slide.osr.level_downsamples
    fitting = [i for i, ds in enumerate(level_ds) if ds <= d * (1 + LEVEL_SLACK)]
    level = max(fitting, key=lambda i: level_ds[i]) if fitting else 0
    lw, lh = slide.osr.level_dimensions[level]
    rgb = slide.read(level, 0, 0, lw, lh)  # (lh, lw, 3)
    # Scale so that mask pixel j covers level-0 [j·d, (j+1)·d); the last one may stick out.
    scale = level_ds[level] / d
    target = (max(1, round(lw * scale)), max(1, round(lh * scale)))
    if target != (lw, lh):
        rgb = cv2.resize(rgb, target, interpolation=cv2.INTER_AREA)
    canvas = np.full((size[1], size[0], 3), 255, np.uint8)
    hh, ww = min(size[1], rgb.shape[0]), min(size[0], rgb.shape[1])
    canvas[:hh, :ww] = rgb[:hh, :ww]
    return canvas, d, level


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """(h, w) bool: pixels of blue, green or black ink, grown by one pixel."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    ink = v < PEN_MAX_VALUE
    for lo, hi in PEN_HUES:
        ink |= (h >= lo) & (h <= hi) & (s >= PEN_MIN_SATURATION)
    return cv2.dilate(ink.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0


def segment(rgb: np.ndarray, downsample: float, mpp: float, cfg) -> tuple[np.ndarray, list]:
    """Tissue mask and polygons of a low-resolution image (module docstring, steps 2-5).

    Args:
        rgb: (h, w, 3) uint8 at ``downsample`` level-0 px per pixel.
        downsample: level-0 pixels per pixel of ``rgb``.
        mpp: level-0 µm/px.
        cfg: ``TissueConfig``.

    Returns:
        (h, w) bool mask and the polygons (rings in level-0 px, see :class:`TissueMask`).
    """
    saturation = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    saturation = cv2.medianBlur(saturation, cfg.median_px)
    if cfg.threshold == "otsu":
        _, binary = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        binary = binary > 0
    else:
        binary = saturation > cfg.saturation_threshold
    if cfg.remove_pen:
        binary &= ~pen_mask(rgb)
    binary = binary.astype(np.uint8)
    if cfg.close_px > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (cfg.close_px, cfg.close_px))
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kernel)
    um2_per_px = (downsample * mpp) ** 2
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    mask = np.zeros_like(binary)
    polygons = []
    if hierarchy is None:
        return mask.astype(bool), polygons
    hierarchy = hierarchy[0]  # (n, 4): next, previous, first child, parent
    for i, outer in enumerate(contours):
        if hierarchy[i][3] != -1 or cv2.contourArea(outer) * um2_per_px < cfg.min_tissue_um2:
            continue
        holes, child = [], hierarchy[i][2]
        while child != -1:
            if cv2.contourArea(contours[child]) * um2_per_px >= cfg.min_hole_um2:
                holes.append(contours[child])
            child = hierarchy[child][0]
        cv2.drawContours(mask, [outer], -1, 1, thickness=cv2.FILLED)
        cv2.drawContours(mask, holes, -1, 0, thickness=cv2.FILLED)
        polygons.append([_ring(c, downsample) for c in (outer, *holes)])
    return mask.astype(bool), polygons


def _ring(contour: np.ndarray, downsample: float) -> np.ndarray:
    """An OpenCV contour (n, 1, 2) of pixel centres → (n, 2) level-0 (x, y) px."""
    return (contour[:, 0, :].astype(np.float64) + 0.5) * downsample


def tissue_mask(slide: Slide, cfg) -> TissueMask:
    """Segment ``slide``'s tissue under ``cfg`` (``TissueConfig``)."""
    rgb, d, level = read_low_res(slide, cfg.mask_mpp)
    mask, polygons = segment(rgb, d, slide.mpp, cfg)
    return TissueMask(mask, d, polygons, rgb, level)


# --- outputs --------------------------------------------------------------------------------


def write_png(path: Path, image: np.ndarray) -> None:
    """Write a uint8 (h, w) or (h, w, 3) RGB image as PNG atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        bgr = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(str(tmp), bgr):
            raise OSError(f"{path}: could not write the PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def qc_thumbnail(tm: TissueMask, tiles_xy: np.ndarray, tile_size_level0: float) -> np.ndarray:
    """The thumbnail with tissue contours (green), holes (blue) and kept tiles (red boxes).

    Args:
        tm: the mask.
        tiles_xy: (K, 2) level-0 top-left of the kept tiles.
        tile_size_level0: their side in level-0 px.
    """
    h, w = tm.thumbnail.shape[:2]
    zoom = max(1, min(-(-QC_MIN_PX // max(h, w, 1)), 16))  # small masks are drawn enlarged
    out = cv2.resize(tm.thumbnail, (w * zoom, h * zoom), interpolation=cv2.INTER_NEAREST)
    px = tm.downsample / zoom  # level-0 px per QC pixel
    side = tile_size_level0 / px
    for x, y in np.asarray(tiles_xy, np.float64) / px:
        p0 = (int(round(x)), int(round(y)))
        p1 = (int(round(x + side)) - 1, int(round(y + side)) - 1)
        cv2.rectangle(out, p0, p1, (220, 30, 30), 1)
    for rings in tm.polygons:
        for k, ring in enumerate(rings):
            pts = np.rint(ring / px - 0.5).astype(np.int32).reshape(-1, 1, 2)
            cv2.polylines(out, [pts], True, (0, 160, 0) if k == 0 else (0, 80, 220), 2)
    return out
