"""Whole-tissue bags (issue 15): peak memory per stage, and DTFD's epoch time against a floor.

Bags of 2,000-50,000 instances of 1024-D features (ResNet-50 to layer3, DTFD-MIL's setting),
random and seeded, made here. Each stage runs in a fresh process so that its peak resident
set (``VmHWM``, benchmarks/memory.py) is its own; growth is the peak minus the resident set
before the stage:

    write   one slide's feature cache written by the project's writer (``write_h5``)
    read    one cache read back by ``read_bag`` (the reader CLAM/TRIDENT files go through)
    dtfd    one DTFD training epoch (two training bags, one validation bag) by ``fit``
    abmil   the same for ABMIL
    serve   the fitted DTFD fold saved as the pyfunc model ``register`` logs (models from
            code, ``wsimil/serve/entry.py``), loaded by MLflow, answering one bag sent as
            base64 float16 ``.npy`` (the request payload's size is printed)

    python benchmarks/bigbags.py rss                       # 2k, 10k and 50k instances
    python benchmarks/bigbags.py rss --sizes 20000
    python benchmarks/bigbags.py floor                     # CAMELYON16 scale vs the floor

``floor`` times DTFD training steps on bags of 8,000 x 1024-D (a subset of slides, scaled to
270) next to the matmul floor on the same thread count: the dimension reduction's forward
product and its weight-gradient product alone, the two (N x 1024) x (1024 x 512) products
no implementation can skip. It prints the ratio wsimil / floor. No timing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from memory import peak_mb, rss_mb

DIM = 1024
STAGES = ("write", "read", "dtfd", "abmil", "serve")
N_BAGS = 3  # two training bags, one validation bag


def features(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    """(n, dim) float32, a faint signal on two axes for label-1 slides (seeded)."""
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    if seed % 2:
        x[: max(1, n // 50), :2] += 2.0  # a small 'metastasis'
    return x


def cache_path(work: Path, i: int) -> Path:
    return work / "features" / "20x" / f"slide{i}.h5"


def write_cache(work: Path, i: int, n: int) -> None:
    from wsimil.extract.cache import write_h5

    side = int(np.ceil(np.sqrt(n)))
    cells = np.arange(n)
    grid = np.stack([cells % side, cells // side], 1).astype(np.int64)  # (n, 2) (col, row)
    write_h5(
        cache_path(work, i),
        {"features": features(n, i), "coords": grid * 512, "grid": grid},
        {"slide_id": f"slide{i}", "tile_size_level0": 512.0},
        {"coords": {"patch_size": 256, "patch_level": 0, "downsample": 2.0}},
    )


def load_bags(work: Path, n_bags: int):
    from wsimil.extract.cache import read_bag
    from wsimil.extract.instances import SlideBag

    out = []
    for i in range(n_bags):
        b = read_bag(cache_path(work, i))
        out.append(SlideBag.from_arrays(f"slide{i}", i % 2, [b.features], [b.grid], [b.coords],
                                        [b.tile_size_level0]))  # fmt: skip
    return out


def train_one_epoch(family: str, work: Path) -> dict:
    from wsimil.config import ModelConfig, TrainSection
    from wsimil.models import build_model
    from wsimil.train.fit import fit

    bags = load_bags(work, N_BAGS)
    before = rss_mb()
    cfg = getattr(TrainSection(), family).model_copy(update={"epochs": 1, "device": "cpu"})
    model = build_model(family, ModelConfig(), [DIM], 2, seed=0)
    fit(model, bags[:2], bags[2:], cfg)
    if family == "dtfd":
        save_fold(model, work / "bundle" / "models")
    return {"before_mb": before}


def save_fold(model, models: Path) -> None:
    from safetensors.torch import save_file

    from wsimil.config import ModelConfig
    from wsimil.train.manifest import Manifest

    models.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(models / "fold0.safetensors"))  # fmt: skip
    Manifest(family="dtfd", model=ModelConfig().model_dump(mode="json"), scales=("20x",),
             in_dims=(DIM,), classes=("normal", "tumour"), folds=(0,),
             thresholds=(0.5,)).write(models)  # fmt: skip


def serve_one_bag(work: Path, n: int) -> dict:
    import base64
    import io

    import mlflow
    import pandas as pd

    from wsimil.serve.pyfunc import BUNDLE

    entry = Path(__file__).resolve().parents[1] / "wsimil" / "serve" / "entry.py"
    saved = work / "pyfunc"
    if not saved.exists():
        mlflow.pyfunc.save_model(str(saved), python_model=str(entry), pip_requirements=[],
                                 artifacts={BUNDLE: str(work / "bundle")},
                                 model_config={"max_instances": 50_000})  # fmt: skip
    model = mlflow.pyfunc.load_model(str(saved))
    buf = io.BytesIO()
    np.save(buf, features(n, 1).astype(np.float16))
    payload = base64.b64encode(buf.getvalue()).decode()
    row = {"bag_id": "slide1", "features_20x_npy": payload}
    body = json.dumps({"dataframe_records": [row]})
    before = rss_mb()
    answer = model.predict(pd.DataFrame([row]))
    assert answer[0]["n_instances"] == {"20x": n}, answer
    return {"before_mb": before, "payload_mb": len(body) / 2**20,
            "npy_f16_mb": len(buf.getvalue()) / 2**20}  # fmt: skip


def run_stage(stage: str, n: int, work: Path) -> dict:
    """One stage in this process; its peak RSS and growth over the RSS before it."""
    if stage == "write":
        before = rss_mb()
        for i in range(N_BAGS):
            write_cache(work, i, n)
        out = {"before_mb": before}
    elif stage == "read":
        from wsimil.extract.cache import read_bag

        before = rss_mb()
        assert len(read_bag(cache_path(work, 0))) == n
        out = {"before_mb": before}
    elif stage in ("dtfd", "abmil"):
        out = train_one_epoch(stage, work)
    elif stage == "serve":
        out = serve_one_bag(work, n)
    else:
        raise SystemExit(f"unknown stage {stage!r}; one of {STAGES}")
    out["peak_mb"] = peak_mb()
    out["growth_mb"] = out["peak_mb"] - out["before_mb"]
    return out


def stage_in_subprocess(stage: str, n: int, work: Path) -> dict:
    cmd = [sys.executable, __file__, "stage", stage, "--n", str(n), "--work", str(work)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"stage {stage} at {n}: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def rss_table(sizes: list[int]) -> None:
    print(f"peak RSS per stage, {DIM}-D features, {N_BAGS} bags ({os.cpu_count()} cores)")
    print(f"{'instances':>9}  {'stage':6} {'peak MB':>8} {'growth MB':>9}  bag MB  notes")
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="wsimil-bigbags-") as tmp:
            for stage in STAGES:
                r = stage_in_subprocess(stage, n, Path(tmp))
                note = ""
                if stage == "serve":
                    note = (f"request {r['payload_mb']:.1f} MB "
                            f"(float16 .npy {r['npy_f16_mb']:.1f} MB, base64 in JSON)")  # fmt: skip
                bag = n * DIM * 4 / 2**20
                print(f"{n:9d}  {stage:6} {r['peak_mb']:8.0f} {r['growth_mb']:9.0f}  "
                      f"{bag:6.0f}  {note}")  # fmt: skip


def floor(slides: int, subset: int, n: int, threads: int) -> None:
    import torch

    from wsimil.config import ModelConfig, TrainSection
    from wsimil.extract.instances import SlideBag
    from wsimil.models import build_model
    from wsimil.train.fit import adam, clip_groups, train_step

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    bags = [SlideBag(f"s{i}", i % 2, (torch.randn(n, DIM, generator=gen),))
            for i in range(subset)]  # fmt: skip
    cfg = TrainSection().dtfd
    model = build_model("dtfd", ModelConfig(), [DIM], 2, seed=0)
    model.train()
    opt = adam(model, cfg)
    groups, cpu = clip_groups(model), torch.device("cpu")
    for b in bags[:2]:  # warm-up
        train_step(model, [b], opt, groups, cfg.grad_clip, cpu)
    start = time.perf_counter()
    for b in bags:
        train_step(model, [b], opt, groups, cfg.grad_clip, cpu)
    step = (time.perf_counter() - start) / subset

    width = ModelConfig().dtfd.hidden_dims[0]
    w = torch.randn(DIM, width, generator=gen)
    dh = torch.randn(n, width, generator=gen)
    for x in (bags[0].x[0], bags[1].x[0]):  # warm-up
        x @ w, x.T @ dh
    start = time.perf_counter()
    for b in bags:
        x = b.x[0]
        x @ w  # (N, 512) the reduction's forward
        x.T @ dh  # (1024, 512) its weight gradient
    mm = (time.perf_counter() - start) / subset
    print(f"DTFD at CAMELYON16 scale: {slides} slides x {n} x {DIM}-D, {threads} thread(s), "
          f"timed on {subset} slides and scaled")  # fmt: skip
    print(f"  wsimil step  {step * 1e3:8.1f} ms/slide  epoch {step * slides:7.1f} s")
    print(f"  matmul floor {mm * 1e3:8.1f} ms/slide  epoch {mm * slides:7.1f} s")
    print(f"  ratio wsimil / floor: {step / mm:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rss", help="peak RSS per stage")
    r.add_argument("--sizes", type=int, nargs="+", default=[2000, 10_000, 50_000])
    f = sub.add_parser("floor", help="DTFD epoch time next to the matmul floor")
    f.add_argument("--slides", type=int, default=270)
    f.add_argument("--subset", type=int, default=8, help="slides timed, then scaled")
    f.add_argument("--instances", type=int, default=8000)
    f.add_argument("--threads", type=int, default=1, help="as train.dtfd.cpu_threads")
    s = sub.add_parser("stage", help="one stage in this process (JSON line)")
    s.add_argument("stage", choices=STAGES)
    s.add_argument("--n", type=int, required=True)
    s.add_argument("--work", type=Path, required=True)
    args = ap.parse_args()
    if args.cmd == "rss":
        rss_table(args.sizes)
    elif args.cmd == "floor":
        floor(args.slides, args.subset, args.instances, args.threads)
    else:
        print(json.dumps(run_stage(args.stage, args.n, args.work)))


if __name__ == "__main__":
    from wsimil import cpu_isa

    cpu_isa.pin()  # the kernels the pipeline computes with (wsimil/cpu_isa.py)
    main()
