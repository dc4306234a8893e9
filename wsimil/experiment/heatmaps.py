"""Instance scores on the slide: heatmap images and localisation against tumour masks.

A tile's ground truth is the share of its footprint that the tumour mask covers; a tile is
"tumour" when that share is at least one half. The localisation AUC asks how well an
instance score (DTFD's instance probability, an attention weight) ranks tumour tiles
above the others, which is how the DTFD paper's claim (instance probabilities localise
better than attention) can be checked on the synthetic cohort.
"""

from __future__ import annotations

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


def save_heatmap(
    path: Path,
    thumbnail: np.ndarray,
    thumb_downsample: float,
    coords: np.ndarray,
    tile_size_level0: float,
    scores: np.ndarray,
    title: str,
    mask: np.ndarray | None = None,
    mask_downsample: float = 1.0,
) -> None:
    """Draw tiles coloured by score over the slide thumbnail (and the mask outline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(6, 6 * thumbnail.shape[0] / thumbnail.shape[1] + 0.6))
    ax.imshow(thumbnail)
    s = np.asarray(scores, dtype=np.float64)
    span = s.max() - s.min()
    norm = (s - s.min()) / span if span > 0 else np.zeros_like(s)
    cmap = plt.get_cmap("inferno")
    side = tile_size_level0 / thumb_downsample
    for (x, y), v in zip(coords / thumb_downsample, norm, strict=True):
        ax.add_patch(Rectangle((x, y), side, side, color=cmap(v), alpha=0.55, linewidth=0))
    if mask is not None and mask.any():
        scale = mask_downsample / thumb_downsample
        ax.contour(
            np.arange(mask.shape[1]) * scale,
            np.arange(mask.shape[0]) * scale,
            mask.astype(float),
            levels=[0.5],
            colors="cyan",
            linewidths=1,
        )
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
