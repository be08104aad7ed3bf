"""Run a local GPU/CPU cluster in the foreground on a fixed scheduler port.

Other processes (flows, ``sage-prefect`` commands, notebooks) join it with
``Client("tcp://127.0.0.1:8786")`` or `task_runner`. ``sage-prefect cluster up`` wraps
`serve_cluster`.

>>> serve_cluster(on_ready=lambda address: print("scheduler at", address))  # doctest: +SKIP
scheduler at tcp://127.0.0.1:8786
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from sage_prefect.dask_gpu.cluster import local_cluster

logger = logging.getLogger("sage_prefect.dask_gpu")


@contextmanager
def _sigterm_sets(stop: threading.Event) -> Iterator[None]:
    """In the main thread, turn SIGTERM into ``stop.set()`` for the duration (else nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve_cluster(
    *,
    host: str = "127.0.0.1",
    scheduler_port: int = 8786,
    n_gpu_workers: int | None = None,
    n_cpu_workers: int | None = None,
    threads_per_worker: int = 1,
    processes: bool = True,
    env: dict[str, str] | None = None,
    on_ready: Callable[[str], None] | None = None,
    stop_event: threading.Event | None = None,
) -> None:
    """Start `local_cluster` with its scheduler on ``host:scheduler_port`` and block.

    Calls ``on_ready(scheduler_address)`` once every worker has joined, then waits until
    ``stop_event`` is set, KeyboardInterrupt (Ctrl-C) or -- when run in the main thread --
    SIGTERM, and closes the cluster with all its worker processes. A port already in use
    raises ``RuntimeError`` (naming host and port) and leaves nothing running.

    >>> import threading
    >>> stop = threading.Event()
    >>> thread = threading.Thread(target=serve_cluster, kwargs={"stop_event": stop})  # doctest: +SKIP
    >>> thread.start()  # doctest: +SKIP
    >>> stop.set(); thread.join()  # doctest: +SKIP
    """
    stop = stop_event if stop_event is not None else threading.Event()
    with _sigterm_sets(stop):
        cluster = local_cluster(
            n_gpu_workers=n_gpu_workers,
            n_cpu_workers=n_cpu_workers,
            threads_per_worker=threads_per_worker,
            processes=processes,
            host=host,
            scheduler_port=scheduler_port,
            env=env,
        )
        try:
            address = cluster.scheduler_address
            logger.info("Dask cluster ready at %s (%d workers)", address, len(cluster.workers))
            if on_ready is not None:
                on_ready(address)
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            logger.info("interrupted, closing the Dask cluster")
        finally:
            cluster.close()
