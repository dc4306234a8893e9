"""k fold models of one architecture answering in one batched forward.

The fold models of a cross-validation share their architecture and differ only in their
weights, so their state dicts stack into one set of ``(k, ...)`` tensors
(``torch.func.stack_module_state``) and ``torch.func.vmap`` runs the model's own forward
(``functional_call`` on a weightless copy) once over the fold axis: each layer becomes one
batched kernel instead of k, the bag is collated and moved once, and every model family in
:data:`wsimil.models.MODELS` runs unchanged. What vmap needs from a forward:

- no shape that depends on the data: DMSMIL's dense tile grid is sized from the grid itself,
  so the bag carries its extent (``Bags.grid_hw``), computed here once, outside vmap;
- randomness the same on every fold: DTFD-MIL's evaluation partitions come from explicitly
  seeded generators (identical for every fold and call), so ``randomness="same"`` is exact;
- batching rules for every op: DMSMIL's deformable attention sums its sampled cells with
  ``F.embedding_bag``, which vmap would run fold by fold, so the stacked copy uses the same
  sum written as a row lookup and a batched matmul (``formulation = "index"``);
- inference only: DMSMIL's optimal-transport term is a training loss and the inference
  config switches it off (:meth:`wsimil.models.base.MILModel.inference_config`).

The result equals the k separate forwards to float rounding (tests/test_one_pass.py). Knows
nothing of MLflow.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from wsimil.models import Bags, MILModel
from wsimil.models.deformable import DeformableGridAttention, grid_extent, local_grid


def with_grid_extent(bags: Bags) -> Bags:
    """``bags`` with ``grid_hw`` filled in (needed under vmap; a no-op without a grid)."""
    if bags.grid is None or bags.grid_hw is not None:
        return bags
    hw = tuple(grid_extent(local_grid(g, m)) for g, m in zip(bags.grid, bags.masks(), strict=True))
    return Bags(bags.x, bags.mask, bags.grid, hw)


class StackedFolds:
    """The fold models' weights stacked; :meth:`__call__` is their one-pass forward."""

    def __init__(self, models: Sequence[MILModel]) -> None:
        kinds = {type(m) for m in models}
        if len(kinds) != 1:
            names = sorted(k.__name__ for k in kinds)
            raise ValueError(f"fold models must share one architecture, got {names}")
        if any(m.training for m in models):
            raise ValueError("fold models must be in eval mode to be stacked (inference only)")
        self.k = len(models)
        with torch.inference_mode(False):  # normal tensors: a gradient score may save them
            params, self.buffers = stack_module_state(list(models))
            # 2-D weights are kept (k, in, out) in memory and seen as (k, out, in): under
            # vmap F.linear then runs one contiguous bmm (as wsimil.milbench.stacked does)
            self.params = {
                n: v.transpose(1, 2).contiguous().transpose(1, 2) if v.dim() == 3 else v
                for n, v in params.items()
            }
        self.skeleton = copy.deepcopy(models[0]).to("meta")  # the forward, without weights
        for module in self.skeleton.modules():  # vmap has no batching rule for embedding_bag
            if isinstance(module, DeformableGridAttention):
                module.formulation = "index"
        self.forward = vmap(self._one, in_dims=(0, 0, None), randomness="same")
        self._local = threading.local()

    def _one(self, params, buffers, bags: Bags):
        # functional_call swaps the tensors into the module while it runs, so concurrent
        # requests (the scoring server's threads) each need their own weightless copy
        skeleton = getattr(self._local, "skeleton", None)
        if skeleton is None:
            skeleton = self._local.skeleton = copy.deepcopy(self.skeleton)
        out = functional_call(skeleton, (params, buffers), (bags,))
        return torch.softmax(out.logits.float(), dim=-1), out.scores

    def __call__(self, bags: Bags) -> tuple[Tensor, dict[str, tuple[Tensor, ...]]]:
        """Per fold: probabilities ``(k, B, C)``; scores by name, ``(k, B, N_s)`` per scale.

        Runs under ``no_grad``, never ``inference_mode``: the tensors vmap wraps in inference
        mode could not enter a gradient-based score (DMSMIL's attribution, ``torch.func.grad``).
        """
        with torch.inference_mode(False), torch.no_grad():
            return self.forward(self.params, self.buffers, with_grid_extent(bags))
