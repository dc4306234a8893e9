"""Serving under load with bad requests mixed in: does the server stay up, small and quick?

N clients on loopback post to ``/invocations`` for at most ``--seconds`` and ``--requests``
in all; a share of the requests (``--bad-share``) is hostile, cycling through: wrong feature
dimension, NaN features, random bytes, a body over the server's size limit, a NUL byte in
``slide_path``, and a ``text/csv`` body. Prints the 2xx/4xx/5xx counts (per kind), p50/p99
latency of the valid and of the bad requests, the largest error answer, the server's RSS
(its whole process group) at start and at end, and whether it still answers ``/ping`` and a
valid request afterwards. Asserts nothing.

By default it registers a random-weight fold ensemble in a temporary MLflow store and starts
``mlflow models serve`` on 127.0.0.1 with ``max_request_mb`` set through
``SERVING_MODEL_CONFIG``. With ``--url`` it targets a running server instead (loopback only;
``--pid`` for its RSS). Run from the repository root (the venv's bin on PATH):
    python benchmarks/serve_load.py [--clients 4] [--seconds 30] [--requests 400]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).parent))
from serve_latency import payload, random_bag, register_random, start_server, stop_server  # noqa: E402

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def group_rss_mb(pgid: int | None) -> float | None:
    """Resident memory of every process in process group ``pgid`` (Linux /proc), in MB."""
    if pgid is None:
        return None
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ...
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # rss in pages
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return total / 2**20


def bad_requests(dim: int, scale: str, limit_mb: float) -> dict[str, tuple[bytes, str]]:
    """Each hostile kind: (body, content type)."""
    rng = np.random.default_rng(1)

    def records(row):
        return json.dumps({"dataframe_records": [row]}).encode()

    nan = rng.normal(size=(8, dim))
    nan[3, 5] = np.nan
    return {
        "wrong_dim": (records({f"features_{scale}": rng.normal(size=(8, dim + 1)).tolist()}),
                      "application/json"),
        "nan": (records({f"features_{scale}": nan.tolist()}), "application/json"),
        "garbage": (rng.bytes(2**20), "application/json"),
        "over_limit": (b" " * int((limit_mb + 1) * 2**20), "application/json"),
        "nul_slide_path": (records({"slide_path": "a\x00.svs"}), "application/json"),
        "csv": (b"bag_id,slide_path\nb1,a.svs\n", "text/csv"),
    }  # fmt: skip


def run_load(url, good: bytes, bad: dict, clients: int, n_requests: int, seconds: float,
             bad_share: float) -> list[tuple[str, int, float, int]]:  # fmt: skip
    """(kind, status, seconds, answer bytes) per request, bounded in count and time."""
    deadline = time.monotonic() + seconds
    counter = itertools.count()
    lock = threading.Lock()
    kinds = itertools.cycle(bad)
    every = max(1, round(1 / bad_share)) if bad_share > 0 else 0

    def client(_):
        out = []
        with requests.Session() as session:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter)
                    kind = next(kinds) if every and i % every == every - 1 else "valid"
                if i >= n_requests:
                    break
                body, ctype = (good, "application/json") if kind == "valid" else bad[kind]
                t0 = time.perf_counter()
                try:
                    r = session.post(f"{url}/invocations", data=body,
                                     headers={"Content-Type": ctype}, timeout=120)  # fmt: skip
                    out.append((kind, r.status_code, time.perf_counter() - t0, len(r.content)))
                except requests.RequestException:
                    out.append((kind, 0, time.perf_counter() - t0, 0))  # no answer at all
        return out

    with ThreadPoolExecutor(clients) as pool:
        return [row for rows in pool.map(client, range(clients)) for row in rows]


def still_answers(url: str, good: bytes) -> bool:
    try:
        ping = requests.get(f"{url}/ping", timeout=10).status_code == 200
        r = requests.post(f"{url}/invocations", data=good, timeout=60,
                          headers={"Content-Type": "application/json"})  # fmt: skip
        return ping and r.status_code == 200
    except requests.RequestException:
        return False


def quantiles(times: list[float]) -> str:
    if not times:
        return "-"
    return f"p50 {statistics.median(times):.3f} s, p99 {float(np.percentile(times, 99)):.3f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="dtfd", choices=["dtfd", "dmsmil"])
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--instances", type=int, default=200, help="per scale, valid requests")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=400, help="in all, at most (max 5000)")
    ap.add_argument("--seconds", type=float, default=30, help="at most (max 600)")
    ap.add_argument("--bad-share", type=float, default=0.25)
    ap.add_argument("--max-request-mb", type=float, default=8, help="the server's limit")
    ap.add_argument("--url", help="a running server on loopback (model matching --family/--dim)")
    ap.add_argument("--pid", type=int, help="with --url: its process group, for the RSS")
    args = ap.parse_args()
    n_requests, seconds = min(args.requests, 5000), min(args.seconds, 600)
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        raise SystemExit(f"--url {args.url}: this load test targets loopback only")

    from wsimil.models import MODELS

    n_scales = MODELS[args.family].n_scales
    scales = ("10x", "20x") if n_scales == 2 else ("20x",)
    xs, grids = random_bag(args.instances, args.dim, n_scales)
    good = payload(xs, grids, scales, "npy")
    bad = bad_requests(args.dim, scales[-1], args.max_request_mb)
    with tempfile.TemporaryDirectory(prefix="wsimil-load-") as tmp:
        proc, pgid = None, args.pid
        if args.url is None:
            uri = register_random(args.family, args.folds, args.dim, Path(tmp))
            os.environ["SERVING_MODEL_CONFIG"] = json.dumps({"max_request_mb": args.max_request_mb})
            proc, url = start_server(uri, Path(tmp) / "server.log")
            pgid = proc.pid  # started in its own session
        else:
            url = args.url.rstrip("/")
        try:
            still_answers(url, good)  # warm-up
            rss_start = group_rss_mb(pgid)
            t0 = time.perf_counter()
            rows = run_load(url, good, bad, args.clients, n_requests, seconds, args.bad_share)
            wall = time.perf_counter() - t0
            rss_end = group_rss_mb(pgid)
            alive = still_answers(url, good)
        finally:
            if proc is not None:
                stop_server(proc)

    classes = Counter(f"{s // 100}xx" if s else "no answer" for _, s, _, _ in rows)
    rate = f"{len(rows)} requests ({len(rows) / wall:.1f}/s)"
    print(f"\n{args.family}, {args.folds} folds, {args.clients} clients on {url}, {wall:.1f} s, "
          f"{rate}, limit {args.max_request_mb:g} MB")  # fmt: skip
    print("status: " + ", ".join(f"{k} {classes.get(k, 0)}" for k in ("2xx", "4xx", "5xx",
                                                                      "no answer")))  # fmt: skip
    print("\n| kind | n | statuses | latency | largest answer |")
    print("|---|---|---|---|---|")
    for kind in ("valid", *bad):
        mine = [r for r in rows if r[0] == kind]
        if mine:
            statuses = ", ".join(
                f"{s}: {n}" for s, n in sorted(Counter(r[1] for r in mine).items())
            )
            print(f"| {kind} | {len(mine)} | {statuses} | {quantiles([r[2] for r in mine])} "
                  f"| {max(r[3] for r in mine)} B |")  # fmt: skip
    bad_times = [r[2] for r in rows if r[0] != "valid"]
    print(f"\nvalid: {quantiles([r[2] for r in rows if r[0] == 'valid'])}; "
          f"bad: {quantiles(bad_times)}")  # fmt: skip

    def mb(v):
        return "n/a (give --pid)" if v is None else f"{v:.0f} MB"

    print(f"server RSS: {mb(rss_start)} at start, {mb(rss_end)} at end")
    print(f"server still answers /ping and a valid request: {'yes' if alive else 'NO'}")


if __name__ == "__main__":
    from wsimil import cpu_isa

    cpu_isa.pin()  # the kernels the pipeline computes with (wsimil/cpu_isa.py)
    main()
