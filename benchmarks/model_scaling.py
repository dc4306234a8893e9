"""Forward+backward time and peak memory against bag size, on CPU.

    python benchmarks/model_scaling.py [--sizes 200 2000 20000] [--threads 1] [--rows ...]

One training step (forward, loss, backward) of one bag of N instances per scale, 2048-D
features, the params.yaml defaults of each model: ABMIL, DTFD-MIL, DMSMIL (deformable
attention, OT off: the deformable part alone), DMSMIL with ``deformable: false`` and OT off
(``dmsmil-plain``: the projection the attention follows), DMSMIL with exact OT, and a full
self-attention reference (Linear 2048->512, one nn.MultiheadAttention layer with 8 heads,
mean pooling, linear classifier). DMSMIL's instances sit on a ceil(sqrt(N))-wide grid.

One thread by default: on a machine shared with other jobs, OpenMP's barriers make
multi-threaded timings of small operations erratic (a 200x64 tanh took 11 ms with 2
threads under load, 7 µs with one). Each (model, N) runs in a fresh subprocess: the peak
memory is the process's resident-set high-water mark during the first step minus its
resident set before it (inputs and weights excluded); the time is the median of the next
steps, in CPU time of that process (with one thread, the step's own compute: other jobs on
the machine do not count). A configuration that would take too long is skipped, and the
table says why: exact OT on 20,000 x 20,000 points (a 3.2 GB float64 cost matrix inside
POT and a network simplex over 4e8 arcs; not attempted), and full attention where its time
extrapolated quadratically from the previous size exceeds --budget-s.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import time

from memory import peak_mb, rss_mb

D_IN = 2048
ROWS = ["abmil", "dtfd", "dmsmil-plain", "dmsmil", "dmsmil+ot", "full-attention"]


def _measure(row: str, n: int, threads: int, repeats: int, queue: mp.Queue) -> None:
    import torch
    from torch import nn

    from wsimil.config import ModelConfig
    from wsimil.models import Bags, build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = ModelConfig()
    y = torch.tensor([1])
    if row == "full-attention":

        class FullAttention(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.project = nn.Sequential(nn.Linear(D_IN, 512), nn.ReLU())
                self.attn = nn.MultiheadAttention(512, 8, batch_first=True)
                self.classifier = nn.Linear(512, 2)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                h = self.project(x)  # (1, N, 512)
                h, _ = self.attn(h, h, h, need_weights=False)  # (1, N, 512), O(N²)
                return self.classifier(h.mean(dim=1))  # (1, 2)

        model = FullAttention()
        x = torch.randn(1, n, D_IN)

        def step() -> None:
            nn.functional.cross_entropy(model(x), y).backward()
    else:
        name = "dmsmil" if row.startswith("dmsmil") else row
        ot = "exact" if row == "dmsmil+ot" else "off"
        deformable = row != "dmsmil-plain"  # the projection the attention follows, alone
        section = cfg.dmsmil.model_copy(update={"ot": ot, "deformable": deformable})
        cfg = cfg.model_copy(update={"dmsmil": section})
        n_scales = 2 if name == "dmsmil" else 1
        model = build_model(name, cfg, [D_IN] * n_scales, 2)
        width = math.ceil(math.sqrt(n))
        k = torch.arange(n)
        grid = torch.stack([k % width, k // width], dim=-1)[None]  # (1, N, 2)
        bags = Bags(
            tuple(torch.randn(1, n, D_IN) for _ in range(n_scales)),
            None,
            tuple(grid for _ in range(n_scales)),
        )

        def step() -> None:
            loss, _ = model.loss(model(bags), y)
            loss.backward()

    model.train()
    before = rss_mb()
    t0 = time.process_time()
    step()
    first_s = time.process_time() - t0
    growth_mb = peak_mb() - before
    times = []
    for _ in range(repeats if first_s < 5 else 1):
        model.zero_grad(set_to_none=True)
        t0 = time.process_time()
        step()
        times.append(time.process_time() - t0)
    times.sort()
    queue.put({"time_s": times[len(times) // 2], "peak_mb": max(growth_mb, 0.0)})


def run(row: str, n: int, threads: int, repeats: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(row, n, threads, repeats, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        return {"skipped": f"failed (exit code {proc.exitcode})"}
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2000, 20000])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=300.0, help="skip a step slower")
    parser.add_argument("--out", default="benchmarks/results/model_scaling.json")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS, help="models to run")
    args = parser.parse_args()
    rows = [row for row in ROWS if row in args.rows]

    results: dict[str, dict[int, dict]] = {}
    for row in rows:
        results[row] = {}
        prev: tuple[int, float] | None = None
        for n in args.sizes:
            if row == "dmsmil+ot" and n > 5000:
                gb = n * n * 8 / 1e9
                res = {"skipped": f"exact OT: {gb:.1f} GB float64 costs, simplex on N² arcs"}
            elif row == "full-attention" and prev and prev[1] * (n / prev[0]) ** 2 > args.budget_s:
                guess = prev[1] * (n / prev[0]) ** 2
                res = {"skipped": f"extrapolated {guess:.0f} s > budget {args.budget_s:.0f} s"}
            else:
                res = run(row, n, args.threads, args.repeats)
            if "time_s" in res:
                prev = (n, res["time_s"])
            results[row][n] = res
            print(f"{row:15s} N={n:6d} {res}", flush=True)

    print(f"\nforward+backward per bag, {D_IN}-D, CPU, {args.threads} threads")
    header = "model".ljust(16) + "".join(f"{f'N={n}':>24s}" for n in args.sizes)
    print(header)
    for row in rows:
        cells = []
        for n in args.sizes:
            r = results[row][n]
            cells.append(
                "skipped".rjust(24)
                if "skipped" in r
                else f"{r['time_s'] * 1e3:9.1f} ms {r['peak_mb']:8.1f} MB".rjust(24)
            )
        print(row.ljust(16) + "".join(cells))
    print("\ntime growth between consecutive sizes (linear: x N ratio, quadratic: x N ratio²)")
    for row in rows:
        pairs = zip(args.sizes, args.sizes[1:], strict=False)
        growth = [
            f"{a}->{b}: x{results[row][b]['time_s'] / results[row][a]['time_s']:.1f}"
            for a, b in pairs
            if "time_s" in results[row][a] and "time_s" in results[row][b]
        ]
        print(row.ljust(16) + "   ".join(growth))
    if {"dmsmil", "dmsmil-plain"} <= set(rows):
        ratios = [
            f"N={n}: x{results['dmsmil'][n]['time_s'] / results['dmsmil-plain'][n]['time_s']:.2f}"
            for n in args.sizes
            if "time_s" in results["dmsmil"][n] and "time_s" in results["dmsmil-plain"][n]
        ]
        print("dmsmil / dmsmil-plain (the deformable attention's cost)   " + "   ".join(ratios))
    for row in rows:
        for n in args.sizes:
            if "skipped" in results[row][n]:
                print(f"  {row} N={n}: skipped, {results[row][n]['skipped']}")
    with open(args.out, "w") as f:
        json.dump({"threads": args.threads, "d_in": D_IN, "results": results}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    from wsimil import cpu_isa

    cpu_isa.pin()  # the kernels the pipeline computes with (wsimil/cpu_isa.py)
    main()
