"""benchmarks/gpu.py runs every part at tiny sizes on the CPU and makes one table."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_gpu_bench():
    sys.path.insert(0, str(BENCH))  # gpu.py imports serve_latency beside it
    try:
        spec = importlib.util.spec_from_file_location("gpu_bench", BENCH / "gpu.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_bench"] = module  # its dataclass looks itself up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_gpu_benchmark_quick_sizes_fill_every_row_of_the_table():
    gpu = load_gpu_bench()
    rows = gpu.measure(gpu.QUICK, torch.device("cpu"))
    assert [r[0] for r in rows] == ["extract", "extract", "train", "train"] + ["serve"] * 3
    for _, what, figure, _ in rows:
        assert float(re.findall(r"[\d.]+", figure.replace(",", ""))[0]) > 0, (what, figure)
    text = gpu.table(rows)
    assert text.count("\n") == len(rows) + 1
    assert "paper 4.05 s on an RTX 3060" in text and "one pass (served on a GPU)" in text
    assert "autocast bfloat16" in text  # CPU autocast row
