"""Dask-level task failures: what failed a future outside the code it ran, and which workers died.

A task whose worker process dies (killed for memory, a crash in native code, ``os._exit``)
is rescheduled on another worker; after ``distributed.scheduler.allowed-failures`` such
deaths the scheduler gives up and errs the task with `distributed.KilledWorker`, which
carries the task key and the *last* worker only. The scheduler also logs every worker it
removes on its ``"all"`` event topic, with the keys that were processing there:
`lost_task` puts the two together.

>>> from distributed import Client
>>> with Client(cluster) as client:  # doctest: +SKIP
...     future = client.submit(crash_the_worker)
...     lost = lost_task(client, future.exception())
>>> lost.workers  # doctest: +SKIP
['tcp://127.0.0.1:40187', 'tcp://127.0.0.1:45105']
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from distributed import Client, KilledWorker

logger = logging.getLogger("sage_prefect.dask_gpu")


@dataclass(frozen=True)
class LostTask:
    """A task Dask gave up on because the workers running it kept dying.

    ``workers`` are the addresses of the workers that died while the task was processing
    on them, oldest first; ``allowed_failures`` is the scheduler's limit it exceeded.

    >>> LostTask("run_stage-1", ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"], 1).workers[-1]
    'tcp://127.0.0.1:2'
    """

    key: str
    workers: list[str]
    allowed_failures: int


def dask_error(future: Any) -> BaseException | None:
    """The exception a finished Dask ``future`` erred with, or None if it did not err.

    Does not wait: a pending future is not (yet) an error. A cancelled future gives its
    `CancelledError`.

    >>> dask_error(object()) is None
    True
    """
    status = getattr(future, "status", None)
    if status == "error":
        exc: BaseException | None = future.exception()
        return exc
    if status == "cancelled":
        from distributed.client import FutureCancelledError

        return FutureCancelledError(future.key, reason="cancelled", msg=None)
    return None


def killed_key(exc: BaseException | None) -> str | None:
    """The key of the task a `KilledWorker` gave up on (dependents err with it too); else None.

    >>> killed_key(ValueError("not a worker death")) is None
    True
    """
    return str(exc.task) if isinstance(exc, KilledWorker) else None


def lost_task(client: Client, exc: BaseException) -> LostTask | None:
    """If ``exc`` is Dask's `KilledWorker`: the task and every worker lost running it; else None.

    The workers come from the scheduler's ``remove-worker`` events (unexpected removals
    whose processing keys include the task), plus the exception's last worker should the
    events be gone (the topic is a bounded log). Never raises for want of events.
    """
    key = killed_key(exc)
    if key is None or not isinstance(exc, KilledWorker):
        return None
    workers = _removed_while_processing(client, key)
    last = getattr(exc.last_worker, "address", None)
    if last and last not in workers:
        workers.append(str(last))
    return LostTask(key=key, workers=workers, allowed_failures=int(exc.allowed_failures))


def _removed_while_processing(client: Client, key: str) -> list[str]:
    try:
        events = client.get_events("all")
    except Exception:  # the scheduler went away too: the exception's last worker must do
        logger.debug("could not read the scheduler's worker-removal events", exc_info=True)
        return []
    workers: list[str] = []
    for _timestamp, msg in sorted(events, key=lambda event: event[0]):
        if not isinstance(msg, Mapping) or msg.get("action") != "remove-worker" or msg.get("expected"):
            continue
        if key in (msg.get("processing-tasks") or ()):
            workers.append(str(msg.get("worker")))
    return workers
