"""Keep Prefect's tag-concurrency check off the hot path when no tag limit exists.

Every Prefect task run with tags asks the API for slots on its ``tag:<tag>`` concurrency
limits before it starts (``POST /v2/concurrency_limits/increment-with-lease``), even when
no such limit exists. Prefect caches a "no limits" answer for 5 s per process
(``prefect.concurrency.services._no_limits_cache``), so a worker makes that call about
once every 5 s.

On the SQLite-backed API (the embedded default) that call is a *write* transaction
(an ``UPDATE ... WHERE id IN ()``) begun after a read; when a concurrent write (the task
run recorder storing another task's state) commits in between, SQLite answers
``database is locked``, the API answers 503, and Prefect's client backs off for ~2 s
before retrying. Measured with ``benchmarks/pipeline_overhead.py`` (prefect 3.8.8): every
one of those calls hit the 503, stalling 5-7 of 40 tasks by 2-6 s and costing a third of
the run's throughput.

What this module does instead: it reads the API's concurrency limits (a read, which
never conflicts) and, when none of a task's ``tag:`` names has an active limit, records
that in Prefect's own cache, exactly as Prefect would have after a successful call. A
tag limit a user creates (``prefect concurrency-limit create resource:GPU 1`` or a
global limit named ``tag:resource:GPU``) is seen on the next refresh (at most a few
seconds later, like Prefect's own cache) and then enforced by Prefect as usual.

The cache is a private attribute of Prefect: if a Prefect release drops it, `prime`
does nothing and Prefect's default behaviour applies (``tests/test_kernel.py`` checks
that it is there for the pinned version).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger("sage_prefect.kernel")

REFRESH_SECONDS = 1.0  # Prefect's cache entry lives 5 s; refresh well inside that
_PAGE = 200
_known: set[frozenset[str]] = set()  # tag sets seen in this process (a handful per pipeline)
_state = {"primed_at": 0.0}
_lock = threading.Lock()


def limit_names(tags: Iterable[str]) -> frozenset[str]:
    """The concurrency-limit names Prefect's task engine asks for, for a task run's tags."""
    return frozenset(f"tag:{tag}" for tag in tags)


def _prefect_cache() -> tuple[Any, Any] | None:
    try:
        from prefect.concurrency import services
    except ImportError:  # pragma: no cover - prefect is a hard dependency
        return None
    cache = getattr(services, "_no_limits_cache", None)
    lock = getattr(services, "_cache_lock", None)
    if cache is None or lock is None:
        return None
    return cache, lock


def active_limit_names(client: Any) -> set[str]:
    """Names of all active global concurrency limits (tag limits are ``tag:<tag>``)."""
    names: set[str] = set()
    offset = 0
    while True:
        page = client.read_global_concurrency_limits(limit=_PAGE, offset=offset)
        names.update(limit.name for limit in page if limit.active)
        if len(page) < _PAGE:
            return names
        offset += _PAGE


def prime(tag_sets: Iterable[Iterable[str]], api_url: str | None = None) -> dict[frozenset[str], bool]:
    """Record "no limits" in Prefect's cache for each tag set that has no active limit.

    The sets are remembered in this process, so `refresh` keeps all of them primed.
    Returns, per set of limit names, whether it was recorded (False: a limit exists, or
    the cache is unavailable, or the API could not be read; Prefect then checks as usual).
    """
    sets = {limit_names(tags) for tags in tag_sets} - {frozenset()}
    with _lock:
        _known.update(sets)
        _state["primed_at"] = time.monotonic()
    return _prime(sets, api_url)


def refresh(tags: Iterable[str] = ()) -> None:
    """Re-prime every tag set this process knows (plus ``tags``) when the last refresh is
    older than `REFRESH_SECONDS`; called after each task, so the next one finds the cache warm."""
    names = limit_names(tags)
    with _lock:
        if names:
            _known.add(names)
        if time.monotonic() - _state["primed_at"] < REFRESH_SECONDS or not _known:
            return
        _state["primed_at"] = time.monotonic()
        sets = set(_known)
    _prime(sets, None)


def _prime(sets: set[frozenset[str]], api_url: str | None) -> dict[frozenset[str], bool]:
    if not sets:
        return {}
    cache = _prefect_cache()
    if cache is None:
        return dict.fromkeys(sets, False)
    try:
        active = _read_active(api_url)
    except Exception:  # the API being unreachable is reported by the task engine itself
        logger.debug("could not read concurrency limits; leaving Prefect's check in place", exc_info=True)
        return dict.fromkeys(sets, False)
    store, lock = cache
    out: dict[frozenset[str], bool] = {}
    with lock:
        for names in sets:
            unlimited = not (names & active)
            if unlimited:
                store[names] = True
            else:
                store.pop(names, None)
            out[names] = unlimited
    return out


def _read_active(api_url: str | None) -> set[str]:
    from prefect.client.orchestration import get_client

    if api_url is None:
        with get_client(sync_client=True) as client:
            return active_limit_names(client)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return active_limit_names(client)
