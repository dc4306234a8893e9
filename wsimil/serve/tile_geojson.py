"""Tiles as a QuPath-readable GeoJSON FeatureCollection, the instance score as a measurement.

One ``Feature`` per tile: a closed square ``Polygon`` at level-0 pixels (QuPath's image
coordinates), ``properties.objectType`` ``"tile"``, ``properties.measurements`` holding the
score under its name (QuPath colours objects by it: *Measure → Show measurement maps*),
and the scale and instance index. QuPath opens the file with *File → Import objects* (or by
dropping it on the viewer).

A tile's side comes from its level-0 top-left ``coords`` and its ``grid`` cell (wsimil
places tile (col, row) at ``round(col · side)``), so a served answer can carry the file
without knowing how the tiles were cut. Knows nothing of MLflow. The Feature, the
FeatureCollection and the file are :mod:`wsimil.extract.geojson`'s.
"""

from __future__ import annotations

import numpy as np

from wsimil.extract.geojson import feature, feature_collection, polygon


def tile_side(coords: np.ndarray, grid: np.ndarray | None) -> float | None:
    """Tile side in level-0 pixels from positions, or None when it cannot be told.

    From ``coords / grid`` where the cell index is positive; without a grid, the smallest
    spacing between distinct coordinates.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if grid is not None:
        grid = np.asarray(grid, dtype=np.float64).reshape(-1, 2)
        cells = grid > 0
        if cells.any():
            return float(np.median(coords[cells] / grid[cells]))
    steps = [np.diff(np.unique(coords[:, i])) for i in (0, 1)]
    steps = np.concatenate([s[s > 0] for s in steps])
    return float(steps.min()) if len(steps) else None


def tile_features(
    scores: np.ndarray, coords: np.ndarray, side: float, score_name: str, scale: str
) -> list[dict]:
    """One GeoJSON Feature per tile (see the module docstring)."""
    out = []
    for i, ((x, y), v) in enumerate(zip(np.asarray(coords, dtype=np.float64), scores, strict=True)):
        x0, y0, x1, y1 = float(x), float(y), float(x + side), float(y + side)
        square = polygon([[(x0, y0), (x1, y0), (x1, y1), (x0, y1)]])
        properties = {
            "objectType": "tile",
            "name": f"{scale} tile {i}",
            "measurements": {score_name: float(v)},
            "scale": scale,
            "index": i,
        }
        out.append(feature(square, properties))
    return out


def tiles_geojson(
    bag_id: str,
    score_name: str,
    per_scale: dict[str, tuple[np.ndarray, np.ndarray, float]],
) -> dict:
    """The FeatureCollection of a bag's tiles; ``per_scale[scale] = (scores, coords, side)``."""
    features = []
    for scale, (scores, coords, side) in per_scale.items():
        features += tile_features(scores, coords, side, score_name, scale)
    return feature_collection(features, {"bag_id": bag_id, "measurement": score_name})


def bag_geojson(
    bag_id: str,
    score_name: str,
    scales: tuple[str, ...],
    scores: tuple[np.ndarray, ...],
    coords: tuple[np.ndarray | None, ...],
    grid: tuple[np.ndarray, ...] | None,
) -> dict:
    """The FeatureCollection of one scored bag, every tile of every scale.

    Raises:
        ValueError: a scale without level-0 coordinates (the request sent no coords_<s>).
    """
    per_scale = {}
    for k, scale in enumerate(scales):
        if coords[k] is None:
            raise ValueError(
                f"bag {bag_id!r}: GeoJSON needs the tiles' level-0 positions; send "
                f"coords_{scale} (and grid_{scale}) with the features"
            )
        side = tile_side(coords[k], None if grid is None else grid[k]) or 1.0
        per_scale[scale] = (np.asarray(scores[k]), coords[k], side)
    return tiles_geojson(bag_id, score_name, per_scale)
