"""Wall time of the test suite (or some of its files), one process against pytest-xdist.

Both runs happen here, one after the other, on the same files, so the ratio is measured in one
run; the load average before each is printed beside it (on a shared machine it moves the
figures more than anything else). Each run is ``python -m pytest -q -p no:randomly`` (the same
order both times) in a fresh process with this checkout on ``PYTHONPATH``:

    python benchmarks/suite_time.py                                  # the whole suite
    python benchmarks/suite_time.py tests/test_faults.py tests/test_serve.py
    python benchmarks/suite_time.py --workers 4 -- -m "not slow"     # pytest options after --

It prints one line per run (wall seconds, exit status, tests summary line) and the ratio
serial / parallel. A run that fails still gets its time printed; no timing asserts anywhere.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(args: list[str]) -> tuple[float, int, str]:
    """(wall seconds, exit status, pytest's last line) of ``python -m pytest ARGS``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", *args]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return wall, done.returncode, lines[-1] if lines else done.stderr[-300:]


def main() -> None:
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="test files or node ids (default: all)")
    parser.add_argument("--workers", default="auto", help="pytest-xdist -n (default auto)")
    opts = parser.parse_args(argv[:cut])
    extra = argv[cut + 1 :]  # after --: to pytest as they are
    runs = {
        "serial": ["-n", "0", *extra, *opts.files],
        f"xdist -n {opts.workers}": ["-n", opts.workers, "--dist", "loadfile", *extra,
                                     *opts.files],
    }  # fmt: skip
    walls = {}
    for name, args in runs.items():
        load = os.getloadavg()[0]
        wall, status, summary = timed(args)
        walls[name] = wall
        print(f"{name:>14}: {wall:8.1f} s  exit {status}  load {load:.1f} before  | {summary}")
    serial, parallel = walls.values()
    print(f"serial / parallel = {serial / parallel:.2f} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
