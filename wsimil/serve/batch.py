"""``wsimil predict``: a registered model over a folder of slides or feature caches, offline.

Every slide goes through the served model's own code path: the model is loaded with
``mlflow.pyfunc.load_model`` and each slide is one request row, the row a client would send
to ``mlflow models serve`` (``slide_path``, or ``features_<s>_npy`` + ``grid_<s>`` +
``coords_<s>`` from the feature cache), asked with ``top_k`` = every instance and
``geojson: true``. So a slide's probabilities are the server's answer for it.

Written under ``--out`` (each file under a temporary name, then renamed)::

    predictions.csv          slide_id, patient_id, p_<class>..., label, threshold,
                             instance_score, n_instances, model_uri, model_name, model_version
    patients.csv             per patient: n_slides, p_<class> = the mean over the patient's
                             slides, label = that mean against the same threshold (binary)
                             or its arg-max (more classes)
    failed.csv               slide_id, error: each slide that could not be scored
    heatmaps/<slide>_<scale>.png   instance scores over the thumbnail, colour bar, label
    geojson/<slide>.geojson        the tiles with the score as a QuPath measurement
    montages/<slide>.png           the top-k tiles of the finest scale (needs the slide)

A bad slide is recorded in ``failed.csv`` and the others go on.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from wsimil.atomic import write_text
from wsimil.experiment.heatmaps import save_heatmap
from wsimil.extract.geojson import write_geojson
from wsimil.serve.pyfunc import SLIDE_ROOT_ENV
from wsimil.serve.slide_maps import MONTAGE_TILE_PX, blank_canvas, save_montage, thumbnail
from wsimil.serve.tile_geojson import tile_side

SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide",
    ".dcm", ".qptiff",
)  # fmt: skip
ALL_INSTANCES = 10**9  # top_k that returns every instance of a bag


class PredictError(Exception):
    """Inputs ``predict`` cannot start from; the message names the file and the fix."""


@dataclass(frozen=True)
class SlideInput:
    slide_id: str
    patient_id: str
    slide_path: Path | None = None  # the slide file (thumbnail, montage; slide requests)
    features: dict[str, Path] = field(default_factory=dict)  # scale -> feature cache


@dataclass
class PredictReport:
    predictions: pd.DataFrame
    patients: pd.DataFrame
    failed: list[tuple[str, str]]
    out_dir: Path


def slide_inputs(slides: Path | None, features: Path | None) -> list[SlideInput]:
    """The slides to score: a slide folder, a slides.csv, and/or a feature-cache folder.

    With ``features`` the requests carry features (the caches under ``<features>/<scale>/``);
    ``slides``, when also given, supplies the thumbnails and montages.
    """
    refs: dict[str, tuple[Path, str]] = {}
    if slides is not None:
        refs = _slide_refs(Path(slides))
    if features is None:
        if not refs:
            raise PredictError(
                f"{slides}: no slide files found (suffixes {', '.join(SLIDE_SUFFIXES)})"
            )
        return [SlideInput(sid, pid, path) for sid, (path, pid) in refs.items()]
    features = Path(features)
    scale_dirs = sorted(d for d in features.glob("*x") if d.is_dir()) if features.is_dir() else []
    if not scale_dirs:
        raise PredictError(
            f"{features}: no <scale>/ folders of feature caches (e.g. 20x/<slide>.h5); give "
            "the extractor's folder, e.g. data/features/resnet18"
        )
    ids = sorted({p.stem for d in scale_dirs for p in d.glob("*.h5")})
    return [
        SlideInput(
            sid,
            refs.get(sid, (None, sid))[1],
            refs.get(sid, (None, sid))[0],
            {d.name: d / f"{sid}.h5" for d in scale_dirs},
        )
        for sid in ids
    ]


def _slide_refs(slides: Path) -> dict[str, tuple[Path, str]]:
    """slide_id -> (file, patient_id) from a slides.csv or a folder of slide files."""
    if slides.is_dir():
        files = sorted(p for p in slides.rglob("*") if p.suffix.lower() in SLIDE_SUFFIXES)
        return {p.stem: (p.resolve(), p.stem) for p in files}
    from wsimil.extract.slide import SlideError, read_slide_table

    try:
        refs = read_slide_table(slides)
    except SlideError as exc:
        raise PredictError(str(exc)) from None
    table = pd.read_csv(slides, dtype=str)
    patients = dict(zip(table["slide_id"], table.get("patient_id", table["slide_id"]), strict=True))
    return {r.slide_id: (r.path.resolve(), str(patients[r.slide_id])) for r in refs}


def model_version(uri: str) -> tuple[str, str]:
    """(registered name, version) of a ``models:/`` URI; ("", "") for other URIs."""
    m = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@(.+))", uri)
    if not m:
        return "", ""
    name, number, alias = m.groups()
    if number:
        return name, number
    from mlflow import MlflowClient

    return name, str(MlflowClient().get_model_version_by_alias(name, alias).version)


def _npy_b64(a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, a)
    return base64.b64encode(buf.getvalue()).decode()


def request_row(item: SlideInput, scales: tuple[str, ...]) -> dict:
    """The request record a client would send for ``item``."""
    if not item.features:
        return {"bag_id": item.slide_id, "slide_path": str(item.slide_path)}
    from wsimil.extract.cache import read_bag

    row: dict[str, object] = {"bag_id": item.slide_id}
    for s in scales:
        if s not in item.features:
            raise ValueError(f"slide {item.slide_id}: no {s} feature cache; the model reads {s}")
        bag = read_bag(item.features[s])
        row[f"features_{s}_npy"] = _npy_b64(bag.features)
        row[f"grid_{s}"] = bag.grid.tolist()
        row[f"coords_{s}"] = bag.coords.tolist()
    return row


def predict_cohort(
    model_uri: str,
    items: list[SlideInput],
    out_dir: Path,
    *,
    montage_k: int = 8,
    progress: bool | None = None,
    warn: Callable[[str], None] = lambda m: None,
) -> PredictReport:
    """Score every slide of ``items`` with the model at ``model_uri``; write the outputs."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from tqdm import tqdm

    from wsimil.extract.cache import BagError

    out_dir = Path(out_dir)
    try:
        name, version = model_version(model_uri)
    except MlflowException as exc:
        raise PredictError(f"--model {model_uri}: {_one_line(exc)}") from None
    slide_files = [i.slide_path for i in items if i.slide_path is not None]
    saved = os.environ.get(SLIDE_ROOT_ENV)
    if slide_files and not any(i.features for i in items):  # the server's own slide rule
        os.environ[SLIDE_ROOT_ENV] = os.path.commonpath([str(p.parent) for p in slide_files])
    try:  # the model reads the slide root once, at load
        model = mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as exc:
        raise PredictError(
            f"--model {model_uri}: cannot load it ({_one_line(exc)}); check the name, version "
            "or alias and MLFLOW_TRACKING_URI"
        ) from None
    finally:
        os.environ.pop(SLIDE_ROOT_ENV, None)
        if saved is not None:
            os.environ[SLIDE_ROOT_ENV] = saved
    ensemble = model.unwrap_python_model().ensemble
    classes, scales = list(ensemble.classes), tuple(ensemble.scales)
    rows, failed = [], []
    for item in tqdm(
        items, desc="predict", unit="slide", disable=None if progress is None else not progress
    ):
        try:
            row = request_row(item, scales)
            (answer,) = model.predict(
                pd.DataFrame([row]), params={"top_k": ALL_INSTANCES, "geojson": True}
            )
        except (MlflowException, BagError, ValueError, OSError) as exc:
            failed.append((item.slide_id, _one_line(exc)))
            continue
        rows.append(_prediction_row(item, answer, classes, model_uri, name, version))
        try:
            _write_slide_files(item, answer, out_dir, montage_k)
        except Exception as exc:  # noqa: BLE001 - a picture that fails must not stop the cohort
            warn(f"slide {item.slide_id}: heatmap/montage not written ({_one_line(exc)})")
    predictions = pd.DataFrame(rows)
    patients = patient_table(predictions, classes) if rows else pd.DataFrame()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(predictions, out_dir / "predictions.csv")
    write_csv(patients, out_dir / "patients.csv")
    write_csv(pd.DataFrame(failed, columns=["slide_id", "error"]), out_dir / "failed.csv")
    return PredictReport(predictions, patients, failed, out_dir)


