"""The fold workers' forkserver, startable before anything heavy is imported.

Cross-validation fits folds in worker processes (:mod:`wsimil.experiment.folds`) that fork
from one forkserver, which imports torch, the models and the fit once (~8 s on the 2-core
machine). A command that cross-validates starts it first thing (:func:`start`), so that
import runs beside the command's own imports instead of after them. Standard library only.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing import forkserver

PRELOAD = "wsimil.experiment.folds"  # the module the fold workers run


def start() -> multiprocessing.context.BaseContext:
    """Start the forkserver (idempotent: later calls and later pools reuse it); its context.

    A fresh process per worker would import torch and the models again (~10 s each, on the
    2-core machine); the forkserver imports them once and every worker forks from it.
    Workers run with ``train.cpu_threads`` threads and seed from (seed, fold, trial), so
    results are the same bytes as in the parent.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([PRELOAD])
    forkserver.ensure_running()
    return ctx
