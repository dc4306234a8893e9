"""Pictures of one predicted slide: the instance-score heatmap and the top-k tile montage.

The heatmap paints every tile, at its level-0 footprint scaled to the thumbnail, in the
colour of its score (one fixed colour scale per picture, shown by a colour bar whose label
names the score and the scale); the title gives the slide, the predicted label, its
probability and the decision threshold. Without the slide file (``predict --features``
alone) the tiles are painted on a white canvas of the slide's extent. Files are written
under a temporary name and renamed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

THUMB_PX = 1024  # longest side of the thumbnail the heatmap is drawn on
MONTAGE_TILE_PX = 160


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_atomic(fig, path: Path, dpi: int = 100) -> None:
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


def thumbnail(slide, max_px: int = THUMB_PX) -> tuple[np.ndarray, float]:
    """RGB thumbnail of an open :class:`wsimil.extract.slide.Slide` and its downsample."""
    thumb = np.asarray(slide.osr.get_thumbnail((max_px, max_px)).convert("RGB"))
    return thumb, slide.dimensions[0] / thumb.shape[1]


def blank_canvas(coords: np.ndarray, side: float, max_px: int = THUMB_PX):
    """A white canvas covering the tiles' extent, and its downsample."""
    w, h = (coords.max(axis=0) + side) if len(coords) else (side, side)
    ds = max(w, h) / max_px
    return np.full((max(1, int(h / ds)), max(1, int(w / ds)), 3), 255, np.uint8), ds


def save_heatmap(
    path: Path,
    image: np.ndarray,
    downsample: float,
    coords: np.ndarray,
    side: float,
    scores: np.ndarray,
    *,
    score_name: str,
    scale: str,
    title: str,
) -> None:
    """Tiles coloured by score over ``image`` (level-0 px / ``downsample``), with a colour bar."""
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
    bar = fig.colorbar(tiles, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label(f"instance score: {score_name} ({scale} tiles)")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    save_atomic(fig, path)


def save_montage(path: Path, tiles: list[np.ndarray], scores: list[float], title: str) -> None:
    """The given tiles side by side (best first), each captioned with its score."""
    plt = pyplot()
    n = max(1, len(tiles))
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, tile, score in zip(axes.ravel(), tiles, scores, strict=False):
        ax.imshow(tile)
        ax.set_title(f"{score:.3g}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_atomic(fig, path)
