"""Process-wide defaults the CLI applies once at start (never at import time).

- MLflow tracks to a sqlite database at an *absolute* path inside the project (MLflow's
  own default, ``sqlite:///mlflow.db``, is relative to the working directory).
- Telemetry of MLflow, Prefect and DVC is off.
- Prefect runs without a server unless ``PREFECT_API_URL`` is set; its temporary server
  gets 120 s to start (Prefect's 20 s is too short on a busy 2-core machine). For the
  flows the CLI runs, :func:`prefect_api` starts that server itself, bound to the CLI's
  life (Prefect's own outlives a ``kill -9`` of its parent), its output in
  ``PREFECT_HOME/temporary-server.log``.
- Prefect's console handler shows warnings and errors only
  (``PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL=WARNING``): its INFO lines, two per slide
  ("Finished in state Completed()"), stay out of the terminal but still reach the Prefect
  UI and its run logs, whose handler is another (``api``). Set the variable to ``INFO`` to
  see them on the console again.

Anything already set in the environment wins, so a tracking server or PostgreSQL is one
environment variable away.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

SERVER_LOG = "temporary-server.log"  # in PREFECT_HOME: the last temporary server's output

TELEMETRY_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",  # the api handler still gets INFO
}


def default_tracking_uri(root: Path) -> str:
    """The embedded MLflow store: ``sqlite:////abs/path/mlruns.db``."""
    return f"sqlite:///{(Path(root).resolve() / 'mlruns.db').as_posix()}"


def apply_runtime_defaults(root: Path) -> dict[str, str]:
    """Fill unset environment variables; return what the process now uses."""
    for key, value in {**TELEMETRY_OFF, **PREFECT_DEFAULTS}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_TRACKING_URI", default_tracking_uri(root))
    return {k: os.environ[k] for k in (*TELEMETRY_OFF, "MLFLOW_TRACKING_URI")}


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent():
    """A ``preexec_fn`` that has the kernel SIGKILL the child when this process dies (Linux).

    The signal follows the *thread* that starts the child: start it from a thread that lives
    as long as the child should (the main thread, or one that waits for it). Elsewhere None.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the child
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


@contextlib.contextmanager
def prefect_api(meanwhile: Callable[[], object] | None = None) -> Iterator[str | None]:
    """The Prefect API for the flows run inside: ``PREFECT_API_URL``, or a temporary server.

    ``meanwhile`` runs once while a temporary server boots (~9 s on 2 cores), e.g. the
    flow's own heavy imports, so the two overlap; otherwise it runs before the block.

    Without ``PREFECT_API_URL`` Prefect would start a temporary server (``uvicorn`` of
    ``prefect.server.api.server:create_app``) and stop it at exit, but nothing stops it when
    its parent is killed: it kept running after a ``kill -9`` of ``wsimil tiles``. This starts
    the same server, on 127.0.0.1 with Prefect's own settings, as a child that the kernel kills
    when this process dies however it dies (``PR_SET_PDEATHSIG``, Linux; the signal follows
    the thread that started it: call this from the main thread), and points Prefect at it
    for the block. Elsewhere (no ``prctl``) Prefect's own temporary server is used.

    Yields:
        The API URL in use, or None where Prefect starts its own.
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
        temporary_settings,
    )

    if PREFECT_API_URL.value() or not sys.platform.startswith("linux"):
        if meanwhile is not None:
            meanwhile()
        yield PREFECT_API_URL.value()
        return
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",  # what Prefect sets for its temporary server
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }
    startup_s = os.environ.get(  # set after Prefect read its settings: still honoured
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(),
    )
    log_path = Path(get_current_settings().home) / SERVER_LOG
    server, url = _start_bound_server(env, float(startup_s), log_path, meanwhile)
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            try:
                yield url
            finally:  # send the runs' last logs and events while the server still listens
                from prefect.events.worker import EventsWorker
                from prefect.logging.handlers import APILogWorker

                for worker in (APILogWorker, EventsWorker):
                    worker.drain_all(timeout=10)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _start_bound_server(
    env: dict[str, str],
    timeout_s: float,
    log_path: Path,
    meanwhile: Callable[[], object] | None = None,
) -> tuple[subprocess.Popen, str]:
    """The server, its output in ``log_path`` (overwritten each start), not the terminal:
    the command's console stays its own, without the server's lines (a shutdown with DB
    tasks in flight logged ``asyncio - Task was destroyed but it is pending!`` there)."""
    import httpx

    log_path.parent.mkdir(parents=True, exist_ok=True)

    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
               "--lifespan", "on"]  # fmt: skip
        with log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
            server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      preexec_fn=die_with_parent())  # fmt: skip
        url = f"http://127.0.0.1:{port}/api"
        if meanwhile is not None:  # while the server boots; once, whatever the attempts
            meanwhile, work = None, meanwhile
            try:
                work()
            except BaseException:
                server.kill()
                server.wait()
                raise
        while server.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return server, url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        if server.poll() == 3 and time.monotonic() < deadline:
            continue  # the port was taken meanwhile: another one
        server.kill()
        server.wait()
        raise RuntimeError(
            f"Prefect's temporary server did not answer within {timeout_s:.0f} s (exit code "
            f"{server.returncode}; its log: {log_path}); raise "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or start `prefect server start` "
            "and set PREFECT_API_URL"
        )
