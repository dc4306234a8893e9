"""Slides/s of `wsimil features` on the thread runner and on Dask (prints, asserts nothing).

Each runner extracts the same slides from scratch (tiles + features) in a fresh folder, by
the real CLI in a fresh process, with the tiles/features settings of the project's
params.yaml. Two figures per runner:

- end to end: the whole command (Python start, Prefect's temporary server, a local
  cluster's start and stop when there is one);
- in the flow: the flow's own time from its report (``seconds``), i.e. from reading
  slides.csv to the last slide, which for Dask includes starting the workers' Python,
  Prefect and the network once per worker process.

On a machine with few cores Dask cannot be faster than the threads; the difference is
its overhead.

Run from the repository root (``make demo`` or ``wsimil synth`` first):
    python benchmarks/dask_extraction.py --slides 8 --runners threads local:2
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

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]


def project_for(folder: Path, params: dict, slides_csv: Path, n_slides: int) -> Path:
    """A project in ``folder``: the first ``n_slides`` slides, the params' extraction settings."""
    folder.mkdir(parents=True)
    table = pd.read_csv(slides_csv).head(n_slides)
    table["path"] = [str((slides_csv.parent / p).resolve()) for p in table["path"]]
    table.to_csv(folder / "slides.csv", index=False)
    tiles = {**params["tiles"], "slides_csv": "slides.csv", "out_dir": "data/tiles",
             "report": "reports/tiles.csv"}  # fmt: skip
    features = {**params["features"], "out_dir": "data/features", "report": "reports/features.csv"}
    (folder / "params.yaml").write_text(yaml.safe_dump({"tiles": tiles, "features": features}))
    return folder


def run(project: Path, runner: str) -> tuple[float, dict]:
    """(wall seconds, report summary) of `wsimil features` with ``runner``."""
    args = [] if runner == "threads" else ["--dask", runner]
    env = {
        k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "WSIMIL_DASK_ADDRESS")
    }
    env["PREFECT_HOME"] = str(project / ".prefect")
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a busy machine
    cmd = [
        sys.executable,
        "-m",
        "wsimil",
        "features",
        *args,
        "--params",
        str(project / "params.yaml"),
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return wall, json.loads((project / "reports" / "features.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--slides", type=int, default=8, help="slides of tiles.slides_csv to use")
    ap.add_argument("--runners", nargs="+", default=["threads", "local:2"],
                    help="threads, local:N or a scheduler address")  # fmt: skip
    args = ap.parse_args()
    params = yaml.safe_load(args.params.read_text())
    slides_csv = (args.params.parent / params["tiles"]["slides_csv"]).resolve()
    if not slides_csv.is_file():
        raise SystemExit(f"{slides_csv} does not exist; run `make demo` or `wsimil synth` first")
    t, f = params["tiles"], params["features"]
    print(
        f"{os.cpu_count()} CPUs; {args.slides} slides of {slides_csv}; tile_px {t['tile_px']}, "
        f"top_k {t['top_k']}, {f['extractor']} ({f['weights']}), batch {f['batch_size']}, "
        f"num_workers {f['num_workers']}, concurrent_slides {f['concurrent_slides']}"
    )
    print(f"{'runner':<24}{'end to end':>20}{'in the flow':>20}")
    with tempfile.TemporaryDirectory(prefix="wsimil-dask-bench-") as tmp:
        for i, runner in enumerate(args.runners):
            project = project_for(Path(tmp) / f"run{i}", params, slides_csv, args.slides)
            wall, summary = run(project, runner)
            n, flow_s = summary["n_slides"], summary["seconds"]
            print(
                f"{summary['task_runner']:<24}{n / wall:>9.3f} slides/s ({wall:5.1f} s)"
                f"{n / flow_s:>9.3f} slides/s ({flow_s:5.1f} s)"
            )


if __name__ == "__main__":
    from wsimil import cpu_isa

    cpu_isa.pin()  # the kernels the pipeline computes with (wsimil/cpu_isa.py)
    main()
