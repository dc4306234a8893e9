"""Pictures of one predicted slide: the canvas of its heatmap and the top-k tile montage.

The heatmap (drawn by :func:`wsimil.experiment.heatmaps.save_heatmap`, the one drawer)
paints every tile, at its level-0 footprint scaled to the thumbnail, in the colour of its
score (one fixed colour scale per picture, shown by a colour bar whose label names the
score and the scale); the title gives the slide, the predicted label, its probability and
the decision threshold. Without the slide file (``predict --features`` alone) the tiles are
painted on a white canvas of the slide's extent. Files are written under a temporary name
and renamed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsimil.experiment.heatmaps import pyplot, save_figure

THUMB_PX = 1024  # longest side of the thumbnail the heatmap is drawn on
MONTAGE_TILE_PX = 160


def thumbnail(slide, max_px: int = THUMB_PX) -> tuple[np.ndarray, float]:
    """RGB thumbnail of an open :class:`wsimil.extract.slide.Slide` and its downsample."""
    thumb = np.asarray(slide.osr.get_thumbnail((max_px, max_px)).convert("RGB"))
    return thumb, slide.dimensions[0] / thumb.shape[1]


def blank_canvas(coords: np.ndarray, side: float, max_px: int = THUMB_PX):
    """A white canvas covering the tiles' extent, and its downsample."""
    w, h = (coords.max(axis=0) + side) if len(coords) else (side, side)
    ds = max(w, h) / max_px
    return np.full((max(1, int(h / ds)), max(1, int(w / ds)), 3), 255, np.uint8), ds


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
    save_figure(fig, path)