def _one_line(exc: Exception) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return " ".join(str(text).split())


def _prediction_row(item, answer, classes, uri, name, version) -> dict:
    return {
        "slide_id": item.slide_id,
        "patient_id": item.patient_id,
        **{f"p_{c}": answer["probabilities"][c] for c in classes},
        "label": answer["label"],
        "threshold": answer["threshold"],
        "instance_score": answer["instance_score"],
        "n_instances": json.dumps(answer["n_instances"]),
        "model_uri": uri,
        "model_name": name,
        "model_version": version,
    }


def patient_table(predictions: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Mean class probabilities per patient; label by the slides' threshold (binary) or arg-max."""
    cols = [f"p_{c}" for c in classes]
    grouped = predictions.groupby("patient_id", sort=True)
    out = grouped[cols].mean()
    out.insert(0, "n_slides", grouped.size())
    threshold = predictions["threshold"].iloc[0]
    if len(classes) == 2 and pd.notna(threshold):
        out["label"] = np.where(out[cols[1]] >= threshold, classes[1], classes[0])
    else:
        out["label"] = [classes[i] for i in out[cols].to_numpy().argmax(axis=1)]
    out["threshold"] = threshold
    return out.reset_index()


def write_csv(table: pd.DataFrame, path: Path) -> None:
    write_text(path, table.to_csv(index=False))


def _write_slide_files(item: SlideInput, answer: dict, out_dir: Path, montage_k: int) -> None:
    """The slide's GeoJSON, one heatmap per scale and the top-k montage."""
    from wsimil.extract.slide import SlideRef, open_slide

    write_geojson(out_dir / "geojson" / f"{item.slide_id}.geojson", answer["geojson"])
    slide = open_slide(SlideRef(item.slide_id, item.slide_path)) if item.slide_path else None
    try:
        image = None
        if slide is not None:
            image, ds = thumbnail(slide)
        title = f"{item.slide_id}: predicted {answer['label']}"
        probs, threshold = answer["probabilities"], answer["threshold"]
        if len(probs) == 2 and threshold is not None:  # the threshold is on the last class
            last = list(probs)[-1]
            title += f" (p({last}) = {probs[last]:.3f}, threshold {threshold:.3f})"
        else:
            title += f" (p = {probs[answer['label']]:.3f})"
        for scale, top in answer["top_instances"].items():
            coords = np.array([[t["x"], t["y"]] for t in top], dtype=np.float64).reshape(-1, 2)
            grid = np.array([[t["col"], t["row"]] for t in top]).reshape(-1, 2)
            scores = np.array([t["score"] for t in top])
            side = tile_side(coords, grid) or 1.0
            canvas, cds = (image, ds) if image is not None else blank_canvas(coords, side)
            save_heatmap(
                out_dir / "heatmaps" / f"{item.slide_id}_{scale}.png",
                canvas, cds, coords, side, scores, title,
                legend=f"instance score: {answer['instance_score']} ({scale} tiles)",
            )  # fmt: skip
        if slide is not None and montage_k > 0:
            finest = top[:montage_k]  # the last scale drawn is the finest; best first
            tiles = [_tile(slide, t["x"], t["y"], side) for t in finest]
            save_montage(
                out_dir / "montages" / f"{item.slide_id}.png",
                tiles,
                [t["score"] for t in finest],
                f"{item.slide_id}: top {len(tiles)} tiles by {answer['instance_score']}",
            )
    finally:
        if slide is not None:
            slide.close()


def _tile(slide, x: int, y: int, side: float) -> np.ndarray:
    from PIL import Image

    px = max(1, int(round(side)))
    rgb = slide.read(0, x, y, px, px)
    return np.asarray(Image.fromarray(rgb).resize((MONTAGE_TILE_PX, MONTAGE_TILE_PX)))
