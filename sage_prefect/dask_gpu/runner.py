"""Prefect task runners on Dask, and a reachability probe for ``sage-prefect doctor``.

``prefect_dask`` (and with it Prefect) is imported only when a runner is built, so
importing this package stays cheap.

>>> runner = task_runner("tcp://127.0.0.1:8786")  # doctest: +SKIP
>>> cluster_address_reachable("tcp://127.0.0.1:8786", timeout=1.0)  # doctest: +SKIP
True
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import TYPE_CHECKING, Any

from distributed.comm import connect

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner

logger = logging.getLogger("sage_prefect.dask_gpu")


def task_runner(address: str, *, client_kwargs: dict[str, Any] | None = None) -> DaskTaskRunner:
    """A Prefect ``DaskTaskRunner`` that connects to the existing scheduler at ``address``.

    The runner neither starts nor closes the cluster; whoever started it (a
    `local_cluster`, `serve_cluster`, dask-jobqueue, ...) owns it.

    >>> from prefect import flow
    >>> @flow(task_runner=task_runner("tcp://127.0.0.1:8786"))  # doctest: +SKIP
    ... def pipeline() -> None: ...
    """
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=address, client_kwargs=client_kwargs)


async def _probe(address: str, timeout: float) -> bool:
    comm = await connect(address, timeout=timeout)
    try:
        await asyncio.wait_for(comm.write({"op": "identity", "n_workers": 0, "reply": True}), timeout)
        reply = await asyncio.wait_for(comm.read(), timeout)
    finally:
        comm.abort()
    return isinstance(reply, dict) and reply.get("type") == "Scheduler"


def _probe_sync(address: str, timeout: float) -> bool:
    try:
        return asyncio.run(_probe(address, timeout))
    except Exception as exc:  # unreachable, refused, timed out, malformed address, not Dask
        logger.debug("Dask scheduler at %s not reachable: %r", address, exc)
        return False


def cluster_address_reachable(address: str, timeout: float = 3.0) -> bool:
    """Whether a Dask scheduler answers at ``address`` within ``timeout`` seconds.

    Does a Dask handshake and asks the scheduler for its identity, so a port held by
    something else counts as unreachable. Never raises; safe to call from inside a
    running event loop (the probe runs on its own thread).

    >>> cluster_address_reachable("tcp://127.0.0.1:1", timeout=0.5)  # doctest: +SKIP
    False
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sage-dask-probe") as pool:
        return pool.submit(_probe_sync, address, timeout).result()
