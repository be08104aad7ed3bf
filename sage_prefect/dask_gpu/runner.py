"""Prefect task runners on Dask, and a reachability probe for ``sage-prefect doctor``.

``prefect_dask`` (and with it Prefect) is imported only when a runner is built, so
importing this package stays cheap.

>>> runner = task_runner("tcp://127.0.0.1:8786")  # doctest: +SKIP
>>> cluster_address_reachable("tcp://127.0.0.1:8786", timeout=1.0)  # doctest: +SKIP
True
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING, Any

from distributed.comm.core import connect

if TYPE_CHECKING:
    from prefect_dask.task_runners import DaskTaskRunner

logger = logging.getLogger("sage_prefect.dask_gpu")


def task_runner(address: str, *, client_kwargs: dict[str, Any] | None = None) -> DaskTaskRunner:
    """A Prefect ``DaskTaskRunner`` that connects to the existing scheduler at ``address``.

    The runner neither starts nor closes the cluster; whoever started it (a
    `local_cluster`, `serve_cluster`, dask-jobqueue, ...) owns it.

    >>> from prefect import flow
    >>> @flow(task_runner=task_runner("tcp://127.0.0.1:8786"))  # doctest: +SKIP
    ... def pipeline() -> None: ...
    """
    from prefect_dask.task_runners import DaskTaskRunner

    return DaskTaskRunner(address=address, client_kwargs=client_kwargs)


async def _probe(address: str, connect_timeout_s: float) -> bool:
    comm = await connect(address, timeout=connect_timeout_s)
    try:
        await comm.write({"op": "identity", "n_workers": 0, "reply": True})
        reply = await comm.read()
    finally:
        comm.abort()
    return isinstance(reply, dict) and reply.get("type") == "Scheduler"


def _probe_sync(address: str, timeout: float, result: list[bool]) -> None:
    try:
        # distributed's own connect timeout does not bound the handshake with a peer that
        # accepts but never answers: bound the whole probe.
        result.append(asyncio.run(asyncio.wait_for(_probe(address, timeout), timeout)))
    except Exception as exc:  # unreachable, refused, timed out, malformed address, not Dask
        logger.debug("Dask scheduler at %s not reachable: %r", address, exc)


def cluster_address_reachable(address: str, timeout: float = 3.0) -> bool:
    """Whether a Dask scheduler answers at ``address`` within ``timeout`` seconds.

    Does a Dask handshake and asks the scheduler for its identity, so a port held by
    something else counts as unreachable. Never raises; safe to call from inside a
    running event loop (the probe runs on its own thread).

    >>> cluster_address_reachable("tcp://127.0.0.1:1", timeout=0.5)  # doctest: +SKIP
    False
    """
    result: list[bool] = []
    # A daemon thread with its own event loop: works inside a running loop, and a probe
    # that hangs regardless can neither block this call past the deadline nor the exit.
    probe = threading.Thread(
        target=_probe_sync, args=(address, timeout, result), daemon=True, name="sage-dask-probe"
    )
    probe.start()
    probe.join(timeout + 2.0)
    return bool(result and result[0])
