"""The fold-ensemble manifest: ``models/ensemble.json``, the one description of a models folder.

Cross-validation writes it beside the fold state dicts (``fold<k>.safetensors``); the
registry, the model card and the served fold ensemble read it. On disk::

    {"family": "dmsmil", "model": {<the model section>}, "scales": ["10x", "20x"],
     "in_dims": [1024, 1024], "classes": ["normal", "tumour"], "thresholds": [0.41, ...],
     "folds": [0, 1, ...], "cv": {"auc_mean": ..., ...}, "parent_run_id": "<MLflow run>"}

The keys are those every registered model and every results folder already holds; older
files without ``thresholds``, ``cv`` or ``parent_run_id`` still read. Knows nothing of
MLflow or torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

FILE = "ensemble.json"
REQUIRED = ("family", "model", "scales", "in_dims", "classes", "folds")


class EnsembleError(Exception):
    """A models folder that cannot be loaded; the message names the file."""


@dataclass(frozen=True)
class Manifest:
    """What a fold ensemble is (see the module docstring).

    Attributes:
        model: the ``model`` section of params.yaml as JSON; validated where a model is built.
        thresholds: per fold, the decision threshold chosen on its validation patients
            (None for multi-class folds).
        cv: the cross-validation summary (``auc_mean``, ``auc_std``, ...).
        models_dir: the folder it was read from (None for one not yet written).
    """

    family: str
    model: dict
    scales: tuple[str, ...]
    in_dims: tuple[int, ...]
    classes: tuple[str, ...]
    folds: tuple[int, ...]
    thresholds: tuple[float | None, ...] = ()
    cv: dict = field(default_factory=dict)
    parent_run_id: str | None = None
    models_dir: Path | None = field(default=None, compare=False)

    def fold_path(self, fold: int) -> Path:
        """``<models_dir>/fold<k>.safetensors``."""
        return Path(self.models_dir or ".") / f"fold{fold}.safetensors"

    @property
    def path(self) -> Path:
        return Path(self.models_dir or ".") / FILE

    def to_json(self) -> dict:
        """The JSON document, keys in the order cross-validation has always written them."""
        return {
            "family": self.family,
            "model": self.model,
            "scales": list(self.scales),
            "in_dims": list(self.in_dims),
            "classes": list(self.classes),
            "thresholds": list(self.thresholds),
            "folds": list(self.folds),
            "cv": self.cv,
            "parent_run_id": self.parent_run_id,
        }

    def write(self, models_dir: Path) -> Manifest:
        """Write ``<models_dir>/ensemble.json``; return the manifest as read from there."""
        models_dir = Path(models_dir)
        (models_dir / FILE).write_text(json.dumps(self.to_json(), indent=1))
        return replace(self, models_dir=models_dir)

    @classmethod
    def read(cls, models_dir: Path) -> Manifest:
        """``ensemble.json`` of a models folder, checked to name existing fold files.

        Raises:
            EnsembleError: the manifest or a fold file is missing or incomplete.
        """
        models_dir = Path(models_dir)
        path = models_dir / FILE
        if not path.is_file():
            raise EnsembleError(
                f"{path}: no ensemble manifest; run `wsimil tune` (or `wsimil crossval`) first"
            )
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise EnsembleError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise EnsembleError(f"{path}: expected a JSON object, got {type(doc).__name__}")
        missing = [k for k in REQUIRED if k not in doc]
        if missing:
            raise EnsembleError(f"{path}: missing key(s) {', '.join(missing)}")
        manifest = cls._from_json(doc, path, models_dir)
        for fold in manifest.folds:
            if not manifest.fold_path(fold).is_file():
                raise EnsembleError(f"{models_dir}: fold{fold}.safetensors is listed but missing")
        return manifest

    @classmethod
    def _from_json(cls, doc: dict, path: Path, models_dir: Path) -> Manifest:
        key = "model"
        try:
            if not isinstance(doc["model"], dict):
                raise TypeError("expected a mapping")
            values = {"family": str(doc["family"]), "model": doc["model"]}
            for key, kind in (("scales", str), ("in_dims", int), ("classes", str), ("folds", int)):
                values[key] = tuple(kind(v) for v in doc[key])
            key = "thresholds"
            values[key] = tuple(None if t is None else float(t) for t in doc.get(key) or ())
            key = "cv"
            values[key] = dict(doc.get(key) or {})
        except (TypeError, ValueError) as exc:
            raise EnsembleError(f"{path}: bad value for '{key}': {exc}") from None
        run_id = doc.get("parent_run_id")
        return cls(**values, parent_run_id=run_id, models_dir=models_dir)

    @classmethod
    def of(cls, models: Manifest | Path) -> Manifest:
        """``models`` itself when it is a manifest already read, else the one it holds."""
        return models if isinstance(models, Manifest) else cls.read(models)
