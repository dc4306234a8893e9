"""The pyfunc model that ``mlflow models serve`` runs: a fold ensemble behind checked requests.

Logged as a *model from code* (``wsimil/serve/entry.py`` names this class), so nothing is
pickled: at load it reads the bundle that ``register`` shipped as the ``bundle`` artifact,

    bundle/models/ensemble.json           family, model config, scales, classes, thresholds
    bundle/models/fold<k>.safetensors     one state dict per fold
    bundle/extraction.json                the recorded tile rule and extractor (slide input)
    bundle/extractor/<file>               the extractor's weights, when they are a file

and the serve settings (:class:`wsimil.config.ServeConfig`) from the model config, which
the ``SERVING_MODEL_CONFIG`` environment variable (JSON) can override when serving.

Request: one row per bag (``dataframe_records``), columns in :mod:`wsimil.serve.requests`;
the request parameter ``top_k`` sets how many top instances come back per scale, and
``geojson: true`` adds ``"geojson"``: every tile with its score as a QuPath measurement
(:mod:`wsimil.serve.tile_geojson`; the request must carry ``coords_<s>`` or a slide).
Answer, one object per bag::

    {"bag_id": "s1", "probabilities": {"normal": 0.1, "tumour": 0.9}, "label": "tumour",
     "threshold": 0.42, "n_instances": {"20x": 200}, "instance_score": "instance_prob",
     "top_instances": {"20x": [{"index": 17, "score": 0.98, "x": 4096, "y": 1024,
                                "col": 32, "row": 8}, ...]}}

Bad requests raise an ``MlflowException`` whose error code the scoring server turns into a
400 (invalid value), 403 (slide path not allowed) or 404 (no such slide); the server goes on.
Under ``mlflow models serve`` the model also puts :mod:`wsimil.serve.limits` in front of the
server at load: bodies over ``serve.max_request_mb`` get a 413, non-JSON a 415, and every
error answer is one short JSON line.
Slide paths are accepted only under ``WSIMIL_SERVE_SLIDE_ROOT``; the extractor is then
built once at load, on the model's device (CUDA when present, else CPU).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    PERMISSION_DENIED,
    RESOURCE_DOES_NOT_EXIST,
)

from wsimil import cpu_isa
from wsimil.config import ServeConfig
from wsimil.serve.fold_ensemble import FoldEnsemble
from wsimil.serve.limits import guard_scoring_server
from wsimil.serve.requests import BagRequest, Limits, RequestError, parse_bags
from wsimil.serve.tile_geojson import bag_geojson

log = logging.getLogger(__name__)

SLIDE_ROOT_ENV = "WSIMIL_SERVE_SLIDE_ROOT"
BUNDLE = "bundle"  # the artifact key of the model's files
ERROR_CODES = {400: INVALID_PARAMETER_VALUE, 403: PERMISSION_DENIED, 404: RESOURCE_DOES_NOT_EXIST}


class FoldEnsembleModel(mlflow.pyfunc.PythonModel):
    """See the module docstring."""

    def load_context(self, context) -> None:
        cpu_isa.pin()  # before the first kernel: the same CPU kernels as the pipeline's runs
        self.settings = ServeConfig.model_validate(context.model_config or {})
        bundle = Path(context.artifacts[BUNDLE])
        self.ensemble = FoldEnsemble.load(bundle / "models", self.settings.device)
        self.limits = Limits(
            self.settings.max_instances, self.settings.max_bags, self.settings.max_grid_cells
        )
        guard_scoring_server(int(self.settings.max_request_mb * 2**20))  # under `models serve`
        root = os.environ.get(SLIDE_ROOT_ENV)
        self.slide_root = Path(root) if root else None
        manifest = bundle / "extraction.json"
        self.extraction = json.loads(manifest.read_text()) if manifest.is_file() else None
        self.extractor, self.no_slides = None, "it was registered without extraction settings"
        if self.slide_root is not None and self.extraction is not None:
            from wsimil.extract.replay import ExtractionError, build_recorded_extractor

            carried = self.extraction.get("weights_file")
            try:
                self.extractor = build_recorded_extractor(
                    self.extraction,
                    bundle / carried if carried else None,
                    str(self.ensemble.device.type),
                )
            except ExtractionError as exc:  # features still work; slide requests say why
                self.no_slides = str(exc)
                log.warning("slide_path input is off: %s", exc)

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        try:
            top_k = _top_k(params, self.settings.top_instances)
            geojson = _flag(params, "geojson")
            bags = parse_bags(
                as_table(model_input),
                self.ensemble.scales,
                self.ensemble.in_dims,
                self.limits,
                needs_grid=self.ensemble.needs_grid,
                slide_root=self.slide_root,
            )
            return [self.answer(bag, top_k, geojson=geojson) for bag in bags]
        except RequestError as exc:
            raise MlflowException(str(exc), error_code=ERROR_CODES[exc.status]) from None

    def answer(self, bag: BagRequest, top_k: int, *, geojson: bool = False) -> dict:
        """One bag's answer (see the module docstring)."""
        x, grid, coords = bag.x, bag.grid, bag.coords
        if bag.slide_path is not None:
            x, grid, coords = self._embed(bag)
        result = self.ensemble.predict(x, grid)
        name = self.ensemble.primary_score or next(iter(result.scores))
        scores = result.scores[name]
        top = {
            scale: top_instances(scores[i], top_k, coords[i], None if grid is None else grid[i])
            for i, scale in enumerate(self.ensemble.scales)
        }
        p = result.probabilities
        extra = {}
        if geojson:
            try:
                extra["geojson"] = bag_geojson(
                    bag.bag_id, name, self.ensemble.scales, scores, coords, grid
                )
            except ValueError as exc:
                raise RequestError(str(exc)) from None
        return {
            "bag_id": bag.bag_id,
            "probabilities": {c: float(v) for c, v in zip(self.ensemble.classes, p, strict=True)},
            "label": self.ensemble.label(p),
            "threshold": self.ensemble.threshold,
            "n_instances": {s: int(len(a)) for s, a in zip(self.ensemble.scales, x, strict=True)},
            "instance_score": name,
            "top_instances": top,
            **extra,
        }

    def _embed(self, bag: BagRequest):
        from wsimil.extract.replay import slide_bag
        from wsimil.extract.slide import SlideError

        if self.extractor is None:
            raise RequestError(
                f"bag {bag.bag_id!r}: this model cannot embed slides ({self.no_slides}); "
                "send features instead"
            )
        try:
            inst = slide_bag(
                bag.slide_path,
                bag.bag_id,
                self.extraction,
                self.extractor,
                self.ensemble.scales,
                batch_size=self.settings.slide_batch_size,
            )
        except SlideError as exc:  # the message names the file; not the server's folders
            why = str(exc).replace(str(self.slide_root.resolve()), "<slide root>")
            raise RequestError(f"bag {bag.bag_id!r}: slide_path cannot be used: {why}") from None
        x, grid = tuple(t.numpy() for t in inst.x), tuple(g.numpy() for g in inst.grid)
        return x, grid, inst.coords  # numpy, as a features request gives them


