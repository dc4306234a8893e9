"""Polygons in level-0 pixels → a GeoJSON FeatureCollection that QuPath imports.

QuPath (File → Import objects) reads a FeatureCollection of Polygon features, coordinates
in level-0 pixels with y down, the exterior ring first and holes after it, each ring
closed. ``properties.objectType`` says what QuPath makes of a feature ("annotation").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def polygon_feature(rings: list[np.ndarray], name: str, color: tuple[int, int, int]) -> dict:
    """One Polygon feature from its rings ((n, 2) level-0 (x, y); exterior first)."""
    coordinates = []
    for ring in rings:
        points = [[round(float(x), 2), round(float(y), 2)] for x, y in ring]
        if len(points) < 3:
            continue
        coordinates.append([*points, points[0]])  # closed
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": coordinates},
        "properties": {
            "objectType": "annotation",
            "classification": {"name": name, "color": list(color)},
        },
    }


def feature_collection(
    polygons: list[list[np.ndarray]], name: str, color: tuple[int, int, int] = (0, 160, 0)
) -> dict:
    """A FeatureCollection with one Polygon per entry of ``polygons`` (degenerate ones left out)."""
    features = [polygon_feature(rings, name, color) for rings in polygons]
    return {
        "type": "FeatureCollection",
        "features": [f for f in features if f["geometry"]["coordinates"]],
    }


def write_geojson(path: Path, collection: dict) -> None:
    """Write ``collection`` to ``path`` atomically (temporary name, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(collection, separators=(",", ":")))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
