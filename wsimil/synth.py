"""The synthetic demo cohort: real pyramidal TIFF slides with known tumour regions.

Each slide is a tiled, JPEG-compressed, multi-level TIFF (20x, 10x, 5x, ...) with its
resolution in the TIFF tags, so OpenSlide opens it as a generic tiled TIFF and reports
``openslide.mpp-x``. The picture is rendered with a Beer-Lambert H&E stain model:

- tissue islands on a white background, pink fibrous stroma with loose (white) gaps and
  small, sparse, elongated nuclei;
- in positive slides a few tumour foci covering ``tumour_share`` of the tissue: crowded,
  large, hyperchromatic, pleomorphic nuclei with no gaps (subtype "a", adenocarcinoma-
  like), or in ``subtypes`` mode alternatively sheets of polygonal cells with abundant
  eosinophilic cytoplasm and medium nuclei (subtype "b", squamous-like).

A ground-truth tumour mask (PNG, one pixel per ``mask_downsample`` level-0 pixels) is
written beside each slide, and ``slides.csv`` lists ``slide_id, patient_id, label, path``
(plus ``mask_path`` and the realised ``tumour_share``). Everything is a function of the
seed: the same seed writes byte-identical files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from wsimil.config import SynthConfig

# Ruifrok & Johnston optical-density vectors (R, G, B) for haematoxylin and eosin.
HAEMATOXYLIN = np.array([0.65, 0.70, 0.29], dtype=np.float32)
EOSIN = np.array([0.07, 0.99, 0.11], dtype=np.float32)

LABELS = {"binary": ("normal", "tumour"), "subtypes": ("subtype_a", "subtype_b")}


@dataclass(frozen=True)
class Morphology:
    """How one tissue type looks: nuclei per 10,000 px², their size and stain."""

    nuclei_per_10k_px: float
    radius_px: tuple[float, float]  # (min, max) semi-major axis at 20x
    elongation: tuple[float, float]  # minor/major axis ratio range
    haematoxylin: tuple[float, float]  # nucleus H concentration range
    cytoplasm_h: float  # background H of the cell bodies
    cytoplasm_e: float  # background E of the cell bodies
    gap_fraction: float  # share of the area left white (loose tissue, fat)


STROMA = Morphology(6.0, (3.5, 6.0), (0.25, 0.5), (0.7, 1.0), 0.04, 0.55, 0.15)
TUMOUR_A = Morphology(20.0, (6.0, 9.5), (0.7, 1.0), (1.1, 1.6), 0.16, 0.35, 0.0)
TUMOUR_B = Morphology(6.0, (5.0, 7.0), (0.75, 1.0), (0.9, 1.2), 0.05, 1.05, 0.0)


# --- fields -------------------------------------------------------------------------------


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]
) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to zero mean, unit std."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return (field - field.mean()) / (field.std() + 1e-8)


def _upsample(field: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a coarse field to ``shape``."""
    zoom = (shape[0] / field.shape[0], shape[1] / field.shape[1])
    out = ndimage.zoom(field, zoom, order=1, mode="nearest", grid_mode=True)
    return out[: shape[0], : shape[1]]


def _tissue_field(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Coarse field > 0 inside tissue: a few islands kept away from the slide border."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ry, rx = (yy / h - 0.5) * 2, (xx / w - 0.5) * 2
    falloff = 1.0 - (ry**2 + rx**2) ** 1.5  # 1 at the centre, <0 near the corners
    return _smooth_noise(rng, shape, sigma=max(h, w) / 10) + 2.2 * falloff - 1.3


def _tumour_field(
    rng: np.random.Generator, tissue: np.ndarray, share: float, n_foci: int
) -> np.ndarray:
    """Boolean coarse mask of tumour foci covering ``share`` of the tissue."""
    h, w = tissue.shape
    ys, xs = np.nonzero(tissue)
    picks = rng.choice(len(ys), size=n_foci, replace=False)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    bumps = np.zeros((h, w), np.float32)
    scale = np.sqrt(share * tissue.sum() / n_foci)  # ~ the side of one focus
    for i in picks:
        bumps += np.exp(-((yy - ys[i]) ** 2 + (xx - xs[i]) ** 2) / (2 * scale**2))
    field = bumps + 0.3 * _smooth_noise(rng, (h, w), sigma=max(1.0, scale / 4))  # ragged edges
    field[~tissue] = -np.inf
    n_target = max(1, int(round(share * tissue.sum())))
    threshold = np.sort(field[tissue])[::-1][n_target - 1]
    return field >= threshold


# --- stamping nuclei and gaps ---------------------------------------------------------------


def _ellipse_sprite(radius: float, elongation: float, angle: float) -> np.ndarray:
    """A soft-edged filled ellipse, values in [0, 1]."""
    r = int(np.ceil(radius)) + 2
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float32)
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * xx + s * yy, -s * xx + c * yy
    dist = np.sqrt((u / radius) ** 2 + (v / (radius * elongation)) ** 2)
    return np.clip((1.0 - dist) * radius, 0.0, 1.0)  # ~1 px anti-aliased rim


