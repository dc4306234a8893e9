"""MIL models: one file per model, one table, one contract (see :mod:`wsimil.models.base`).

A model is a :class:`~wsimil.models.base.MILModel` with ``n_scales`` and a
``from_config(cfg, in_dims, n_classes)`` that reads its own section of
:class:`wsimil.config.ModelConfig`. Adding it to :data:`MODELS` enrols it in the shared tests.
"""

from __future__ import annotations

from collections.abc import Sequence

from wsimil.config import ModelConfig
from wsimil.models.abmil import ABMIL
from wsimil.models.base import Bags, MILModel, MILOutput, collate
from wsimil.models.damil import DAMIL
from wsimil.models.dmsmil import DMSMIL
from wsimil.models.dtfd import DTFD
from wsimil.seeding import torch_rng

MODELS: dict[str, type[MILModel]] = {
    "abmil": ABMIL,
    "dtfd": DTFD,
    "damil": DAMIL,
    "dmsmil": DMSMIL,
}


def build_model(
    name: str, cfg: ModelConfig, in_dims: Sequence[int], n_classes: int, *, seed: int = 0
) -> MILModel:
    """The model ``name`` from :data:`MODELS`, configured by its section of ``cfg``.

    Its initial weights are a function of ``seed`` alone, never of the global RNG's state
    (a fit passes :attr:`wsimil.seeding.FitSeeds.init`).

    Args:
        name: a key of :data:`MODELS`.
        cfg: the ``model`` section of params.yaml.
        in_dims: feature dimension per scale, as many as the model's ``n_scales``.
        n_classes: number of slide classes (at least 2).
        seed: seeds the initial weights.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose one of {', '.join(MODELS)}")
    with torch_rng(seed):
        return MODELS[name].from_config(cfg, in_dims, n_classes)


__all__ = ["MODELS", "Bags", "MILModel", "MILOutput", "build_model", "collate"]
