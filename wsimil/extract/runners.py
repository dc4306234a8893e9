"""Where the extraction tasks run: threads of this process, or a Dask cluster.

The choice is a deployment setting, not a pipeline parameter (it never changes a result,
so it stays out of params.yaml and DVC does not rerun a stage for it):

- nothing: a ``ThreadPoolTaskRunner`` with ``concurrent_slides`` threads (the default);
- ``local:N``: a temporary ``distributed.LocalCluster`` of N single-threaded worker
  processes on this machine, stopped with the flow;
- a scheduler address (``tcp://10.0.0.5:8786``): an existing Dask cluster, whose workers
  run the same locked environment and see the slides and output folders at the same paths.

Both Dask forms use prefect-dask's ``DaskTaskRunner``. The CLI takes the choice from
``--dask`` or ``WSIMIL_DASK_ADDRESS``. Deployments (``flows/deploy.py``, work pools) load
the flows from their entrypoint in a new process; there the flows' default runner comes
from ``WSIMIL_DASK_ADDRESS`` in that process's environment (:func:`deployment_runner`).
"""

from __future__ import annotations

import contextlib
import re

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

ENV_VAR = "WSIMIL_DASK_ADDRESS"
LOCAL = re.compile(r"local:(\d+)")
ADDRESS = re.compile(r"([a-z0-9+]+://)?[\w.\-\[\]:]+:\d+")  # tcp://host:port, tls://..., host:port
USAGE = "expected local:N (N worker processes here) or a scheduler address like tcp://10.0.0.5:8786"


class DaskSpecError(ValueError):
    """A ``--dask`` value that cannot be used; the message says what to give instead."""


def parse_dask(spec: str | None, source: str = f"--dask / {ENV_VAR}") -> str | int | None:
    """``None``/``""`` → None (threads); ``"local:N"`` → N; an address → the address.

    Args:
        spec: the value given.
        source: where it came from, for the error message.
    """
    spec = (spec or "").strip()
    if not spec:
        return None
    if m := LOCAL.fullmatch(spec):
        if int(m.group(1)) < 1:
            raise DaskSpecError(f"{source} {spec!r}: a local cluster needs at least 1 worker")
        return int(m.group(1))
    if ADDRESS.fullmatch(spec):
        return spec if "://" in spec else f"tcp://{spec}"
    raise DaskSpecError(f"{source} {spec!r}: {USAGE}")


def task_runner(dask: str | int | None, threads: int) -> TaskRunner:
    """The runner for a parsed ``--dask`` value; ``threads`` task threads without one."""
    if dask is None:
        return ThreadPoolTaskRunner(max_workers=threads)
    from prefect_dask import DaskTaskRunner

    if isinstance(dask, int):
        _workers_not_daemons()
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": dask,
                "threads_per_worker": 1,
                "processes": True,
                "host": "127.0.0.1",
            },
        )
    return DaskTaskRunner(address=dask)


@contextlib.contextmanager
def api_for_workers(dask: str | int | None):
    """The Prefect API for a flow whose tasks run on Dask (nothing to do for threads).

    Dask workers report their task runs to the Prefect API of the flow. Without
    ``PREFECT_API_URL`` Prefect starts a temporary server in each process that needs one,
    so every worker would start its own (racing for ports, recording elsewhere): start the
    temporary server here and hand its address to the workers.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if dask is None or PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one Prefect would start here; stopped at exit
    server.start()
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield


def check_scheduler(address: str, timeout_s: float = 10, workers_timeout_s: float = 30) -> None:
    """Fail with one clear line unless ``address`` answers, has a worker, and its workers
    can reach the Prefect API this run will use.

    Without this, an unreachable scheduler surfaces as a crashed flow run and a traceback.
    """
    from distributed import Client
    from prefect.settings import PREFECT_API_URL

    try:
        client = Client(address, timeout=timeout_s, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise DaskSpecError(
            f"cannot reach the Dask scheduler at {address} ({exc}); start it "
            f"(`dask scheduler`) or fix --dask / {ENV_VAR}"
        ) from None
    try:
        client.wait_for_workers(1, timeout=workers_timeout_s)
        workers = list(client.scheduler_info(n_workers=-1)["workers"])
    except TimeoutError:
        raise DaskSpecError(
            f"the Dask scheduler at {address} has no worker after {workers_timeout_s:.0f} s; "
            f"start some with `dask worker {address}`"
        ) from None
    finally:
        client.close()
    remote = [w for w in workers if not _loopback(w)]
    if remote and not PREFECT_API_URL.value():
        raise DaskSpecError(
            f"the Dask workers at {address} ({', '.join(remote[:3])}) report their task runs "
            "to the Prefect API, and this run has none they can reach (a temporary server "
            "listens on 127.0.0.1 only); start `prefect server start --host 0.0.0.0` and set "
            "PREFECT_API_URL=http://<that host>:4200/api"
        )


def _loopback(address: str) -> bool:
    """True for a worker address on this machine's loopback interface (tcp://127.0.0.1:1234)."""
    import ipaddress

    from distributed.comm import get_address_host

    host = get_address_host(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _workers_not_daemons() -> None:
    """Start the workers of local clusters as non-daemon processes, which may have children.

    A daemon cannot start the tile reader processes of ``features.num_workers``. Dask reads
    this in the process that owns the cluster (this one) whenever it starts a worker.
    """
    import dask.config

    dask.config.set({"distributed.worker.daemon": False})


def deployment_runner(threads: int = 2) -> TaskRunner:
    """The task runner of a flow as a deployment loads it: ``WSIMIL_DASK_ADDRESS`` or threads.

    A served or worker-run flow is imported afresh from its entrypoint in a new process, so
    the choice is read from that process's environment (that of ``python flows/deploy.py``
    or of the Prefect worker). The flows live in the installed package, so Dask workers
    import the task code from there.
    """
    import os

    return task_runner(parse_dask(os.environ.get(ENV_VAR), source=ENV_VAR), threads)
