"""The CPU kernels are pinned, so results are the same bits on AVX2 and AVX-512 machines.

The golden feature hashes (test_golden.py) were computed on an AVX2 machine; with the pin
they hold on AVX-512 ones too, and a fresh CLI process computes with the pinned kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from wsimil import cpu_isa
from wsimil.experiment.reproduce import _check_cpu_kernels

AVX2 = {"avx", "avx2", "fma", "sse4_2"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
HAS_AVX2 = (cpu_isa.cpu_flags() or set()) >= cpu_isa.NEEDS["avx2"]
X86 = cpu_isa.platform.machine().lower() in ("x86_64", "amd64")


@pytest.fixture
def clean_env(monkeypatch):
    for key in (cpu_isa.ENV, *cpu_isa.LIBRARY_VARIABLES):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_the_default_is_avx2_where_the_cpu_has_it_and_native_elsewhere(clean_env):
    assert cpu_isa.choice(AVX512, "x86_64") == "avx2"
    assert cpu_isa.choice(AVX2, "x86_64") == "avx2"
    assert cpu_isa.choice({"sse4_2", "avx"}, "x86_64") == "native"  # no AVX2: cannot pin
    assert cpu_isa.choice(set(), "aarch64") == "native"
    clean_env.setattr(cpu_isa, "cpu_flags", lambda: None)  # flags unreadable
    assert cpu_isa.choice(machine="x86_64") == "native"


def test_a_named_choice_the_cpu_lacks_is_one_clear_error(clean_env):
    clean_env.setenv(cpu_isa.ENV, "avx512")
    assert cpu_isa.choice(AVX512, "x86_64") == "avx512"
    with pytest.raises(cpu_isa.CpuIsaError, match="lacks avx512bw, avx512dq, avx512f, avx512vl"):
        cpu_isa.choice(AVX2, "x86_64")
    clean_env.setenv(cpu_isa.ENV, "avx2")
    with pytest.raises(cpu_isa.CpuIsaError, match="aarch64 CPU, not x86-64"):
        cpu_isa.choice(set(), "aarch64")
    clean_env.setenv(cpu_isa.ENV, "AVX-2")
    with pytest.raises(cpu_isa.CpuIsaError, match="choose one of avx2, avx512, native"):
        cpu_isa.choice(AVX512, "x86_64")
    clean_env.setenv(cpu_isa.ENV, "Native")
    assert cpu_isa.choice(set(), "aarch64") == "native"


def test_pin_sets_the_three_libraries_and_a_variable_set_by_hand_wins(clean_env):
    clean_env.setattr(cpu_isa, "cpu_flags", lambda: AVX512)
    clean_env.setattr(cpu_isa.platform, "machine", lambda: "x86_64")
    clean_env.setenv("MKL_ENABLE_INSTRUCTIONS", "SSE4_2")
    assert cpu_isa.pin() == "avx2"
    assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2"
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert os.environ["MKL_ENABLE_INSTRUCTIONS"] == "SSE4_2"
    clean_env.delenv("ATEN_CPU_CAPABILITY")
    clean_env.setenv(cpu_isa.ENV, "native")
    assert cpu_isa.pin() == "native" and "ATEN_CPU_CAPABILITY" not in os.environ


def _fresh(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *code.split()],
        env={**cpu_isa.unpinned(os.environ), **env},
        capture_output=True,
        text=True,
    )


@pytest.mark.skipif(not (X86 and HAS_AVX2), reason="needs an x86-64 CPU with AVX2")
def test_a_fresh_cli_process_computes_with_the_pinned_kernels(tmp_path):
    doctor = "-m wsimil doctor --params " + str(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("model:\n  name: abmil\n")
    done = _fresh(doctor)
    assert done.returncode == 0, done.stderr
    assert "CPU kernels: avx2 (" in done.stdout  # ATen's capability is AVX2 in that process
    done = _fresh(doctor, WSIMIL_CPU_ISA="native", ATEN_CPU_CAPABILITY="default")
    assert "CPU kernels: native (DEFAULT, ATEN_CPU_CAPABILITY=default)" in done.stdout
    done = _fresh(doctor, WSIMIL_CPU_ISA="avx3")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        "error: WSIMIL_CPU_ISA='avx3': choose one of avx2, avx512, native"
    )


def test_reproduce_warns_when_the_run_used_other_kernels():
    here = cpu_isa.in_use()
    said: list[str] = []
    _check_cpu_kernels({"cpu_kernels": here}, said.append)
    _check_cpu_kernels({}, said.append)  # runs made before the tag: nothing to compare
    assert said == []
    _check_cpu_kernels({"cpu_kernels": "native (AVX512)", "cpu_model": "Xeon"}, said.append)
    assert len(said) == 1 and "'native (AVX512)' (on Xeon)" in said[0]
    assert f"'{here}'" in said[0] and "WSIMIL_CPU_ISA=native on a CPU with" in said[0]
    other = "avx512" if here != "avx512" else "avx2"
    _check_cpu_kernels({"cpu_kernels": other}, said.append)
    assert f"set WSIMIL_CPU_ISA={other} to compare" in said[1]
