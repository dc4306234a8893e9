"""GeoJSON that QuPath imports: the one owner of the Feature, the FeatureCollection, the
coordinate convention and the file.

QuPath (File → Import objects) reads a FeatureCollection of Polygon features, coordinates
in level-0 pixels with y down, the exterior ring first and holes after it, each ring
closed. ``properties.objectType`` says what QuPath makes of a feature ("annotation": the
tissue contours below; "tile": the scored tiles of :mod:`wsimil.serve.tile_geojson`). The
geometry builders differ; :func:`polygon`, :func:`feature`, :func:`feature_collection` and
:func:`write_geojson` are shared.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsimil.atomic import write_json


def polygon(rings) -> dict:
    """A Polygon from rings of level-0 (x, y) points (exterior first), each ring closed here;
    a ring of fewer than 3 points is left out."""
    coordinates = []
    for ring in rings:
        points = [[float(x), float(y)] for x, y in ring]
        if len(points) < 3:
            continue
        coordinates.append([*points, points[0]])  # closed
    return {"type": "Polygon", "coordinates": coordinates}


def feature(geometry: dict, properties: dict) -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def feature_collection(features: list[dict], properties: dict | None = None) -> dict:
    """The FeatureCollection of ``features``, with collection-level ``properties`` if given."""
    doc: dict = {"type": "FeatureCollection"}
    if properties is not None:
        doc["properties"] = properties
    doc["features"] = features
    return doc


def write_geojson(path: Path, collection: dict) -> None:
    """Write ``collection`` to ``path`` atomically (temporary name, rename), compact."""
    write_json(path, collection, separators=(",", ":"))


def contour_collection(
    polygons: list[list[np.ndarray]], name: str, color: tuple[int, int, int] = (0, 160, 0)
) -> dict:
    """Tissue contours: one annotation Polygon per entry of ``polygons`` (its rings, (n, 2)
    level-0 (x, y), exterior first; points to 0.01 px); degenerate ones left out."""
    features = []
    for rings in polygons:
        rounded = [[(round(float(x), 2), round(float(y), 2)) for x, y in ring] for ring in rings]
        geometry = polygon(rounded)
        if geometry["coordinates"]:
            label = {"name": name, "color": list(color)}
            features.append(
                feature(geometry, {"objectType": "annotation", "classification": label})
            )
    return feature_collection(features)