def as_table(model_input) -> pd.DataFrame:
    """The request as a DataFrame, one row per bag (dicts and lists of dicts accepted)."""
    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, dict):
        return pd.DataFrame([model_input])
    if isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        return pd.DataFrame(model_input)
    raise RequestError(
        f"expected one record per bag (dataframe_records), got {type(model_input).__name__}"
    )


def _top_k(params: dict | None, default: int) -> int:
    value = (params or {}).get("top_k", default)
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise RequestError(f"params.top_k must be a non-negative integer, got {value!r}")
    return int(value)


def _flag(params: dict | None, key: str) -> bool:
    value = (params or {}).get(key, False)
    if not isinstance(value, bool | np.bool_):
        raise RequestError(f"params.{key} must be true or false, got {value!r}")
    return bool(value)


def top_instances(
    scores: np.ndarray, k: int, coords: np.ndarray | None, grid: np.ndarray | None
) -> list[dict]:
    """The ``k`` highest-scoring instances, best first, with their positions when known."""
    order = np.argsort(-scores, kind="stable")[:k]
    out = []
    for i in order:
        out.append(
            {
                "index": int(i),
                "score": float(scores[i]),
                "x": None if coords is None else int(coords[i, 0]),
                "y": None if coords is None else int(coords[i, 1]),
                "col": None if grid is None else int(grid[i, 0]),
                "row": None if grid is None else int(grid[i, 1]),
            }
        )
    return out


def request_signature(scales: tuple[str, ...], top_k: int):
    """The MLflow signature of the request contract (every column optional).

    The array columns are ``Any``: MLflow's ``Array(Array(double))`` refuses a row of JSON
    integers ("cannot safely convert int64 to float64") and checks every number in Python
    twice per request; :mod:`wsimil.serve.requests` checks shapes and values itself, once,
    with messages that name the bag.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import AnyType

    cols = [ColSpec(DataType.string, "bag_id", required=False)]
    for s in scales:
        cols += [
            ColSpec(AnyType(), f"features_{s}", required=False),  # (N, D) numbers
            ColSpec(DataType.string, f"features_{s}_npy", required=False),
            ColSpec(AnyType(), f"grid_{s}", required=False),  # (N, 2) integers
            ColSpec(AnyType(), f"coords_{s}", required=False),  # (N, 2) integers
        ]
    cols.append(ColSpec(DataType.string, "slide_path", required=False))
    params = ParamSchema(
        [
            ParamSpec("top_k", DataType.long, int(top_k)),
            ParamSpec("geojson", DataType.boolean, False),
        ]
    )
    return ModelSignature(inputs=Schema(cols), params=params)


def example_request(scales: tuple[str, ...], in_dims: tuple[int, ...], n: int = 3) -> pd.DataFrame:
    """A one-bag request of ``n`` random instances with grid and coordinates (seeded)."""
    rng = np.random.default_rng(0)
    grid = [[i % 2, i // 2] for i in range(n)]
    row: dict[str, object] = {"bag_id": "example"}
    for s, d in zip(scales, in_dims, strict=True):
        row[f"features_{s}"] = np.round(rng.normal(size=(n, d)), 4).tolist()
        row[f"grid_{s}"] = grid
        row[f"coords_{s}"] = [[c * 512, r * 512] for c, r in grid]
    return pd.DataFrame([row])
