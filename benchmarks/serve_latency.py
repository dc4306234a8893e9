"""Serving latency: one 200 + 200 instance × 2048-D bag over HTTP, JSON vs base64 .npy.

Against a running ``mlflow models serve`` (``--url``), or, by default, a server this script
starts itself on a registered DMSMIL fold ensemble made from random weights in a temporary
MLflow store (the weights do not change the cost). Per payload encoding and client count
(sequential, 4 concurrent): p50 / p99 request latency and requests per second, each cell
bounded by ``--requests`` and ``--seconds``. Beside them, the model-only time (the fold
models' forward passes on the same bag in this process, no parsing or HTTP): one fold
model, the ensemble fold by fold (how it is served on CPU) and in one batched pass (how
it is served on a GPU); the DMSMIL
paper quotes 0.0072 s per slide for one model on an
RTX 3060. Prints a table, asserts nothing.

Run from the repository root (the venv's bin on PATH):
    python benchmarks/serve_latency.py [--family dmsmil] [--folds 5] [--requests 40] [--skip-json]
    python benchmarks/serve_latency.py --url http://127.0.0.1:5001 --family dmsmil
    python benchmarks/serve_latency.py --model-only      # the model-only rows, no server
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import torch

from wsimil.config import ModelConfig
from wsimil.experiment.crossval import save_fold_models
from wsimil.experiment.folds import CVResult, FoldResult
from wsimil.models import MODELS, build_model
from wsimil.serve.fold_ensemble import FoldEnsemble


def random_bag(n: int, dim: int, n_scales: int, seed: int = 0):
    """Features (float32) and a compact grid per scale, like a 200-tile selection."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n * 2)))
    xs, grids = [], []
    for _ in range(n_scales):
        cells = rng.choice(side * side, size=n, replace=False)
        xs.append(rng.normal(size=(n, dim)).astype(np.float32))
        grids.append(np.stack([cells % side, cells // side], 1).astype(np.int64))
    return xs, grids


def payload(xs, grids, scales, encoding: str) -> bytes:
    """The request body: ``json`` rows, ``npy`` (base64 float32) or ``npy16`` (float16)."""
    row: dict[str, object] = {"bag_id": "bench"}
    for s, x, g in zip(scales, xs, grids, strict=True):
        if encoding == "json":
            row[f"features_{s}"] = x.tolist()
        else:
            buf = io.BytesIO()
            np.save(buf, x.astype(np.float16) if encoding == "npy16" else x)
            row[f"features_{s}_npy"] = base64.b64encode(buf.getvalue()).decode()
        row[f"grid_{s}"] = g.tolist()
    return json.dumps({"dataframe_records": [row], "params": {"top_k": 10}}).encode()


def make_model(family: str, folds: int, dim: int, out: Path) -> tuple[Path, tuple[str, ...]]:
    """A fold ensemble of randomly initialised models, saved as crossval saves them."""
    n_scales = MODELS[family].n_scales
    scales = ("10x", "20x") if n_scales == 2 else ("20x",)
    cfg = ModelConfig()  # the params.yaml defaults: the papers' model sizes
    results = []
    for k in range(folds):
        torch.manual_seed(k)
        model = build_model(family, cfg, [dim] * n_scales, 2)
        state = {n: t.detach().clone() for n, t in model.state_dict().items()}
        results.append(FoldResult(k, {}, {}, 0.5, 0, None, [], state))
    cv = CVResult(family, results, {"auc_mean": 0.5}, ["normal", "tumour"], (dim,) * n_scales)
    save_fold_models(cv, cfg, scales, out)
    return out / "models", scales


def register_random(family: str, folds: int, dim: int, tmp: Path) -> str:
    import mlflow

    from wsimil.serve.registry import register

    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("bench", artifact_location=(tmp / "artifacts").as_uri())
    models_dir, _ = make_model(family, folds, dim, tmp / "model")
    register(
        models_dir,
        f"bench-{family}",
        experiment="bench",
        extraction=None,
        champion_margin=0.0,
        lineage={},
    )
    return f"models:/bench-{family}@champion"


def start_server(model_uri: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"]
    proc = subprocess.Popen(
        [*cmd, "-h", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=open(log_path, "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.5)
    stop_server(proc)
    raise SystemExit(f"server did not start; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def measure(url: str, body: bytes, clients: int, n_requests: int, seconds: float) -> dict:
    """Latencies of up to ``n_requests`` requests from ``clients`` threads, within ``seconds``."""
    deadline = time.monotonic() + seconds
    per_client = max(1, n_requests // clients)

    def client(_):
        out = []
        with requests.Session() as session:
            for _ in range(per_client):
                if time.monotonic() > deadline:
                    break
                t0 = time.perf_counter()
                r = session.post(
                    f"{url}/invocations",
                    data=body,
                    headers={"Content-Type": "application/json"},
                    timeout=120,
                )
                out.append(time.perf_counter() - t0)
                r.raise_for_status()
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        lat = sorted(t for ts in pool.map(client, range(clients)) for t in ts)
    wall = time.perf_counter() - start
    return {
        "n": len(lat),
        "p50": statistics.median(lat),
        "p99": float(np.percentile(lat, 99)),
        "rps": len(lat) / wall,
    }


def model_only(models_dir: Path, xs, grids, repeats: int) -> dict:
    """Seconds per bag of the fold models' forward passes: (best, median) of ``repeats``.

    With the gradient instance score (DMSMIL's ``attribution``: m forward and backward
    passes), as served, and without it (``gradient_scores`` off: probabilities and the
    forward's own scores), which shows what batching the folds saves on the forward alone.
    """
    out: dict = {}
    for gradient in (True, False):
        ens = FoldEnsemble.load(models_dir, "auto")
        for m in ens.models:
            m.gradient_scores = gradient
        ens = FoldEnsemble(ens.manifest, ens.models, ens.device, one_pass=True)  # restacked
        one = FoldEnsemble(ens.manifest, ens.models[:1], ens.device)
        each = FoldEnsemble(ens.manifest, ens.models, ens.device, one_pass=False)
        k = len(ens.models)
        out["device"] = str(ens.device)
        tag = "" if gradient else ", no gradient score"
        cases = (
            (f"one fold model{tag}", one),
            (f"ensemble of {k}, fold by fold (served on CPU){tag}", each),
            (f"ensemble of {k}, one pass (served on a GPU){tag}", ens),
        )
        for name, e in cases:
            e.predict(xs, grids)  # warm-up
            times = []
            for _ in range(repeats):
                if ens.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                e.predict(xs, grids)
                if ens.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            out[name] = (min(times), statistics.median(times))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="dmsmil", choices=["dtfd", "dmsmil"])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--instances", type=int, default=200, help="per scale")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--requests", type=int, default=40, help="per cell, at most")
    ap.add_argument("--seconds", type=float, default=60, help="per cell, at most")
    ap.add_argument("--repeats", type=int, default=30, help="model-only timings per case")
    ap.add_argument("--model-only", action="store_true", help="no server, no HTTP rows")
    ap.add_argument("--skip-json", action="store_true", help="only the .npy payloads")
    ap.add_argument("--url", help="a running server (its model must match --family/--dim)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="wsimil-bench-") as tmp:
        tmp = Path(tmp)
        n_scales = MODELS[args.family].n_scales
        xs, grids = random_bag(args.instances, args.dim, n_scales)
        scales = ("10x", "20x") if n_scales == 2 else ("20x",)
        proc, rows = None, []
        if args.model_only:
            pass
        elif args.url is None:
            uri = register_random(args.family, args.folds, args.dim, tmp)
            proc, url = start_server(uri, tmp / "server.log")
        else:
            url = args.url.rstrip("/")
        try:
            encodings = ("npy", "npy16") if args.skip_json else ("json", "npy", "npy16")
            bodies = {enc: payload(xs, grids, scales, enc) for enc in encodings}
            for enc, body in bodies.items() if not args.model_only else ():
                measure(url, body, 1, 2, args.seconds)  # warm-up
                for clients in (1, 4):
                    m = measure(url, body, clients, args.requests, args.seconds)
                    rows.append((enc, len(body) / 1e6, clients, m))
        finally:
            if proc is not None:
                stop_server(proc)
        models_dir, _ = make_model(args.family, args.folds, args.dim, tmp / "local")
        local = model_only(models_dir, xs, grids, repeats=args.repeats)

    bag = " + ".join([str(args.instances)] * n_scales)
    print(f"\n{args.family}, {args.folds} fold models, one bag of {bag} instances x {args.dim}-D")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, load {load}\n")
    print("| payload | MB | clients | requests | p50 s | p99 s | req/s |")
    print("|---|---|---|---|---|---|---|")
    for enc, mb, clients, m in rows:
        name = {"json": "JSON rows", "npy": "base64 .npy", "npy16": "base64 .npy float16"}[enc]
        print(
            f"| {name} | {mb:.1f} | {clients} | {m['n']} | {m['p50']:.3f} | {m['p99']:.3f} "
            f"| {m['rps']:.2f} |"
        )
    print(f"\nmodel only ({local['device']}, this process, no parsing, no HTTP):")
    for key, value in local.items():
        if key != "device":
            tag = ", no gradient score" if key.endswith("no gradient score") else ""
            single = local["one fold model" + tag][1]
            print(
                f"  {key}: {value[0]:.4f} s per bag (best), {value[1]:.4f} s (median), "
                f"{value[1] / single:.2f}x one fold model"
            )
    if rows:
        npy_p50 = next(m["p50"] for enc, _, c, m in rows if enc == "npy" and c == 1)
        served = (
            "one pass (served on a GPU)"
            if local["device"] == "cuda"
            else "fold by fold (served on CPU)"
        )
        ensemble = local[f"ensemble of {args.folds}, {served}"][1]
        ratio = npy_p50 / ensemble
        print(f"  base64 .npy p50, 1 client / model-only ensemble median: {ratio:.2f}x")
    print("  DMSMIL paper, one model, RTX 3060: 0.0072 s per slide")


if __name__ == "__main__":
    from wsimil import cpu_isa

    cpu_isa.pin()  # the kernels the pipeline computes with (wsimil/cpu_isa.py)
    main()
