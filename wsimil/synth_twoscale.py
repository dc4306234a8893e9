"""A synthetic cohort whose two scales carry different evidence (``synth.twoscale``).

The DMSMIL claim under test: fusing 10x and 20x helps when each scale shows something the
other does not. Here it is so by construction. A positive slide carries one lesion, either:

- ``fine`` (20x only): a fine chromatin texture, a ±``twoscale_texture_amp`` grey-level
  checkerboard of 1-pixel squares at 20x (0.5 µm). The 10x level is the 2x2 mean of the
  20x pixels, in which the checkerboard sums to exactly zero: the slide's 10x level is the
  same pixels as the same slide without the lesion.
- ``architecture`` (10x only): an arrangement, not a texture. All tissue is built of two
  ordinary compartments (loose stroma and dense collagen) in large patches; inside the
  lesion they alternate in squares of ``twoscale_cell_px`` (set it to ``tiles.tile_px``, a
  20x tile's level-0 side). A 20x tile there holds one compartment, as the 20x tiles of
  any slide do; a 10x tile (2x2 of them) shows the alternation, which no normal tissue has.

The label is ``tumour`` for either lesion (slides.csv column ``lesion``: ``fine``,
``architecture`` or empty), so a single-scale model can find only half the positives.
The lesion region is the tumour mask. The same seed writes the same bytes.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from wsimil.config import SynthConfig
from wsimil.synth import (
    EOSIN,
    HAEMATOXYLIN,
    STROMA,
    Morphology,
    SlideSpec,
    _ellipse_sprite,
    _nuclei,
    _scatter,
    _smooth_noise,
    _stamp,
    _tissue_field,
    _tumour_field,
    _upsample,
)

LESIONS = ("fine", "architecture")
# The second compartment: dense, pale-nucleated collagen (more eosin, few gaps).
COLLAGEN = Morphology(3.0, (3.0, 5.0), (0.2, 0.4), (0.7, 1.0), 0.03, 0.95, 0.04)


def with_lesions(specs: list[SlideSpec], positive: str) -> list[SlideSpec]:
    """The plan with a lesion on every positive slide, alternating fine, architecture, ..."""
    out, k = [], 0
    for spec in specs:
        if spec.label == positive:
            spec, k = replace(spec, tumour=None, lesion=LESIONS[k % 2]), k + 1
        out.append(spec)
    return out


def layout(
    rng: np.random.Generator, spec: SlideSpec, cfg: SynthConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tissue, lesion and collagen-compartment masks, each ``(H, W)`` bool at level 0.

    The draws are the same whatever the lesion (a lesion region is drawn for every slide
    and used only by a positive one), so a slide and its lesion-free twin differ only in
    the lesion's pixels.
    """
    h, w, d = cfg.height_px, cfg.width_px, cfg.mask_downsample
    coarse = (h // d, w // d)
    field = _tissue_field(rng, coarse)  # the first draw, as wsimil.synth renders it
    region_c = _tumour_field(rng, field > 0, cfg.tumour_share, int(rng.integers(1, 4)))
    patches = _smooth_noise(rng, coarse, sigma=max(coarse) / 8)  # compartments, large
    tissue = _upsample(field, (h, w)) > 0
    lesion = (_upsample(region_c.astype(np.float32), (h, w)) > 0.5) & tissue
    if spec.lesion is None:
        lesion[:] = False
    collagen = _upsample(patches, (h, w)) > 0
    if spec.lesion == "architecture":
        cell = cfg.twoscale_cell_px
        yy, xx = np.ogrid[0:h, 0:w]
        squares = ((yy // cell + xx // cell) % 2).astype(bool)  # aligned to the 20x tile grid
        collagen = np.where(lesion, squares, collagen)
    return tissue, lesion, collagen


def render_slide(spec: SlideSpec, cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """Render one two-scale slide at level 0: ``(rgb, tumour mask, tumour share)``, as
    :func:`wsimil.synth.render_slide` returns them."""
    rng = np.random.default_rng(spec.seed)
    h, w, d = cfg.height_px, cfg.width_px, cfg.mask_downsample
    tissue, lesion, collagen = layout(rng, spec, cfg)
    centre = (slice(d // 2, None, d), slice(d // 2, None, d))  # coarse cells, sampled
    tissue_c, collagen_c = tissue[centre][: h // d, : w // d], collagen[centre][: h // d, : w // d]

    fibres = _upsample(_smooth_noise(rng, (h // 4, w // 4), sigma=(0.6, 3.0)), (h, w))
    conc_e = np.where(collagen, COLLAGEN.cytoplasm_e, STROMA.cytoplasm_e).astype(np.float32)
    conc_e = np.where(tissue, conc_e * (1 + 0.35 * fibres), 0).astype(np.float32)  # (h, w)
    conc_h = np.where(collagen, COLLAGEN.cytoplasm_h, STROMA.cytoplasm_h).astype(np.float32)
    conc_h = np.where(tissue, conc_h, 0).astype(np.float32)
    layers = []  # per compartment: its gaps and nuclei, drawn over the cells it holds
    for morph, where in ((STROMA, tissue_c & ~collagen_c), (COLLAGEN, tissue_c & collagen_c)):
        gaps, nuclei = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
        gy, gx = _scatter(rng, where, 1e4 * morph.gap_fraction / (np.pi * 12.0**2), d)
        size = rng.integers(0, 3, len(gy))
        for k, radius in enumerate((7.0, 11.0, 16.0)):
            _stamp(gaps, gy[size == k], gx[size == k], _ellipse_sprite(radius, 0.8, 0.3 * k), 1)
        ny, nx = _scatter(rng, where, morph.nuclei_per_10k_px, d)
        _nuclei(rng, nuclei, ny, nx, morph)
        layers.append((gaps, nuclei))
    (gaps_s, nuclei_s), (gaps_c, nuclei_c) = layers
    gaps, nuclei = np.where(collagen, gaps_c, gaps_s), np.where(collagen, nuclei_c, nuclei_s)

    grain = rng.standard_normal((h, w), dtype=np.float32)
    keep = (1.0 - gaps) * tissue
    conc_h = (conc_h + nuclei * (1 + 0.2 * grain)) * keep
    conc_e = conc_e * keep * (1.0 - 0.6 * np.clip(nuclei, 0, 1))
    od = conc_h[..., None] * HAEMATOXYLIN + conc_e[..., None] * EOSIN  # (h, w, 3)
    rgb = np.exp(-od) * 250.0 + 1.5 * grain[..., None]
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    if spec.lesion == "fine":
        rgb = fine_texture(rgb, lesion, cfg.twoscale_texture_amp)

    mask = lesion[: (h // d) * d, : (w // d) * d].reshape(h // d, d, w // d, d).mean((1, 3)) > 0.5
    share = float(lesion.sum() / max(1, tissue.sum()))
    return rgb, mask, share


def fine_texture(rgb: np.ndarray, region: np.ndarray, amp: int) -> np.ndarray:
    """Add a ±``amp`` checkerboard of 1-pixel squares to every 2x2 block inside ``region``.

    Each block gets ``+a`` on one diagonal and ``-a`` on the other, the same ``a`` in every
    channel (a luminance pattern, which JPEG's chroma subsampling keeps), ``a`` capped per
    block so no pixel clips: every block's sum, so the 10x level, is unchanged to the bit.
    """
    h, w = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
    blocks = rgb[:h, :w].astype(np.int16).reshape(h // 2, 2, w // 2, 2, 3)
    room = np.minimum(blocks, 255 - blocks).min(axis=(1, 3, 4))  # (h/2, w/2) headroom
    inside = region[:h, :w].reshape(h // 2, 2, w // 2, 2).all(axis=(1, 3))  # whole blocks
    a = np.where(inside, np.minimum(room, amp), 0)[:, None, :, None, None]
    sign = np.array([[1, -1], [-1, 1]], np.int16)[None, :, None, :, None]  # (1, 2, 1, 2, 1)
    out = rgb.copy()
    out[:h, :w] = (blocks + sign * a).reshape(h, w, 3).astype(np.uint8)
    return out
