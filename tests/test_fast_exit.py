"""The CLI ends without the interpreter's teardown, and loses nothing by it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from wsimil.cli.fast_exit import exit_status


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_an_armed_process_runs_later_handlers_joins_threads_and_flushes_first():
    res = run_python(
        """
        import atexit, sys, threading, time
        from wsimil.cli import fast_exit
        import logging  # registers its own exit handler after fast_exit's

        def late():
            time.sleep(0.5)
            print("thread finished", flush=True)

        threading.Thread(target=late).start()  # non-daemon: joined before any exit handler
        atexit.register(lambda: sys.stdout.write("handler registered later ran, no newline"))
        sys.stderr.write("to stderr")
        fast_exit.arm(3)
        """
    )
    assert res.returncode == 3, res.stderr
    assert "thread finished" in res.stdout
    assert res.stdout.endswith("handler registered later ran, no newline")  # then the flush
    assert res.stderr == "to stderr"


def test_an_unarmed_process_exits_as_python_would():
    res = run_python(
        """
        import atexit
        from wsimil.cli import fast_exit
        atexit.register(lambda: print("bye"))
        raise SystemExit(4)
        """
    )
    assert (res.returncode, res.stdout) == (4, "bye\n")


@pytest.mark.parametrize(
    "code, status", [(None, 0), (0, 0), (2, 2), (256 + 7, 7), ("a message", 1), (True, 1)]
)
def test_exit_status_is_pythons(code, status):
    assert exit_status(code) == status
    res = run_python(f"raise SystemExit({code!r})")
    assert res.returncode == status


def test_the_cli_keeps_its_exit_status_and_its_error_line(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "wsimil", "models"], capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0 and "dmsmil" in ok.stdout, ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "wsimil", "crossval", "--model", "nosuch"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr  # no params.yaml


@pytest.mark.parametrize(
    "body, status, stderr",
    [
        ("pass", 0, ""),
        ("raise SystemExit(3)", 3, ""),
        ("raise RuntimeError('boom')", 1, "RuntimeError: boom"),
    ],
)
def test_main_arms_the_status_python_would_give(body, status, stderr):
    res = run_python(
        f"""
        import wsimil.cli as cli

        def app():
            {body}

        cli.app = app
        cli.main()
        print("after main")
        """
    )
    assert res.returncode == status
    assert stderr in res.stderr
    assert ("after main" in res.stdout) == (status == 0)
