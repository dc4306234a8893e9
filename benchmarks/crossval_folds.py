"""A k-fold cross-validation's fits, one after the other against a process per fold.

    python benchmarks/crossval_folds.py [--slides 32] [--tiles 64] [--epochs 3] [--model dmsmil]

Random bags (``--slides`` x ``--tiles`` per scale x 2048-D, on a square grid), the
params.yaml model and train defaults but ``--epochs``, ``--folds`` folds; times
``run_fold`` for every fold in this process, then ``fold_results`` with
``--workers`` processes (default ``crossval.parallel_folds: auto``, 3 for 5 folds on 2 cores), in
one run, checks that every fold's weights hash is the same, and prints both times and the
ratio. No MLflow (the fits are what parallelises). Paper scale: ``--slides 546 --tiles 200``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pandas as pd
import torch

from wsimil.config import ModelConfig, TrainSection
from wsimil.experiment.crossval import weights_sha256
from wsimil.experiment.folds import fold_results, fold_workers, run_fold
from wsimil.models import MODELS
from wsimil.train.fit import SlideBag
from wsimil.train.splits import make_splits


def make_bags(n: int, tiles: int, n_scales: int) -> dict[str, SlideBag]:
    gen = torch.Generator().manual_seed(0)
    side = int(np.ceil(np.sqrt(tiles)))
    cells = torch.arange(tiles)
    grid = torch.stack([cells % side, cells // side], 1)
    return {
        f"s{i}": SlideBag(
            f"s{i}", i % 2,
            tuple(torch.randn(tiles, 2048, generator=gen) for _ in range(n_scales)),
            tuple(grid for _ in range(n_scales)),
        )
        for i in range(n)
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", type=int, default=32)
    parser.add_argument("--tiles", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--model", default="dmsmil", choices=sorted(MODELS))
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    model_cfg = ModelConfig()
    train_cfg = getattr(TrainSection(), args.model).model_copy(
        update={"epochs": args.epochs, "device": "cpu"}
    )
    bags = make_bags(args.slides, args.tiles, MODELS[args.model].n_scales)
    table = pd.DataFrame(
        {"slide_id": list(bags), "patient_id": list(bags),
         "label": ["tumour" if b.label else "normal" for b in bags.values()]}
    )  # fmt: skip
    splits = make_splits(table, n_folds=args.folds, val_folds=4, seed=0)
    classes = list(splits["classes"])
    workers = args.workers or fold_workers("auto", args.folds, "cpu")

    start = time.perf_counter()
    one = [run_fold(args.model, model_cfg, train_cfg, f, bags, classes) for f in splits["folds"]]
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    many = list(fold_results(args.model, model_cfg, train_cfg, splits["folds"], bags, classes,
                             workers=workers))  # fmt: skip
    parallel = time.perf_counter() - start
    same = [
        weights_sha256(a.state_dict) == weights_sha256(b.state_dict)
        for a, b in zip(one, many, strict=True)
    ]

    print(f"{args.model}, {args.folds} folds x {args.epochs} epochs, {args.slides} slides x "
          f"{args.tiles} tiles x 2048-D, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"  one after the other      {sequential:8.1f} s")
    print(f"  {workers} processes            {parallel:8.1f} s   x{sequential / parallel:.2f}")
    print(f"  fold weights identical: {all(same)} ({sum(same)}/{len(same)})")


if __name__ == "__main__":
    from wsimil import cpu_isa

    cpu_isa.pin()  # the kernels the pipeline computes with (wsimil/cpu_isa.py)
    main()
