"""This process's resident set and its high-water mark, in MB (Linux ``/proc``).

The peak is ``VmHWM``, the high-water mark of this process's own address space. Not
``ru_maxrss``: Linux keeps that across ``execve``, and Python starts subprocesses by
vfork + exec, so a stage started from a large parent (a pytest worker that has run other
tests) reported the parent's peak as its own (1,606 MB for a stage that peaks at 1,262).
"""

from __future__ import annotations


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_mb() -> float:
    return _status_mb("VmHWM")
