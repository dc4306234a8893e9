"""Instance scores on the slide: heatmap images and localisation against tumour masks.

A tile's ground truth is the share of its footprint that the tumour mask covers; a tile is
"tumour" when that share is at least one half. The localisation AUC asks how well an
instance score (DTFD's instance probability, an attention weight) ranks tumour tiles
above the others, which is how the DTFD paper's claim (instance probabilities localise
better than attention) can be checked on the synthetic cohort.

:func:`save_heatmap` is the one heatmap drawer: the cross-validation report's pictures and
``wsimil predict``'s (:mod:`wsimil.serve.slide_maps`) both go through it, as every figure
goes through :func:`save_figure` (temporary name, then rename).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score


def tile_tumour_share(
    coords: np.ndarray, tile_size_level0: float, mask: np.ndarray, mask_downsample: float
) -> np.ndarray:
    """Share of each tile's footprint covered by the mask.

    Args:
        coords: (N, 2) top-left (x, y) at level-0 pixels.
        tile_size_level0: tile side at level-0 pixels.
        mask: (H_m, W_m) boolean mask; one pixel = ``mask_downsample`` level-0 pixels.
        mask_downsample: level-0 pixels per mask pixel.
    """
    integral = np.pad(mask.astype(np.float64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    h, w = mask.shape
    x0 = np.clip(np.floor(coords[:, 0] / mask_downsample).astype(int), 0, w)
    y0 = np.clip(np.floor(coords[:, 1] / mask_downsample).astype(int), 0, h)
    side = max(1, int(round(tile_size_level0 / mask_downsample)))
    x1, y1 = np.clip(x0 + side, 0, w), np.clip(y0 + side, 0, h)
    covered = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return covered / float(side * side)  # (N,)


def localisation_auc(scores: np.ndarray, tumour_share: np.ndarray) -> float:
    """AUC of instance scores for tumour tiles (share ≥ 0.5); NaN if one class is absent."""
    truth = np.asarray(tumour_share) >= 0.5
    if truth.all() or not truth.any():
        return float("nan")
    return float(roc_auc_score(truth, np.asarray(scores, dtype=np.float64)))


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    """``fig`` as a PNG at ``path`` (temporary name, then rename); the figure is closed."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def save_heatmap(
    path: Path,
    image: np.ndarray,
    downsample: float,
    coords: np.ndarray,
    side: float,
    scores: np.ndarray,
    title: str,
    *,
    legend: str = "instance score",
    mask: np.ndarray | None = None,
    mask_downsample: float = 1.0,
) -> None:
    """Tiles coloured by score over ``image``, with a colour bar (and the mask's outline).

    Args:
        image: (H, W, 3) RGB; one pixel = ``downsample`` level-0 pixels (a thumbnail, or a
            blank canvas of the tiles' extent).
        coords: (N, 2) tile top-left (x, y) at level-0 pixels; ``side`` their side there.
        scores: (N,) one colour scale per picture, from their min to their max.
        legend: the colour bar's label (the score's name and scale).
        mask: (H_m, W_m) boolean tumour mask, drawn as a cyan outline; one pixel =
            ``mask_downsample`` level-0 pixels.
    """
    plt = pyplot()
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    h, w = image.shape[:2]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 6 * h / w)))
    ax.imshow(image)
    s = np.asarray(scores, dtype=np.float64)
    low, high = (float(s.min()), float(s.max())) if len(s) else (0.0, 1.0)
    if high <= low:
        high = low + 1e-9
    cells = [
        Rectangle((x, y), side / downsample, side / downsample) for x, y in coords / downsample
    ]
    tiles = PatchCollection(cells, cmap="inferno", alpha=0.6, linewidths=0)
    tiles.set_array(s)
    tiles.set_clim(low, high)
    ax.add_collection(tiles)
    if mask is not None and mask.any():
        scale = mask_downsample / downsample
        ax.contour(
            np.arange(mask.shape[1]) * scale,
            np.arange(mask.shape[0]) * scale,
            mask.astype(float),
            levels=[0.5],
            colors="cyan",
            linewidths=1,
        )
    bar = fig.colorbar(tiles, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label(legend)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)
