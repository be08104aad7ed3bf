"""The kernel end to end: SAGE API -> Prefect flow (real API server) -> real Dask cluster."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from kernel_ops import (
    BatchPreferred,
    ByMod,
    Counted,
    Counter,
    FailAfterWrite,
    FailOn,
    FlakyUntil,
    Mark,
    NotADict,
    PartitionTag,
    Sleep,
    Upper,
    WaitForMark,
    WhereAmI,
    Words,
)

from sage_prefect import (
    CollectSink,
    DaskEnvironment,
    EmptySourceError,
    LanceSink,
    OperatorError,
    PipelineDefinitionError,
    RecordError,
    ResourceUnavailableError,
)

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("prefect_api")]

DOCS = [{"id": i, "text": f"doc {i}"} for i in range(100)]


@pytest.fixture
def env(fake_gpu_cluster: Any, sage_home: Path) -> DaskEnvironment:
    return DaskEnvironment(
        f"test-{uuid.uuid4().hex[:6]}",
        address=fake_gpu_cluster.scheduler_address,
        batch_size=25,
        progress=False,
    )


def test_api_shape_runs_one_flow_with_a_task_per_operator(env: DaskEnvironment) -> None:
    (
        env.from_batch(DOCS)
        .map(Upper)
        .map(lambda r: {**r, "n": len(r["text"])})
        .filter(lambda r: r["id"] % 2 == 0)
        .sink(CollectSink)
    )
    result = env.submit()
    assert result.rows_in == 100 and result.partitions == 4
    rows = result.to_pylist()
    assert [r["id"] for r in rows] == list(range(0, 100, 2))
    assert rows[1] == {"id": 2, "text": "DOC 2", "n": 5}
    assert result.sinks == {"CollectSink": 50}

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def task_names() -> list[str]:
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(result.flow_run_id)]))
            )
            return sorted(r.name for r in runs)

    import asyncio

    names = asyncio.run(task_names())
    assert "Upper[p0]" in names and "CollectSink[p3]" in names
    assert len(names) == 16  # 4 operators x 4 partitions


def test_to_flow_is_a_prefect_flow_usable_inside_another_flow(env: DaskEnvironment) -> None:
    from prefect import Flow, flow

    env.from_batch(DOCS[:10]).map(Upper).sink(CollectSink)
    pipeline = env.to_flow()
    assert isinstance(pipeline, Flow)

    @flow
    def parent() -> int:
        return len(pipeline()["collected"])

    assert parent() == 10


def test_sources_table_dataframe_collection_and_source_class(env: DaskEnvironment, sage_home: Path) -> None:
    table = pa.table({"id": list(range(30)), "text": [f"t {i}" for i in range(30)]})
    for source in (table, pd.DataFrame(table.to_pydict()), iter(table.to_pylist())):
        other = DaskEnvironment("src", address=env.address, batch_size=8, progress=False)
        other.from_batch(source).flatmap(Words).sink(CollectSink)
        assert other.submit().collected.num_rows == 60  # type: ignore[union-attr]
    env.from_source(Counter, {"n": 42}).print("row:")
    result = env.submit()
    assert result.rows_in == 42 and result.sinks == {"PrintSink": 42}


def test_stages_are_pipelined_without_a_barrier(
    fake_gpu_cluster: Any, sage_home: Path, tmp_path: Path
) -> None:
    env = DaskEnvironment(
        "pipelined", address=fake_gpu_cluster.scheduler_address, batch_size=10, progress=False
    )
    (
        env.from_batch(DOCS[:60])
        # Stage a holds its last partition until stage b has finished partition 0.
        .map(WaitForMark, {"dir": str(tmp_path), "tag": "b", "hold_id": 50}, resources={"GPU": 1})
        .map(Mark, {"dir": str(tmp_path), "tag": "b"})
        .sink(CollectSink)
    )
    assert env.submit().collected.num_rows == 60  # type: ignore[union-attr]


def test_placement_follows_resource_labels(env: DaskEnvironment) -> None:
    (
        env.from_batch(DOCS)
        .map(WhereAmI, {"tag": "gpu"}, resources={"GPU": 1})
        .map(WhereAmI, {"tag": "cpu"})
        .sink(CollectSink)
    )
    rows = env.submit().to_pylist()
    assert {r["worker_gpu"] for r in rows} == {"gpu-0"}
    assert {r["worker_cpu"] for r in rows} == {"cpu-0"}


def test_unsatisfiable_resources_fail_fast_naming_operator_and_label(env: DaskEnvironment) -> None:
    env.from_batch(DOCS).map(Upper).map(WhereAmI, {"tag": "tpu"}, resources={"TPU": 1}).sink(CollectSink)
    with pytest.raises(ResourceUnavailableError) as info:
        env.submit()
    message = str(info.value)
    assert "WhereAmI" in message and "TPU" in message


def test_cpu_fallback_is_explicit(fake_gpu_cluster: Any, sage_home: Path) -> None:
    env = DaskEnvironment(
        "fallback", address=fake_gpu_cluster.scheduler_address, allow_cpu_fallback=True, progress=False
    )
    env.from_batch(DOCS[:5]).map(WhereAmI, {"tag": "tpu"}, resources={"TPU": 1}).sink(CollectSink)
    assert {r["worker_tpu"] for r in env.submit().to_pylist()} == {"cpu-0"}


def test_operator_error_names_operator_and_partition(env: DaskEnvironment) -> None:
    env.from_batch(DOCS).map(Upper).map(FailOn, {"id": 57}).sink(CollectSink)
    with pytest.raises(OperatorError) as info:
        env.submit()
    exc = info.value
    assert "FailOn" in str(exc) and "partition 2" in str(exc) and "ZeroDivisionError" in str(exc)
    assert exc.operator == "FailOn" and exc.partition == 2  # type: ignore[attr-defined]
    assert exc.flow_run_id  # type: ignore[attr-defined]


def test_retries_are_honoured(env: DaskEnvironment, tmp_path: Path) -> None:
    env.from_batch(DOCS[:50]).map(FlakyUntil, {"dir": str(tmp_path), "fail_times": 2}, retries=2).sink(
        CollectSink
    )
    assert env.submit().collected.num_rows == 50  # type: ignore[union-attr]
    assert sorted(p.read_text() for p in tmp_path.glob("attempts-*")) == ["3", "3"]

    again = tmp_path / "again"
    again.mkdir()
    other = DaskEnvironment("retries", address=env.address, batch_size=25, progress=False)
    other.from_batch(DOCS[:25]).map(FlakyUntil, {"dir": str(again), "fail_times": 2}, retries=1).sink(
        CollectSink
    )
    with pytest.raises(OperatorError, match="FlakyUntil.*partition 0.*flaky failure 2"):
        other.submit()
    assert (again / "attempts-0").read_text() == "2"


def test_timeout_names_the_operator(env: DaskEnvironment) -> None:
    env.from_batch(DOCS[:2]).map(Sleep, {"seconds": 5}, timeout_seconds=1).sink(CollectSink)
    with pytest.raises(OperatorError, match="Sleep"):
        env.submit()


def test_sink_is_idempotent_per_partition_on_retry_and_rerun(env: DaskEnvironment, tmp_path: Path) -> None:
    uri = str(tmp_path / "lance")
    markers = tmp_path / "markers"
    markers.mkdir()
    env.from_batch(DOCS).map(Upper).sink(
        FailAfterWrite, {"uri": uri, "table": "docs", "marker_dir": str(markers)}, retries=1
    )
    assert env.submit().rows == 100  # every partition failed once after writing, then was retried
    rerun = DaskEnvironment("rerun", address=env.address, batch_size=25, progress=False)
    rerun.from_batch(DOCS).map(Upper).sink(LanceSink, {"uri": uri, "table": "docs"})
    rerun.submit()

    import lancedb

    table = lancedb.connect(uri).open_table("docs").to_arrow()
    ids = sorted(table["id"].to_pylist())
    assert ids == list(range(100))  # no duplicates, nothing lost


def test_keyby_groups_each_key_into_one_partition(env: DaskEnvironment) -> None:
    env.from_batch(DOCS).keyby(ByMod, {"keys": 7}, parallelism=3).map(PartitionTag).sink(CollectSink)
    result = env.submit()
    rows = result.to_pylist()
    assert sorted(r["id"] for r in rows) == list(range(100))
    pids: dict[int, set[str]] = {}
    for r in rows:
        pids.setdefault(r["id"] % 7, set()).add(r["pid"])
    assert all(len(p) == 1 for p in pids.values())
    assert len({p for s in pids.values() for p in s}) <= 3


def test_execute_batch_is_preferred(env: DaskEnvironment) -> None:
    env.from_batch(DOCS[:10]).map(BatchPreferred).sink(CollectSink)
    assert all(r["batched"] for r in env.submit().to_pylist())


def test_large_outputs_travel_as_lance_handles(fake_gpu_cluster: Any, sage_home: Path) -> None:
    env = DaskEnvironment("spill", address=fake_gpu_cluster.scheduler_address, batch_size=20, progress=False)
    env.settings = env.settings.model_copy(update={"spill_threshold_bytes": 1})
    env.from_batch(DOCS).map(Upper).map(lambda r: {**r, "x": 1}).sink(CollectSink)
    result = env.submit()
    assert result.collected.num_rows == 100  # type: ignore[union-attr]
    assert result.to_pylist()[5] == {"id": 5, "text": "DOC 5", "x": 1}
    # Stage data lives only as long as the run.
    assert not (env.settings.stage_dir / result.flow_run_id).exists()


def test_cache_reuses_persisted_arrow_results(fake_gpu_cluster: Any, sage_home: Path, tmp_path: Path) -> None:
    counter = tmp_path / "count"
    results = []
    for _ in range(2):
        env = DaskEnvironment(
            "cached", address=fake_gpu_cluster.scheduler_address, batch_size=50, progress=False
        )
        env.from_batch(DOCS).map(Counted, {"file": str(counter)}, cache=True).sink(CollectSink)
        results.append(env.submit().to_pylist())
    assert results[0] == results[1]
    assert len(counter.read_text().splitlines()) == 2  # 2 partitions computed once, then served from cache
    stored = [p for p in (sage_home / "results").iterdir() if p.is_file()]
    # Persisted as Arrow IPC by ArrowSerializer (tag "arrow:"), never as a pickle.
    assert stored and all(b'"arrow:' in p.read_bytes() for p in stored)
    assert all(p.read_bytes()[:1] != b"\x80" for p in stored)


@pytest.mark.parametrize(
    ("source", "error", "match"),
    [
        ([{"id": 1}, {"id": 2}, {"id": 3}, 4], RecordError, r"record 3 is int"),
        ([], EmptySourceError, r"produced no records"),
        ([{"id": 1, "x": 1}, {"id": 2, "x": "two"}], RecordError, r"field 'x'"),
    ],
)
def test_bad_sources(env: DaskEnvironment, source: list[Any], error: type[Exception], match: str) -> None:
    env.from_batch(source).map(Upper).sink(CollectSink)
    with pytest.raises(error, match=match):
        env.submit()


def test_operator_returning_a_non_dict_is_named(env: DaskEnvironment) -> None:
    env.from_batch(DOCS).map(NotADict, {"id": 30}).sink(CollectSink)
    with pytest.raises(RecordError, match=r"NotADict.*partition 1.*record 5 is list"):
        env.submit()


def test_definition_errors_are_immediate(env: DaskEnvironment) -> None:
    stream = env.from_batch(DOCS)
    with pytest.raises(PipelineDefinitionError, match="parallelism"):
        stream.map(Upper, parallelism=0)
    with pytest.raises(PipelineDefinitionError, match="expected a MapFunction"):
        stream.map(ByMod)
    sink = stream.sink(CollectSink)
    with pytest.raises(PipelineDefinitionError, match="after a sink"):
        sink.map(Upper)
    with pytest.raises(PipelineDefinitionError, match="already has a source"):
        env.from_batch(DOCS)


def test_source_records_are_not_shipped_with_every_task() -> None:
    import pickle

    from sage_prefect.kernel.plan import SourceSpec

    spec = SourceSpec(kind="batch", data=[{"x": "y" * 1000}] * 1000, name="big")
    assert len(pickle.dumps(spec)) < 1000
    assert spec.data is not None  # the driver keeps them
