"""Prefect tag concurrency limits stay enforced while the kernel skips Prefect's per-task
tag-limit write for tags that have none (`sage_prefect.kernel.tag_limits`)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from sage_prefect import CollectSink, DaskEnvironment
from sage_prefect.kernel import tag_limits
from tests.kernel_ops import Sleep

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("prefect_api")]


def _create_limit(name: str, limit: int) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))


def _delete_limit(name: str) -> None:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        client.delete_global_concurrency_limit_by_name(name)


def test_prefect_still_has_the_cache_this_relies_on() -> None:
    assert tag_limits._prefect_cache() is not None, (
        "prefect.concurrency.services._no_limits_cache is gone: tag_limits no longer helps; "
        "revisit it for this Prefect version"
    )


def test_prime_caches_only_tag_sets_without_an_active_limit() -> None:
    from prefect.concurrency.services import _no_limits_cache

    tag = f"limited-{uuid.uuid4().hex[:6]}"
    _create_limit(f"tag:{tag}", 3)
    try:
        primed = tag_limits.prime([["sage", tag], ["sage", "free"]])
        limited, free = frozenset({"tag:sage", f"tag:{tag}"}), frozenset({"tag:sage", "tag:free"})
        assert primed == {limited: False, free: True}
        assert free in _no_limits_cache and limited not in _no_limits_cache
    finally:
        _delete_limit(f"tag:{tag}")
    assert tag_limits.prime([["sage", tag]]) == {limited: True}


def test_a_tag_limit_created_by_the_user_is_enforced(fake_gpu_cluster: Any, sage_home: Path) -> None:
    """A limit of 1 on the operator's resource tag: its task runs never overlap, although the
    CPU worker has two threads and would run two partitions at once without it."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    _create_limit("tag:sage:map", 1)
    try:
        env = DaskEnvironment(
            f"limited-{uuid.uuid4().hex[:6]}",
            address=fake_gpu_cluster.scheduler_address,
            batch_size=2,
            progress=False,
        )
        stream = env.from_batch([{"id": i} for i in range(8)])
        stream.map(Sleep, {"seconds": 0.2}).sink(CollectSink)  # 0.4 s a partition
        result = env.submit()
        assert result.sinks == {"CollectSink": 8}
    finally:
        _delete_limit("tag:sage:map")

    async def intervals() -> list[tuple[Any, Any]]:
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(result.flow_run_id)]))
            )
        return sorted((r.start_time, r.end_time) for r in runs if r.name.startswith("Sleep["))

    spans = asyncio.run(intervals())
    assert len(spans) == 4
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end, f"two Sleep task runs overlapped despite the limit: {spans}"
