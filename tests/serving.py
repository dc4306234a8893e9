"""Helpers for the registry and serving tests: tiny fold ensembles and an isolated MLflow store.

A fold ensemble here is what ``crossval`` writes (``save_fold_models``), fitted in seconds
on the synthetic bags of ``test_train.make_bags``; the tests never need the demo pipeline.
"""

from __future__ import annotations

import base64
import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from projects import BIN, Server, free_port, mlflow_store
from test_train import SMALL, make_bags

from wsimil.config import ModelConfig, TrainConfig
from wsimil.experiment.crossval import save_fold_models
from wsimil.experiment.folds import CVResult, run_fold
from wsimil.models import MODELS, build_model
from wsimil.train.fit import SlideBag, predict
from wsimil.train.metrics import summarize
from wsimil.train.splits import make_splits

SCALES = {1: ("20x",), 2: ("10x", "20x")}


@dataclass
class Fitted:
    family: str
    models_dir: Path
    cv: CVResult
    cfg: ModelConfig
    held_out: list[SlideBag]  # bags no fold saw, to score


@contextlib.contextmanager
def model_server(uri: str, env: dict[str, str], log: Path):
    """`mlflow models serve -m uri` on a free loopback port, once it answers /ping; its URL.

    Started in its own process group (uvicorn is a grandchild) and stopped by it.
    """
    import requests

    port = free_port()
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local"]
    proc = Server([*cmd, "-h", "127.0.0.1", "-p", str(port)], env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_until(
            lambda: requests.get(f"{url}/ping", timeout=2).status_code == 200,
            180,
            "mlflow models serve",
        )
        yield url
    finally:
        proc.stop()


@contextlib.contextmanager
def isolated_store(root: Path, experiment: str = "wsimil-test"):
    """A sqlite tracking + registry store under ``root``, artifacts beside it; its URI."""
    with mlflow_store(f"sqlite:///{root / 'mlruns.db'}") as uri:
        if mlflow.get_experiment_by_name(experiment) is None:
            mlflow.create_experiment(experiment, artifact_location=(root / "artifacts").as_uri())
        yield uri


def fit_ensemble(
    family: str, out: Path, *, d: int = 12, epochs: int = 2, cfg: ModelConfig = SMALL
) -> Fitted:
    """Three fold models of ``family`` on 18 synthetic bags, saved as crossval saves them."""
    n_scales = MODELS[family].n_scales
    bags = make_bags(18, n_scales, seed=5, d=d)
    table = pd.DataFrame(
        {
            "slide_id": [b.slide_id for b in bags],
            "patient_id": [f"p{i}" for i in range(len(bags))],
            "label": ["tumour" if b.label else "normal" for b in bags],
        }
    )
    splits = make_splits(table, n_folds=3, val_folds=3, seed=0)
    train_cfg = TrainConfig(epochs=epochs, lr=2e-3, seed=1, device="cpu")
    by_id = {b.slide_id: b for b in bags}
    folds = [run_fold(family, cfg, train_cfg, f, by_id, splits["classes"]) for f in splits["folds"]]
    in_dims = tuple(x.shape[1] for x in bags[0].x)
    cv = CVResult(family, folds, summarize([f.metrics for f in folds]), splits["classes"], in_dims)
    save_fold_models(cv, cfg, SCALES[n_scales], out)
    held_out = make_bags(4, n_scales, seed=11, d=d)
    return Fitted(family, out / "models", cv, cfg, held_out)


def reference_answer(fitted: Fitted, bag: SlideBag) -> tuple[np.ndarray, dict]:
    """Mean class probabilities and instance scores of the training-time fold models.

    Independent of the serving code: the models are rebuilt from the in-memory state dicts
    with the training config (DMSMIL's OT included) and scored with ``train.predict``.
    """
    probs, scores = [], []
    for fold in fitted.cv.folds:
        model = build_model(fitted.family, fitted.cfg, fitted.cv.in_dims, len(fitted.cv.classes))
        model.load_state_dict(fold.state_dict)
        p, s, _ = predict(model, [bag], torch.device("cpu"))
        probs.append(p[0])
        scores.append(s[0])
    mean_scores = {
        name: tuple(np.mean([s[name][k] for s in scores], axis=0) for k in range(len(bag.x)))
        for name in scores[0]
    }
    return np.mean(probs, axis=0), mean_scores


def npy_b64(a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, a)
    return base64.b64encode(buf.getvalue()).decode()


def request_row(
    bag: SlideBag, scales: tuple[str, ...], *, encoding: str = "json", coords: bool = True
) -> dict:
    """One request record for ``bag``: features as JSON rows or base64 .npy, grid, coords."""
    row: dict[str, object] = {"bag_id": bag.slide_id}
    for s, x, g in zip(scales, bag.x, bag.grid, strict=True):
        x = x.numpy()
        if encoding == "json":
            row[f"features_{s}"] = x.tolist()
        else:
            row[f"features_{s}_npy"] = npy_b64(x)
        row[f"grid_{s}"] = g.numpy().tolist()
        if coords:
            row[f"coords_{s}"] = (g.numpy() * 256).tolist()
    return row