def _stamp(canvas: np.ndarray, ys: np.ndarray, xs: np.ndarray, sprite: np.ndarray, value: float):
    """canvas = max(canvas, value * sprite) at every centre (ys, xs), clipped at the border."""
    h, w = canvas.shape
    r = sprite.shape[0] // 2
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    keep = sprite > 0
    dy, dx, vals = dy[keep], dx[keep], sprite[keep] * value
    py = ys[:, None] + dy[None, :]  # (n, pixels)
    px = xs[:, None] + dx[None, :]
    ok = (py >= 0) & (py < h) & (px >= 0) & (px < w)
    flat = (py * w + px)[ok]
    np.maximum.at(canvas.reshape(-1), flat, np.broadcast_to(vals, py.shape)[ok])


def _scatter(
    rng: np.random.Generator,
    region: np.ndarray,
    per_10k_px: float,
    coarse_step: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Poisson points inside a coarse boolean region, returned at level-0 pixels."""
    ys, xs = np.nonzero(region)
    area = len(ys) * coarse_step**2
    n = rng.poisson(per_10k_px * area / 1e4)
    if n == 0 or len(ys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cell = rng.integers(0, len(ys), size=n)
    jitter = rng.integers(0, coarse_step, size=(2, n))
    return ys[cell] * coarse_step + jitter[0], xs[cell] * coarse_step + jitter[1]


def _nuclei(
    rng: np.random.Generator,
    canvas: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    morph: Morphology,
    n_templates: int = 12,
) -> None:
    """Stamp nuclei of ``morph`` at (ys, xs), drawing each from a small set of templates."""
    template = rng.integers(0, n_templates, size=len(ys))
    for t in range(n_templates):
        sel = template == t
        if not sel.any():
            continue
        sprite = _ellipse_sprite(
            rng.uniform(*morph.radius_px), rng.uniform(*morph.elongation), rng.uniform(0, np.pi)
        )
        _stamp(canvas, ys[sel], xs[sel], sprite, rng.uniform(*morph.haematoxylin))


# --- one slide ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlideSpec:
    slide_id: str
    patient_id: str
    label: str
    tumour: Morphology | None
    seed: int
    lesion: str | None = None  # synth.twoscale: "fine" or "architecture" (wsimil.synth_twoscale)


def render_slide(spec: SlideSpec, cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """Render one slide at level 0.

    Returns:
        rgb: (H, W, 3) uint8 image at 20x.
        mask: (H // d, W // d) bool tumour mask, d = ``cfg.mask_downsample``.
        share: realised tumour share of the tissue (0 for normal slides).
    """
    rng = np.random.default_rng(spec.seed)
    h, w, d = cfg.height_px, cfg.width_px, cfg.mask_downsample
    coarse_shape = (h // d, w // d)

    tissue_c = _tissue_field(rng, coarse_shape)  # (h/d, w/d), > 0 in tissue
    tissue_mask_c = tissue_c > 0
    if spec.tumour is not None:
        n_foci = int(rng.integers(1, 4))
        tumour_c = _tumour_field(rng, tissue_mask_c, cfg.tumour_share, n_foci)
        share = float(tumour_c.sum() / tissue_mask_c.sum())
    else:
        tumour_c, share = np.zeros(coarse_shape, bool), 0.0

    # Full-resolution membership: bilinear fields thresholded, so borders are smooth.
    tissue = _upsample(tissue_c, (h, w)) > 0  # (h, w)
    tumour = (_upsample(tumour_c.astype(np.float32), (h, w)) > 0.5) & tissue

    # Stroma: fibrous eosin texture with white gaps.
    fibres = _upsample(_smooth_noise(rng, (h // 4, w // 4), sigma=(0.6, 3.0)), (h, w))  # (h, w)
    conc_e = np.where(tissue, STROMA.cytoplasm_e * (1 + 0.35 * fibres), 0).astype(np.float32)
    conc_h = np.where(tissue, np.float32(STROMA.cytoplasm_h), np.float32(0))

    gaps = np.zeros((h, w), np.float32)
    stroma_c = tissue_mask_c & ~tumour_c
    gap_area = np.pi * 12.0**2
    gy, gx = _scatter(rng, stroma_c, 1e4 * STROMA.gap_fraction / gap_area, d)
    size = rng.integers(0, 3, len(gy))
    for k, radius in enumerate((7.0, 11.0, 16.0)):
        _stamp(gaps, gy[size == k], gx[size == k], _ellipse_sprite(radius, 0.8, 0.3 * k), 1.0)

    nuclei = np.zeros((h, w), np.float32)
    ny, nx = _scatter(rng, stroma_c, STROMA.nuclei_per_10k_px, d)
    _nuclei(rng, nuclei, ny, nx, STROMA)

    if spec.tumour is not None:
        m = spec.tumour
        conc_e = np.where(tumour, m.cytoplasm_e * (1 + 0.15 * fibres), conc_e)
        conc_h = np.where(tumour, np.float32(m.cytoplasm_h), conc_h)
        ty, tx = _scatter(rng, tumour_c, m.nuclei_per_10k_px, d)
        tumour_nuclei = np.zeros((h, w), np.float32)
        _nuclei(rng, tumour_nuclei, ty, tx, m)
        nuclei = np.where(tumour, tumour_nuclei, nuclei)
        gaps[tumour] = 0

    # Chromatin: nuclei are granular, not flat (a fine noise modulates their stain).
    grain = rng.standard_normal((h, w), dtype=np.float32)
    keep = (1.0 - gaps) * tissue
    conc_h = (conc_h + nuclei * (1 + 0.2 * grain)) * keep  # (h, w)
    conc_e = conc_e * keep * (1.0 - 0.6 * np.clip(nuclei, 0, 1))
    od = conc_h[..., None] * HAEMATOXYLIN + conc_e[..., None] * EOSIN  # (h, w, 3)
    rgb = np.exp(-od, out=od)
    rgb *= 250.0
    rgb += 1.5 * grain[..., None]
    rgb = np.clip(rgb, 0, 255, out=rgb).astype(np.uint8)

    mask = tumour[: (h // d) * d, : (w // d) * d].reshape(h // d, d, w // d, d).mean((1, 3)) > 0.5
    return rgb, mask, share


# --- writing --------------------------------------------------------------------------------


def _pyramid(rgb: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """Levels by 2x2 mean reduction: 20x, 10x, 5x, ..."""
    levels = [rgb]
    for _ in range(1, n_levels):
        prev = levels[-1]
        h, w = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
        if h < 2 or w < 2:
            break
        red = prev[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3), dtype=np.float32)
        levels.append(np.round(red).astype(np.uint8))
    return levels


def write_tiff(path: Path, rgb: np.ndarray, cfg: SynthConfig, description: str) -> None:
    """Write a pyramidal, tiled, JPEG-compressed TIFF atomically (temp name, then rename)."""
    import tifffile

    tmp = path.with_name(f".{path.name}.tmp")
    with tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as tif:
        for i, level in enumerate(_pyramid(rgb, cfg.n_levels)):
            mpp = cfg.mpp * 2**i
            tif.write(
                level,
                tile=(cfg.tiff_tile_px, cfg.tiff_tile_px),
                compression="jpeg",
                compressionargs={"level": cfg.jpeg_quality},
                photometric="rgb",
                resolution=(1e4 / mpp, 1e4 / mpp),  # pixels per cm
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
                description=description if i == 0 else None,
                metadata=None,
                software="wsimil",
            )
    os.replace(tmp, path)


def _write_png(path: Path, mask: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
    os.replace(tmp, path)


def plan_cohort(cfg: SynthConfig) -> list[SlideSpec]:
    """Labels, patients and per-slide seeds; slides of one patient share the label."""
    rng = np.random.default_rng(cfg.seed)
    neg_label, pos_label = LABELS[cfg.mode]
    n_pos_patients = int(round(cfg.positive_fraction * cfg.n_patients))
    n_pos_patients = min(max(n_pos_patients, 1), cfg.n_patients - 1)
    patient_pos = np.zeros(cfg.n_patients, bool)
    patient_pos[rng.permutation(cfg.n_patients)[:n_pos_patients]] = True
    # Every patient gets one slide; the remaining slides go to random patients.
    patient_of = np.concatenate(
        [np.arange(cfg.n_patients), rng.integers(0, cfg.n_patients, cfg.n_slides - cfg.n_patients)]
    )
    patient_of = np.sort(patient_of)
    seeds = np.random.SeedSequence(cfg.seed).generate_state(cfg.n_slides)
    specs = []
    for i, p in enumerate(patient_of):
        positive = bool(patient_pos[p])
        if cfg.mode == "binary":
            label, tumour = (pos_label, TUMOUR_A) if positive else (neg_label, None)
        else:
            label, tumour = (pos_label, TUMOUR_B) if positive else (neg_label, TUMOUR_A)
        specs.append(SlideSpec(f"synth-{i:03d}", f"patient-{p:03d}", label, tumour, int(seeds[i])))
    if cfg.twoscale:  # positives alternate between the 20x-only and the 10x-only lesion
        from wsimil.synth_twoscale import with_lesions

        specs = with_lesions(specs, pos_label)
    return specs


def _write_slide(spec: SlideSpec, cfg: SynthConfig, out_dir: Path) -> dict:
    """Render one slide and write its TIFF and mask; return its slides.csv row."""
    from wsimil import synth_tissue

    slide_rel = Path("slides") / f"{spec.slide_id}.tiff"
    mask_rel = Path("masks") / f"{spec.slide_id}.png"
    description = json.dumps(
        {"wsimil_synthetic": True, "slide_id": spec.slide_id, "label": spec.label,
         "mpp": cfg.mpp, "magnification": 20, "seed": spec.seed}
    )  # fmt: skip
    if cfg.tiled_render:  # large slides: tile by tile (wsimil.synth_tissue)
        tiled = synth_tissue.TiledSlide(spec, cfg)
        synth_tissue.write_tiled_tiff(out_dir / slide_rel, tiled, description)
        mask, share = tiled.tumour_mask(), tiled.share
        extra = synth_tissue.write_extras(spec, cfg, None, tiled.tissue_truth, out_dir)
    else:
        if cfg.twoscale:
            from wsimil.synth_twoscale import render_slide as render
        else:
            render = render_slide
        rgb, mask, share = render(spec, cfg)
        truth = lambda: synth_tissue.tissue_truth(spec.seed, cfg)  # noqa: E731
        extra = synth_tissue.write_extras(spec, cfg, rgb, truth, out_dir)
        write_tiff(out_dir / slide_rel, rgb, cfg, description)
    _write_png(out_dir / mask_rel, mask)
    return {
        "slide_id": spec.slide_id,
        "patient_id": spec.patient_id,
        "label": spec.label,
        "path": slide_rel.as_posix(),
        "mask_path": mask_rel.as_posix(),
        "mask_downsample": cfg.mask_downsample,
        "tumour_share": round(share, 4),
        **({"lesion": spec.lesion or ""} if cfg.twoscale else {}),
        **extra,
    }


def write_cohort(cfg: SynthConfig, out_dir: Path, *, n_jobs: int = 1) -> pd.DataFrame:
    """Render and write every slide, its mask and ``slides.csv``; return the table.

    Slides are independent (each has its own seed), so ``n_jobs`` processes render them in
    parallel without changing a byte of the output.
    """
    out_dir = Path(out_dir)
    (out_dir / "slides").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    specs = plan_cohort(cfg)
    if n_jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(n_jobs) as pool:
            rows = list(pool.map(_write_slide, specs, [cfg] * len(specs), [out_dir] * len(specs)))
    else:
        rows = [_write_slide(spec, cfg, out_dir) for spec in specs]
    table = pd.DataFrame(rows)
    tmp = out_dir / ".slides.csv.tmp"
    table.to_csv(tmp, index=False)
    os.replace(tmp, out_dir / "slides.csv")
    return table
