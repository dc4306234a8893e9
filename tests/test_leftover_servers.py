"""Long-running processes the CLI and flows start do not outlive them (issue 14, item 8).

A ``kill -9`` of ``python -m wsimil tiles`` takes its temporary Prefect server with it, and
``flows/train.py`` stops a CLI run that passes its time limit, with a message saying so.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from projects import REPO, TINY_PARAMS, Server, clean_env, run, wsimil

PREFECT_APP = "prefect.server.api.server:create_app"


def children(pid: int) -> dict[int, str]:
    """{pid: command line} of the processes whose parent is ``pid``."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                out[int(stat.parent.name)] = cmdline
        except (OSError, IndexError, ValueError):
            continue
    return out


def alive(pid: int) -> bool:
    """Running (a zombie that nobody reaped yet counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def prefect_servers(pid: int) -> dict[int, int]:
    """{pid: port} of the Prefect servers ``pid`` started."""
    found = {}
    for child, cmdline in children(pid).items():
        if PREFECT_APP in cmdline:
            args = cmdline.split()
            found[child] = int(args[args.index("--port") + 1])
    return found


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("lifetime") / "project"
    project.mkdir()
    params = {k: TINY_PARAMS[k] for k in ("synth", "tiles")}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    wsimil(["synth"], project)
    return project


@pytest.mark.slow
def test_a_killed_tiles_run_takes_its_prefect_server_with_it(cohort):
    env = clean_env(cohort)
    cmd = [sys.executable, "-m", "wsimil", "tiles", "--params", str(cohort / "params.yaml")]
    cli = Server(cmd, env, cohort / "tiles.log", cwd=cohort)  # its own group: cleanup
    try:
        servers: dict[int, int] = {}

        def server_answers() -> bool:
            servers.update(prefect_servers(cli.proc.pid))
            return any(
                httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
                for port in servers.values()
            )

        cli.wait_until(server_answers, 180, "wsimil tiles (its Prefect server)")
        os.kill(cli.proc.pid, signal.SIGKILL)
        cli.proc.wait(timeout=30)
        deadline = time.monotonic() + 5
        while any(alive(p) for p in servers) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [p for p in servers if alive(p)]
        for p in left:  # do not leave it behind for the next test
            os.kill(p, signal.SIGKILL)
        assert not left, f"the Prefect server {left} outlived its killed parent by 5 s"
    finally:
        cli.stop()

    # the next run works (and resumes), and leaves no server behind either
    rerun = Server(cmd, env, cohort / "tiles-again.log", cwd=cohort)
    try:
        seen: dict[int, int] = {}
        deadline = time.monotonic() + 300
        while rerun.proc.poll() is None and time.monotonic() < deadline:
            seen.update(prefect_servers(rerun.proc.pid))
            time.sleep(0.2)
        assert rerun.proc.returncode == 0, rerun.tail()
        assert "8 slides" in rerun.tail()
        assert seen and not any(alive(p) for p in seen)
    finally:
        rerun.stop()


SLEEPER = (  # a command that starts a child of its own, then sleeps
    "import pathlib, subprocess, sys, time; "
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
    "pathlib.Path(sys.argv[1]).write_text(str(child.pid)); print('working', flush=True); "
    "time.sleep(300)"
)
FLOW_RUN = f"""
import sys
from prefect import flow
from flows import train
from wsimil.runtime import apply_runtime_defaults, prefect_api

@flow
def slow(pid_file: str, timeout_h: float) -> str:
    return train._run([sys.executable, "-c", {SLEEPER!r}, pid_file], ".", timeout_h)

apply_runtime_defaults(__import__("pathlib").Path("."))
with prefect_api():
    try:
        slow(sys.argv[1], float(sys.argv[2]))
    except RuntimeError as exc:
        print("FAILED:", exc)
"""


@pytest.mark.slow
def test_a_flow_command_past_its_time_limit_is_stopped_with_its_children(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    env = clean_env(tmp_path, PYTHONPATH=str(REPO))  # flows/ is a folder of the checkout
    started = time.monotonic()
    out = run([sys.executable, "-c", FLOW_RUN, str(pid_file), str(3 / 3600)], tmp_path, env,
              timeout=300)  # fmt: skip
    assert time.monotonic() - started < 240  # not the sleeper's 300 s
    message = next(line for line in out.splitlines() if line.startswith("FAILED:"))
    assert "ran past this flow's time limit of 0.000833333 h (timeout_h)" in message
    assert "larger timeout_h" in message and "working" in message
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(grandchild):
        os.kill(grandchild, signal.SIGKILL)
        pytest.fail("the command's own child outlived the timeout")


def test_the_work_given_to_prefect_api_runs_once_while_its_server_boots(monkeypatch):
    """The CLI's extraction imports torch and timm while the temporary server starts."""
    from wsimil.runtime import prefect_api

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    seen = []
    with prefect_api(meanwhile=lambda: seen.append(set(prefect_servers(os.getpid())))) as url:
        assert url and httpx.get(f"{url}/health", timeout=10).status_code == 200
        (during,) = seen  # once
        assert during  # the server process was already running
    assert not any(alive(pid) for pid in during)  # and it is gone with the block


def test_the_temporary_servers_output_goes_to_its_log_not_the_commands_console(monkeypatch, capfd):
    """A command's console holds its own lines only; the server's are in PREFECT_HOME."""
    from prefect.settings import get_current_settings

    from wsimil.runtime import SERVER_LOG, prefect_api

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PYTHONVERBOSE", "1")  # the server (a child) prints every import
    log = Path(get_current_settings().home) / SERVER_LOG
    with prefect_api() as url:
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    out, err = capfd.readouterr()
    assert "import '" not in out + err  # no verbose-import line here ...
    assert "import '" in log.read_text(errors="replace")  # ... they are in the log
