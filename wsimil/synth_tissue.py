"""Synthetic slides for tissue segmentation: ground-truth tissue masks, pen marks, large slides.

Three options of ``synth`` (all off by default, so the demo cohort is unchanged):

- ``tissue_masks``: write ``masks/<slide_id>.tissue.png`` beside the tumour mask (same
  ``mask_downsample``): the visible tissue, i.e. tissue not covered by ink.
- ``pen_marks``: draw that many ink strokes (blue, green or black) per slide, mostly on the
  glass around the tissue and partly across it, as people mark slides; their mask is
  written as ``masks/<slide_id>.pen.png``. The strokes come from their own generator, so
  a slide's tissue and tumours are those it has without them.
- ``tiled_render``: render the slide tile by tile from two repeating textures (stroma and
  tumour) under a smooth tissue field, so a 40,000 × 30,000 px slide is written in
  bounded memory; each pyramid level is rendered at its own resolution.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from wsimil.config import SynthConfig

PEN_COLOURS = ((30, 60, 180), (40, 140, 60), (30, 30, 35))  # blue, green, black ink
FIELD_STEP = 256  # level-0 px per cell of the tiled renderer's tissue field
TEXTURE_PX = 2048  # side of a repeating texture at level 0


# --- pen marks ------------------------------------------------------------------------------


def pen_strokes(seed: int, shape: tuple[int, int], n: int) -> list[tuple[np.ndarray, int, tuple]]:
    """``n`` ink strokes on a level-0 canvas of ``shape`` (h, w): (points (m, 2) x, y; width; RGB).

    Each stroke is a smooth arc near the slide's edge (where tissue is rare) that may cut
    across the tissue.
    """
    rng = np.random.default_rng([seed, 0x70656E])  # "pen": independent of the slide's draws
    h, w = shape
    width = max(8, min(h, w) // 60)
    strokes = []
    for _ in range(n):
        t = np.linspace(0, 1, 24)
        side = rng.integers(0, 4)
        a = rng.uniform(0.05, 0.2)  # distance from the edge, as a share of the side
        along = rng.uniform(0.1, 0.5) + rng.uniform(0.3, 0.5) * t
        bend = a + rng.uniform(0.05, 0.2) * np.sin(np.pi * t)  # arcs inwards
        inward = 1 - bend if side % 2 else bend  # sides: top, bottom, left, right
        u, v = (along, inward) if side < 2 else (inward, along)
        pts = np.stack([u * w, v * h], axis=1)
        strokes.append((pts, width, PEN_COLOURS[int(rng.integers(0, len(PEN_COLOURS)))]))
    return strokes


def draw_strokes(canvas: np.ndarray, strokes, origin=(0.0, 0.0), scale: float = 1.0, value=None):
    """Draw ``strokes`` on ``canvas`` in place; level-0 (x, y) → ``(p - origin) / scale``.

    ``value`` overrides each stroke's colour (e.g. 1 on a uint8 mask).
    """
    for pts, width, colour in strokes:
        p = np.rint((pts - np.asarray(origin)) / scale).astype(np.int32).reshape(-1, 1, 2)
        thick = max(1, int(round(width / scale)))
        cv2.polylines(canvas, [p], False, colour if value is None else value, thick)


def pen_mask(strokes, shape: tuple[int, int], d: int) -> np.ndarray:
    """(h // d, w // d) bool: mask pixels under ink."""
    canvas = np.zeros((shape[0] // d, shape[1] // d), np.uint8)
    draw_strokes(canvas, strokes, scale=d, value=1)
    return canvas > 0


# --- the tissue ground truth ----------------------------------------------------------------


def tissue_truth(seed: int, cfg: SynthConfig) -> np.ndarray:
    """(h // d, w // d) bool tissue of a slide rendered by :func:`wsimil.synth.render_slide`.

    The tissue field is the first draw of the slide's generator, so it is drawn again here
    and thresholded exactly as the renderer does, then averaged to the mask grid.
    """
    from wsimil.synth import _tissue_field, _upsample

    rng = np.random.default_rng(seed)
    h, w, d = cfg.height_px, cfg.width_px, cfg.mask_downsample
    tissue = _upsample(_tissue_field(rng, (h // d, w // d)), (h, w)) > 0  # (h, w)
    return tissue[: (h // d) * d, : (w // d) * d].reshape(h // d, d, w // d, d).mean((1, 3)) > 0.5


def write_mask_png(path: Path, mask: np.ndarray) -> None:
    """A bool mask as a 0/255 PNG, atomically."""
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
    os.replace(tmp, path)


def write_extras(spec, cfg: SynthConfig, rgb: np.ndarray | None, truth, out_dir: Path) -> dict:
    """Draw pen marks on ``rgb`` (in place) and write the tissue/pen masks asked for.

    Args:
        spec: the slide's ``SlideSpec``.
        cfg: the synth settings.
        rgb: the level-0 image (None: the tiled renderer drew the ink itself).
        truth: (h // d, w // d) bool tissue, or a callable that makes it.
        out_dir: the cohort folder.

    Returns:
        The extra ``slides.csv`` columns.
    """
    row = {}
    shape, d = (cfg.height_px, cfg.width_px), cfg.mask_downsample
    strokes = pen_strokes(spec.seed, shape, cfg.pen_marks)
    ink = pen_mask(strokes, shape, d)
    if cfg.pen_marks:
        if rgb is not None:
            draw_strokes(rgb, strokes)
        rel = Path("masks") / f"{spec.slide_id}.pen.png"
        write_mask_png(out_dir / rel, ink)
        row["pen_mask_path"] = rel.as_posix()
    if cfg.tissue_masks:
        tissue = truth() if callable(truth) else truth
        rel = Path("masks") / f"{spec.slide_id}.tissue.png"
        write_mask_png(out_dir / rel, tissue & ~ink)
        row["tissue_mask_path"] = rel.as_posix()
    return row


# --- large slides, rendered tile by tile ----------------------------------------------------


def _texture(rng: np.random.Generator, morph, side: int, gaps: bool) -> np.ndarray:
    """(side, side, 3) uint8 tissue of one morphology, everywhere (a repeating texture)."""
    from wsimil.synth import EOSIN, HAEMATOXYLIN, _nuclei, _scatter, _smooth_noise, _upsample

    shape = (side, side)
    fibres = _upsample(_smooth_noise(rng, (side // 4, side // 4), sigma=(0.6, 3.0)), shape)
    conc_e = (morph.cytoplasm_e * (1 + 0.35 * fibres)).astype(np.float32)
    conc_h = np.full(shape, morph.cytoplasm_h, np.float32)
    region = np.ones((side // 16, side // 16), bool)
    nuclei = np.zeros(shape, np.float32)
    ny, nx = _scatter(rng, region, morph.nuclei_per_10k_px, 16)
    _nuclei(rng, nuclei, ny, nx, morph)
    keep = np.ones(shape, np.float32)
    if gaps:
        from wsimil.synth import _ellipse_sprite, _stamp

        holes = np.zeros(shape, np.float32)
        gy, gx = _scatter(rng, region, 1e4 * morph.gap_fraction / (np.pi * 144.0), 16)
        _stamp(holes, gy, gx, _ellipse_sprite(11.0, 0.8, 0.3), 1.0)
        keep -= holes
    grain = rng.standard_normal(shape, dtype=np.float32)
    conc_h = (conc_h + nuclei * (1 + 0.2 * grain)) * keep
    conc_e = conc_e * keep * (1.0 - 0.6 * np.clip(nuclei, 0, 1))
    od = conc_h[..., None] * HAEMATOXYLIN + conc_e[..., None] * EOSIN
    rgb = 250.0 * np.exp(-od) + 1.5 * grain[..., None]
    return np.clip(rgb, 0, 255).astype(np.uint8)


class TiledSlide:
    """A large synthetic slide whose pixels are made on demand, one TIFF tile at a time."""

    def __init__(self, spec, cfg: SynthConfig):
        from wsimil.synth import STROMA, _pyramid, _tissue_field, _tumour_field

        rng = np.random.default_rng(spec.seed)
        self.cfg, self.spec = cfg, spec
        h, w = cfg.height_px, cfg.width_px
        coarse = (max(2, -(-h // FIELD_STEP)), max(2, -(-w // FIELD_STEP)))
        self.tissue_field = _tissue_field(rng, coarse)  # (h / 256, w / 256), > 0 in tissue
        tissue_c = self.tissue_field > 0
        self.share = 0.0
        self.tumour_field = np.zeros(coarse, np.float32)
        if spec.tumour is not None:
            tumour_c = _tumour_field(rng, tissue_c, cfg.tumour_share, int(rng.integers(1, 4)))
            self.tumour_field = tumour_c.astype(np.float32)
            self.share = float(tumour_c.sum() / max(1, tissue_c.sum()))
        side = min(TEXTURE_PX, 1 << int(np.log2(min(h, w))))
        self.textures = [_pyramid(_texture(rng, STROMA, side, gaps=True), cfg.n_levels)]
        if spec.tumour is not None:
            self.textures.append(_pyramid(_texture(rng, spec.tumour, side, gaps=False),
                                          cfg.n_levels))  # fmt: skip
        self.strokes = pen_strokes(spec.seed, (h, w), cfg.pen_marks)

    def _field(self, field: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """``field`` bilinearly sampled at level-0 points (ys rows × xs columns)."""
        yy, xx = np.meshgrid(ys / FIELD_STEP - 0.5, xs / FIELD_STEP - 0.5, indexing="ij")
        return ndimage.map_coordinates(field, [yy, xx], order=1, mode="nearest")

    def _tile_field(self, field: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """:meth:`_field` at a tile's pixel centres ``ys``, ``xs`` (level-0, evenly spaced).

        Sampled at the centre of every 8 × 8 block and bilinearly resized (OpenCV aligns
        block centres): the field varies over 256 level-0 px, so this differs from sampling
        every pixel by far less than the texture's noise, at a 64th of the cost.
        """
        half = 3.5 * (ys[1] - ys[0])  # from a block's first pixel centre to the block centre
        coarse = self._field(field, ys[::8] + half, xs[::8] + half)  # (P/8, P/8)
        return cv2.resize(coarse, (len(xs), len(ys)), interpolation=cv2.INTER_LINEAR)

    @staticmethod
    def _wrap(tex: np.ndarray, y0: int, x0: int, p: int) -> np.ndarray:
        """The (p, p) window of a repeating texture at (y0, x0)."""
        ys, xs = np.arange(y0, y0 + p) % tex.shape[0], np.arange(x0, x0 + p) % tex.shape[1]
        if ys[-1] - ys[0] == p - 1 and xs[-1] - xs[0] == p - 1:  # no wrap: a view
            return tex[ys[0] : ys[0] + p, xs[0] : xs[0] + p]
        return tex[np.ix_(ys, xs)]

    def tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        """(P, P, 3) uint8 TIFF tile (ty, tx) of ``level`` (P = ``tiff_tile_px``)."""
        p, ds = self.cfg.tiff_tile_px, 2**level
        ys = np.arange(ty * p, ty * p + p)
        xs = np.arange(tx * p, tx * p + p)
        cy, cx = (ys + 0.5) * ds, (xs + 0.5) * ds  # level-0 centres
        tissue = self._tile_field(self.tissue_field, cy, cx) > 0  # (P, P)
        out = self._wrap(self.textures[0][level], ty * p, tx * p, p)
        if len(self.textures) > 1:
            tumour = self._tile_field(self.tumour_field, cy, cx) > 0.5
            tumour_tex = self._wrap(self.textures[1][level], ty * p, tx * p, p)
            out = np.where((tumour & tissue)[..., None], tumour_tex, out)
        out = np.where(tissue[..., None], out, np.uint8(250))
        if self.strokes:
            out = np.ascontiguousarray(out)
            draw_strokes(out, self.strokes, origin=(tx * p * ds, ty * p * ds), scale=ds)
        return out

    def _mask_centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 centres of the mask grid's rows and columns."""
        d = self.cfg.mask_downsample
        h, w = self.cfg.height_px // d, self.cfg.width_px // d
        return (np.arange(h) + 0.5) * d, (np.arange(w) + 0.5) * d

    def tissue_truth(self) -> np.ndarray:
        """(h // d, w // d) bool tissue at the mask grid (sampled at mask-pixel centres)."""
        return self._field(self.tissue_field, *self._mask_centres()) > 0

    def tumour_mask(self) -> np.ndarray:
        """(h // d, w // d) bool tumour at the mask grid."""
        tumour = self._field(self.tumour_field, *self._mask_centres()) > 0.5
        return tumour & self.tissue_truth()


def write_tiled_tiff(path: Path, slide: TiledSlide, description: str) -> None:
    """Write ``slide`` as a pyramidal tiled JPEG TIFF, one tile in memory at a time."""
    import tifffile

    cfg = slide.cfg
    p = cfg.tiff_tile_px
    tmp = path.with_name(f".{path.name}.tmp")
    big = cfg.height_px * cfg.width_px * 3 > 2**31
    with tifffile.TiffWriter(tmp, bigtiff=big) as tif:
        for level in range(cfg.n_levels):
            h, w = cfg.height_px >> level, cfg.width_px >> level
            if h < 2 or w < 2:
                break
            tiles = (
                slide.tile(level, ty, tx) for ty in range(-(-h // p)) for tx in range(-(-w // p))
            )
            mpp = cfg.mpp * 2**level
            tif.write(
                tiles,
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(p, p),
                compression="jpeg",
                compressionargs={"level": cfg.jpeg_quality},
                photometric="rgb",
                resolution=(1e4 / mpp, 1e4 / mpp),
                resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,
                description=description if level == 0 else None,
                metadata=None,
                software="wsimil",
            )
    os.replace(tmp, path)
