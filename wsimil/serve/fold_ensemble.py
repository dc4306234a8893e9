"""The fold ensemble that ``register`` publishes: k fold models answering as one.

Cross-validation keeps every fold's model (``models/fold<k>.safetensors``, state dicts, no
pickles) and ``models/ensemble.json`` (:class:`wsimil.train.manifest.Manifest`: family,
model config, scales, input dimensions, classes, each fold's validation-chosen threshold,
the CV summary). Here they are rebuilt and combined:

    p(c | bag)  = mean over folds of softmax(logits_fold)          class probabilities
    label       = positive if p(1) >= mean of the fold thresholds  binary tasks
                = argmax_c p(c)                                    otherwise
    score_k     = mean over folds of the fold's instance score k   (heatmap raw material)

Each threshold was chosen on its fold's validation patients, never on the data scored
(SPEC §3); their mean is the ensemble's decision threshold. The primary instance score per
family is the one the paper ranks instances by (the class's ``primary_score``).

DMSMIL's optimal-transport distance is a training loss term only (it never enters the
logits), so the inference copies are built with ``ot: off`` and skip the solver. On a GPU
the k fold models answer in one batched forward (:mod:`wsimil.serve.one_pass`); on CPU they
answer one by one, the same numbers: there the work is k times one model's arithmetic
either way, and the batched form was no faster on 2 cores (DMSMIL with its integrated
gradients: 1.80 s one pass against 1.60 s fold by fold; DTFD-MIL 0.052 against 0.039 s;
``benchmarks/serve_latency.py --model-only``). ``one_pass`` forces either.
Knows nothing of MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wsimil.config import ModelConfig
from wsimil.device import DeviceError, resolve_device
from wsimil.models import MODELS, MILModel, build_model, collate
from wsimil.serve.one_pass import StackedFolds
from wsimil.train.manifest import EnsembleError, Manifest

# The one pass holds every fold's activations at once (k copies of the bag's standardised
# features and more): above this many input values (a 20,000 x 1024-D bag is 20.5 M) the
# folds run one after another, so serving a whole-tissue bag stays within a few bag copies.
ONE_PASS_MAX_VALUES = 4_000_000


@dataclass(frozen=True)
class BagResult:
    """One bag's answer: class probabilities ``(C,)`` and per-instance scores per scale."""

    probabilities: np.ndarray
    scores: dict[str, tuple[np.ndarray, ...]]


class FoldEnsemble:
    """The fold models of one cross-validation, averaged (see the module docstring)."""

    def __init__(
        self,
        manifest: Manifest,
        models: list[MILModel],
        device: torch.device,
        *,
        one_pass: bool | None = None,
    ) -> None:
        self.manifest = manifest
        self.models = models
        self.device = device
        if one_pass is None:  # measured: on CPU the one pass is no faster (module docstring)
            one_pass = device.type == "cuda"
        self.stacked = StackedFolds(models) if one_pass and len(models) > 1 else None
        self.family: str = manifest.family
        self.scales: tuple[str, ...] = manifest.scales
        self.in_dims: tuple[int, ...] = manifest.in_dims
        self.classes: list[str] = list(manifest.classes)
        thresholds = [t for t in manifest.thresholds if t is not None]
        binary = len(self.classes) == 2
        self.threshold: float | None = float(np.mean(thresholds)) if binary and thresholds else None
        self.model_class = MODELS[self.family]
        self.primary_score = self.model_class.primary_score

    @classmethod
    def load(
        cls, models_dir: Path, device: str = "auto", *, one_pass: bool | None = None
    ) -> FoldEnsemble:
        """Rebuild every fold model from ``models_dir`` (strict state-dict loading)."""
        from safetensors.torch import load_file

        models_dir = Path(models_dir)
        doc = Manifest.read(models_dir)
        try:
            dev = resolve_device(device, "serve.device")
        except DeviceError as exc:
            raise EnsembleError(str(exc)) from None
        if doc.family not in MODELS:
            raise EnsembleError(f"{models_dir}: unknown model family '{doc.family}'")
        cfg = MODELS[doc.family].inference_config(ModelConfig.model_validate(doc.model))
        models = []
        for fold in doc.folds:
            path = doc.fold_path(fold)
            model = build_model(doc.family, cfg, doc.in_dims, len(doc.classes))
            try:
                model.load_state_dict(load_file(str(path)))
            except RuntimeError as exc:
                msg = f"{path} does not fit the model ensemble.json describes: {exc}"
                raise EnsembleError(msg) from None
            models.append(model.eval().to(dev))
        return cls(doc, models, dev, one_pass=one_pass)

    @property
    def needs_grid(self) -> bool:
        """Whether the model places instances on the tile grid (DMSMIL's deformable attention)."""
        cfg = ModelConfig.model_validate(self.manifest.model)
        return self.model_class.needs_grid(self.model_class.section(cfg))

    @torch.inference_mode()
    def predict(
        self, x: tuple[np.ndarray, ...], grid: tuple[np.ndarray, ...] | None = None
    ) -> BagResult:
        """Probabilities and instance scores of one bag.

        Args:
            x: one ``(N_s, D_s)`` float32 array per scale, in :attr:`scales` order.
            grid: one ``(N_s, 2)`` int64 ``(col, row)`` array per scale, or None.
        """
        feats = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in x]
        grids = (
            None if grid is None else [[torch.from_numpy(np.asarray(g, np.int64)) for g in grid]]
        )
        bags = collate([feats], grids).to(self.device)
        if self.stacked is not None and sum(f.numel() for f in feats) <= ONE_PASS_MAX_VALUES:
            probs, scores = self.stacked(bags)  # (k, 1, C); (k, 1, N_s) per scale
        else:  # one forward per fold model
            outs = [model(bags) for model in self.models]
            probs = torch.stack([torch.softmax(o.logits.float(), dim=-1) for o in outs])
            scores = {
                name: tuple(torch.stack([o.scores[name][s] for o in outs]) for s in range(n))
                for name, n in ((name, len(t)) for name, t in outs[0].scores.items())
            }
        return BagResult(
            probs[:, 0].mean(0).cpu().numpy(),
            {
                name: tuple(t[:, 0].float().mean(0).cpu().numpy() for t in per_scale)
                for name, per_scale in scores.items()
            },
        )

    def label(self, probabilities: np.ndarray) -> str:
        """The predicted class name (binary: the mean fold threshold on ``p(classes[1])``)."""
        if self.threshold is not None:
            return self.classes[int(probabilities[1] >= self.threshold)]
        return self.classes[int(np.argmax(probabilities))]
