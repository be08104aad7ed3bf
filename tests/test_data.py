"""Tests of sage_prefect.data: stage handles, the Arrow result serializer, built-in sinks."""

from __future__ import annotations

import base64
import datetime as dt
import json
import multiprocessing
import pickle
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sage_prefect.common.errors import ConfigError, SageError
from sage_prefect.data import (
    PARTITION_COLUMN,
    ROW_COLUMN,
    ArrowSerializer,
    CollectSink,
    JSONLSink,
    LanceSink,
    ParquetSink,
    PartitionSink,
    PrintSink,
    SinkError,
    StageDataMissingError,
    StageHandle,
    drop_stage_data,
    load,
    maybe_spill,
    partition_file_name,
    resolve,
    spill,
)

pytestmark = pytest.mark.timeout(180)


def rows(n: int, start: int = 0, tag: str = "") -> pa.Table:
    return pa.table(
        {"id": list(range(start, start + n)), "text": [f"{tag}{i}" for i in range(start, start + n)]}
    )


def sorted_ids(table: pa.Table) -> list[int]:
    return sorted(table.column("id").to_pylist())


# --------------------------------------------------------------------------- handles


def test_spill_load_round_trip(tmp_path: Path) -> None:
    table = pa.table(
        {
            "id": pa.array([1, 2, 3], pa.int32()),
            "text": ["a", None, "c"],
            "vec": pa.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], pa.list_(pa.float32(), 2)),
            "meta": pa.array([{"k": 1}, {"k": 2}, None]),
            "ts": pa.array([dt.datetime(2024, 1, 1)] * 3, pa.timestamp("us", tz="UTC")),
        }
    )
    handle = spill(table, tmp_path / "stages", "stage 1/part:0")
    assert handle.table != "stage 1/part:0"  # sanitised to a valid Lance name
    assert (handle.num_rows, handle.nbytes) == (3, table.nbytes)
    assert Path(handle.uri).is_absolute()
    assert load(handle).equals(table)
    assert resolve(handle).equals(table)


def test_spill_names_do_not_collide(tmp_path: Path) -> None:
    a = spill(rows(1, 0), tmp_path, "a/b")
    b = spill(rows(1, 10), tmp_path, "a_b")
    assert a.table != b.table
    assert sorted_ids(load(a)) == [0] and sorted_ids(load(b)) == [10]


def test_handle_pins_version(tmp_path: Path) -> None:
    h1 = spill(rows(3, tag="v1-"), tmp_path, "stage")
    h2 = spill(rows(2, 100, tag="v2-"), tmp_path, "stage")  # same name: overwrite
    assert h2.table == h1.table and h2.version > h1.version
    assert sorted_ids(load(h1)) == [0, 1, 2]
    assert sorted_ids(load(h2)) == [100, 101]


def test_handle_is_hashable_and_json_able() -> None:
    h = StageHandle(uri="/x", table="t", version=3, num_rows=1, nbytes=8)
    assert {h: 1}[h] == 1
    assert StageHandle.from_dict(json.loads(json.dumps(h.to_dict()))) == h
    with pytest.raises(ConfigError):
        StageHandle.from_dict({"uri": "/x"})


def test_maybe_spill_threshold(tmp_path: Path) -> None:
    table = rows(1000)
    assert maybe_spill(table, table.nbytes, tmp_path, "s") is table  # not larger than threshold
    assert maybe_spill(table, 0, tmp_path, "s") is table  # 0 disables spilling
    assert maybe_spill(table, -1, tmp_path, "s") is table
    spilled = maybe_spill(table, table.nbytes - 1, tmp_path, "s")
    assert isinstance(spilled, StageHandle)
    assert resolve(spilled).equals(table)


def test_empty_tables_never_spill(tmp_path: Path) -> None:
    no_rows = rows(0)
    no_columns = pa.table({})
    assert maybe_spill(no_rows, 1, tmp_path, "s") is no_rows
    assert maybe_spill(no_columns, 1, tmp_path, "s") is no_columns
    assert not tmp_path.joinpath("s.lance").exists()
    with pytest.raises(ConfigError):
        spill(no_columns, tmp_path, "s")


def test_resolve_types() -> None:
    table = rows(2)
    assert resolve(table) is table
    assert resolve(table.to_batches()[0]).equals(table)
    with pytest.raises(TypeError, match="dict"):
        bad: Any = {"id": 1}
        resolve(bad)


def test_drop_stage_data(tmp_path: Path) -> None:
    stages = tmp_path / "run-1"
    handle = spill(rows(5), stages, "a")
    spill(rows(5), stages, "b")
    drop_stage_data(stages)
    assert not stages.exists()
    drop_stage_data(stages)  # already gone: no error
    with pytest.raises(StageDataMissingError) as info:
        load(handle)
    assert info.value.where["table"] == handle.table


def test_drop_stage_data_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    spill(rows(1), tmp_path, "a")
    with pytest.raises(ConfigError, match="notes.txt"):
        drop_stage_data(tmp_path)
    assert (tmp_path / "notes.txt").exists()


def test_load_missing_version(tmp_path: Path) -> None:
    handle = spill(rows(1), tmp_path, "a")
    gone = StageHandle(handle.uri, handle.table, handle.version + 5, 1, 1)
    with pytest.raises(StageDataMissingError):
        load(gone)


# --------------------------------------------------------------------------- serializer


SERIALIZERS = [ArrowSerializer(), ArrowSerializer(binary=True), ArrowSerializer(compression="zstd")]


@pytest.mark.parametrize("serializer", SERIALIZERS, ids=["base64", "binary", "zstd"])
def test_serializer_round_trips_arrow(serializer: ArrowSerializer) -> None:
    table = pa.table(
        {
            "id": pa.array([1, 2], pa.int64()),
            "text": pa.array(["x", None], pa.large_string()),
            "vec": pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32(), 2)),
            "cat": pa.array(["a", "b"]).dictionary_encode(),
        }
    ).replace_schema_metadata({"stage": "map-1"})
    for obj in (table, table.slice(1), table.schema.empty_table(), pa.table({})):
        back = serializer.loads(serializer.dumps(obj))
        assert isinstance(back, pa.Table) and back.equals(obj, check_metadata=True)
    batch = table.to_batches()[0]
    back_batch = serializer.loads(serializer.dumps(batch))
    assert isinstance(back_batch, pa.RecordBatch) and back_batch.equals(batch)
    empty_batch = pa.RecordBatch.from_pylist([], schema=table.schema)
    assert serializer.loads(serializer.dumps(empty_batch)).equals(empty_batch)


def test_serializer_format_is_tagged_arrow_ipc() -> None:
    table = rows(3)
    blob = ArrowSerializer().dumps(table)
    assert blob.startswith(b"arrow:")
    blob.decode("ascii")  # text-safe: Prefect embeds it in a JSON result record
    ipc = base64.b64decode(blob[len(b"arrow:") :])
    assert ipc[:4] == b"\xff\xff\xff\xff"  # Arrow IPC stream continuation marker
    assert pa.ipc.open_stream(ipc).read_all().equals(table)
    raw = ArrowSerializer(binary=True).dumps(table)
    assert raw.startswith(b"arrow-raw:\xff\xff\xff\xff")
    assert ArrowSerializer().loads(raw).equals(table)  # any instance reads either encoding


def test_serializer_json_values_and_handles() -> None:
    s = ArrowSerializer()
    handle = StageHandle(uri="/stages", table="t", version=2, num_rows=10, nbytes=80)
    assert s.dumps(handle).startswith(b"handle:")
    assert s.loads(s.dumps(handle)) == handle
    values: list[Any] = [
        None,
        True,
        0,
        -3,
        1.5,
        "text é",
        [],
        {},
        {"a": [1, 2.5, None, "x", {"b": False}], "handles": [handle, handle]},
    ]
    for value in values:
        blob = s.dumps(value)
        assert blob.startswith(b"json:")
        assert s.loads(blob) == value


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (object(), "builtins.object"),
        ((1, 2), "builtins.tuple"),
        ({1: "a"}, "dict key 1"),
        ({"a": [b"bytes"]}, "builtins.bytes"),
        ({"x": {1, 2}}, "builtins.set"),
    ],
)
def test_serializer_rejects_other_types(value: Any, name: str) -> None:
    with pytest.raises(TypeError, match=name) as info:
        ArrowSerializer().dumps(value)
    assert "pickle" in str(info.value)


def test_serializer_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="tag"):
        ArrowSerializer().loads(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="unknown"):
        ArrowSerializer().loads(b"nope:123")


def test_serializer_registered_with_prefect() -> None:
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import Serializer

    s = Serializer(type="arrow")
    assert isinstance(s, ArrowSerializer)
    assert Serializer(type="arrow", binary=True) == ArrowSerializer(binary=True)
    table = rows(4)
    record = ResultRecord(metadata=ResultRecordMetadata(serializer=ArrowSerializer()), result=table)
    back: ResultRecord[Any] = ResultRecord.deserialize(record.serialize())
    assert isinstance(back.serializer, ArrowSerializer)
    assert back.result.equals(table)
    # separate metadata + raw result, as with a cache policy's key_storage
    binary = ResultRecord(
        metadata=ResultRecordMetadata(serializer=ArrowSerializer(binary=True)), result=table
    )
    again: ResultRecord[Any] = ResultRecord.deserialize_from_result_and_metadata(
        binary.serialize_result(), binary.serialize_metadata()
    )
    assert again.result.equals(table)


@pytest.fixture(scope="module")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def saved_storage(path: Path) -> Any:
    """A LocalFileSystem block saved on the test server (Prefect requires saved result storage)."""
    from prefect.filesystems import LocalFileSystem

    storage = LocalFileSystem(basepath=str(path))
    storage.save(f"sage-data-{uuid.uuid4().hex[:12]}", overwrite=True)
    return storage


def _result_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_prefect_task_persists_arrow_ipc(prefect_harness: None, tmp_path: Path) -> None:
    from prefect import flow, task
    from prefect._internal.result_records import ResultRecord
    from prefect.cache_policies import INPUTS, TASK_SOURCE

    storage = saved_storage(tmp_path / "results")
    calls: list[int] = []

    @task(
        persist_result=True,
        result_serializer=ArrowSerializer(),
        result_storage=storage,
        cache_policy=INPUTS + TASK_SOURCE,
    )
    def make_table(n: int) -> pa.Table:
        calls.append(n)
        return rows(n, tag="row-")

    @flow
    def pipeline(n: int) -> pa.Table:
        return make_table(n)

    expected = rows(5, tag="row-")
    first: Any = pipeline(5)
    assert first.equals(expected)
    files = _result_files(tmp_path / "results")
    assert len(files) == 1
    content = files[0].read_bytes()
    assert not content.startswith(b"\x80")  # not a pickle
    record_json = json.loads(content)
    assert record_json["metadata"]["serializer"]["type"] == "arrow"
    result_text: str = record_json["result"]
    assert result_text.startswith("arrow:")
    ipc = base64.b64decode(result_text[len("arrow:") :])
    assert ipc[:4] == b"\xff\xff\xff\xff"
    assert pa.ipc.open_stream(ipc).read_all().equals(expected)
    assert ResultRecord.deserialize(content).result.equals(expected)

    # A second run hits the cache: Prefect itself loads the result through ArrowSerializer.
    second: Any = pipeline(5)
    assert second.equals(expected)
    assert calls == [5]


def test_prefect_task_binary_results_with_separate_metadata(prefect_harness: None, tmp_path: Path) -> None:
    from prefect import flow, task
    from prefect.cache_policies import INPUTS, TASK_SOURCE

    @task(
        persist_result=True,
        result_serializer=ArrowSerializer(binary=True),
        result_storage=saved_storage(tmp_path / "results"),
        cache_policy=(INPUTS + TASK_SOURCE).configure(key_storage=str(tmp_path / "meta")),
    )
    def make_table(n: int) -> pa.Table:
        return rows(n)

    @flow
    def pipeline(n: int) -> pa.Table:
        return make_table(n)

    first: Any = pipeline(3)
    assert first.equals(rows(3))
    (result_file,) = _result_files(tmp_path / "results")
    content = result_file.read_bytes()
    assert content.startswith(b"arrow-raw:\xff\xff\xff\xff")
    assert ArrowSerializer().loads(content).equals(rows(3))
    second: Any = pipeline(3)  # cached: loaded from the raw file
    assert second.equals(rows(3))


def test_prefect_task_handle_and_bad_type(
    prefect_harness: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from prefect import flow, task

    storage = tmp_path / "results"  # a Path works unsaved (a LocalFileSystem block must be saved)
    handle = StageHandle(uri=str(tmp_path), table="t", version=1, num_rows=1, nbytes=1)

    # NO_CACHE computes no key, and a task without a key persists nothing: name the key instead.
    @task(
        persist_result=True,
        result_serializer=ArrowSerializer(),
        result_storage=storage,
        result_storage_key="handle-{task_run.id}",
    )
    def give_handle() -> StageHandle:
        return handle

    @task(
        persist_result=True,
        result_serializer="arrow",
        result_storage=storage,
        result_storage_key="t-{task_run.id}",
    )
    def give_tuple() -> tuple[int, int]:
        return (1, 2)

    @flow
    def good() -> StageHandle:
        return give_handle()

    @flow
    def bad() -> tuple[int, int]:
        return give_tuple()

    assert good() == handle
    (file,) = _result_files(tmp_path / "results")
    assert json.loads(file.read_bytes())["result"].startswith("handle:")
    # Prefect catches the serializer's TypeError at commit, logs it and keeps the in-memory
    # result: the run goes on, but nothing (in particular no pickle) is written.
    assert bad() == (1, 2)
    assert len(_result_files(tmp_path / "results")) == 1
    assert "Failed to serialize object of type 'tuple' with serializer 'arrow'" in caplog.text


# --------------------------------------------------------------------------- sinks: Lance


def lance_rows(uri: Path, table: str) -> pa.Table:
    import lancedb

    return lancedb.connect(str(uri)).open_table(table).to_arrow()


def lance_version(uri: Path, table: str) -> int:
    import lancedb

    return int(lancedb.connect(str(uri)).open_table(table).version)


def test_lance_sink_idempotent_per_partition(tmp_path: Path) -> None:
    sink = LanceSink({"uri": str(tmp_path), "table": "out"})
    assert sink.write_partition(rows(3, 0), "p0") == 3
    assert sink.write_partition(rows(2, 10), "p1") == 2
    assert sorted_ids(lance_rows(tmp_path, "out")) == [0, 1, 2, 10, 11]

    assert sink.write_partition(rows(2, 10), "p1") == 2  # retry, same rows
    got = lance_rows(tmp_path, "out")
    assert sorted_ids(got) == [0, 1, 2, 10, 11]
    assert set(got.column_names) == {"id", "text", PARTITION_COLUMN, ROW_COLUMN}

    assert sink.write_partition(rows(1, 20, tag="new-"), "p1") == 1  # re-run with FEWER rows
    got = lance_rows(tmp_path, "out")
    assert sorted_ids(got) == [0, 1, 2, 20]
    assert sorted(
        zip(got.column(PARTITION_COLUMN).to_pylist(), got.column("text").to_pylist(), strict=True)
    ) == [
        ("p0", "0"),
        ("p0", "1"),
        ("p0", "2"),
        ("p1", "new-20"),
    ]

    assert sink.write_partition(rows(0), "p0") == 0  # a partition that became empty
    assert sorted_ids(lance_rows(tmp_path, "out")) == [20]


def test_lance_sink_single_commit_per_write(tmp_path: Path) -> None:
    sink = LanceSink({"uri": str(tmp_path), "table": "out"})
    sink.write_partition(rows(3), "p0")
    v = lance_version(tmp_path, "out")
    sink.write_partition(rows(3), "p1")
    sink.write_partition(rows(1), "p0")
    assert lance_version(tmp_path, "out") == v + 2


def test_lance_sink_odd_partition_keys(tmp_path: Path) -> None:
    sink = LanceSink({"uri": str(tmp_path), "table": "out"})
    for i, key in enumerate(["it's", "a:1", "a", "x' OR '1'='1", "ü/ß"]):
        sink.write_partition(rows(2, 10 * i), key)
    sink.write_partition(rows(1, 100), "it's")
    sink.write_partition(rows(1, 200), "a")
    got = lance_rows(tmp_path, "out")
    assert sorted_ids(got) == [10, 11, 30, 31, 40, 41, 100, 200]


def test_lance_sink_casts_compatible_partitions(tmp_path: Path) -> None:
    sink = LanceSink({"uri": str(tmp_path), "table": "out"})
    sink.write_partition(pa.table({"id": pa.array([1], pa.int64()), "text": ["a"]}), "p0")
    sink.write_partition(pa.table({"text": ["b"], "id": pa.array([2], pa.int32())}), "p1")  # reordered, int32
    sink.write_partition(pa.table({"id": pa.array([3], pa.int64())}), "p2")  # missing nullable column
    got = lance_rows(tmp_path, "out").sort_by("id")
    assert got.column("id").to_pylist() == [1, 2, 3]
    assert got.column("text").to_pylist() == ["a", "b", None]
    assert got.schema.field("id").type == pa.int64()


def test_lance_sink_failed_write_keeps_rows(tmp_path: Path) -> None:
    sink = LanceSink({"uri": str(tmp_path), "table": "out"})
    sink.write_partition(rows(3, 0), "p0")
    sink.write_partition(rows(2, 10), "p1")
    version = lance_version(tmp_path, "out")
    bad = pa.table({"id": ["not-a-number"], "text": ["x"]})
    with pytest.raises(ConfigError) as info:
        sink.write_partition(bad, "p1")
    assert info.value.where["field"] == "id"
    assert "LanceSink" in str(info.value) and "'out'" in str(info.value) and "'id'" in str(info.value)
    with pytest.raises(ConfigError, match="extra") as info:
        sink.write_partition(rows(1).append_column("extra", pa.array([1])), "p0")
    assert info.value.where["field"] == "extra"
    assert lance_version(tmp_path, "out") == version
    assert sorted_ids(lance_rows(tmp_path, "out")) == [0, 1, 2, 10, 11]


def _write_many(
    uri: str, keys: list[str], barrier: threading.Barrier | None, errors: list[BaseException]
) -> None:
    try:
        sink = LanceSink({"uri": uri, "table": "shared"})
        if barrier is not None:
            barrier.wait()
        for key in keys:
            index = int(key[1:])
            sink.write_partition(rows(25, 1000 * index), key)
    except BaseException as exc:  # noqa: B036 - reported to the test thread
        errors.append(exc)


def test_lance_sink_concurrent_first_writes_threads(tmp_path: Path) -> None:
    for trial in range(6):
        uri = str(tmp_path / f"t{trial}")
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []
        keys = [f"p{i}" for i in range(6)]
        threads = [
            threading.Thread(target=_write_many, args=(uri, keys[j::2], barrier, errors)) for j in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        got = lance_rows(Path(uri), "shared")
        expected = sorted(1000 * i + r for i in range(6) for r in range(25))
        assert sorted_ids(got) == expected


def test_lance_sink_same_partition_written_twice_at_once(tmp_path: Path) -> None:
    """A duplicated task (two attempts at one partition at once) must not duplicate rows."""
    uri = str(tmp_path)
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def attempt(n: int) -> None:
        try:
            sink = LanceSink({"uri": uri, "table": "dup"})
            barrier.wait()
            for _ in range(4):
                for key in ("p0", "p1"):
                    sink.write_partition(rows(n, 1000 * int(key[1:])), key)
        except BaseException as exc:  # noqa: B036 - reported to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=attempt, args=(n,)) for n in (5, 3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    got = lance_rows(tmp_path, "dup")
    for key in ("p0", "p1"):
        ids = [
            i
            for i, p in zip(got["id"].to_pylist(), got[PARTITION_COLUMN].to_pylist(), strict=True)
            if p == key
        ]
        base = 1000 * int(key[1:])
        assert sorted(ids) == [base + i for i in range(len(ids))]  # one attempt's rows, no duplicates
        assert len(ids) in (3, 4, 5)


def _process_writer(uri: str, keys: list[str]) -> None:
    errors: list[BaseException] = []
    _write_many(uri, keys, None, errors)
    if errors:
        raise errors[0]


def test_lance_sink_concurrent_first_writes_processes(tmp_path: Path) -> None:
    uri = str(tmp_path / "procs")
    ctx = multiprocessing.get_context("spawn")
    keys = [f"p{i}" for i in range(6)]
    procs = [ctx.Process(target=_process_writer, args=(uri, keys[j::2])) for j in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    got = lance_rows(Path(uri), "shared")
    assert sorted_ids(got) == sorted(1000 * i + r for i in range(6) for r in range(25))


def test_lance_sink_overwrite_mode_and_finish(tmp_path: Path) -> None:
    first = LanceSink({"uri": str(tmp_path), "table": "out"})
    first.write_partition(rows(3), "p0")
    again = LanceSink({"uri": str(tmp_path), "table": "out", "mode": "append"})
    again.prepare()
    again.write_partition(rows(1, 50), "p9")
    assert sorted_ids(lance_rows(tmp_path, "out")) == [0, 1, 2, 50]
    fresh = LanceSink({"uri": str(tmp_path), "table": "out", "mode": "overwrite", "optimize": True})
    fresh.prepare()
    fresh.write_partition(pa.table({"other": ["x"]}), "p0")  # new schema is fine after overwrite
    fresh.finish()
    assert lance_rows(tmp_path, "out").column("other").to_pylist() == ["x"]


def test_lance_sink_empty_first_partition(tmp_path: Path) -> None:
    sink = LanceSink({"uri": str(tmp_path), "table": "out"})
    assert sink.write_partition(pa.table({}), "p0") == 0
    assert sink.write_partition(rows(0), "p1") == 0  # null-typed columns: must not fix the schema
    assert not (tmp_path / "out.lance").exists()
    sink.write_partition(rows(2), "p2")
    sink.write_partition(rows(0), "p1")
    assert sorted_ids(lance_rows(tmp_path, "out")) == [0, 1]


def test_lance_sink_null_typed_first_partition_is_explained(tmp_path: Path) -> None:
    sink = LanceSink({"uri": str(tmp_path), "table": "out"})
    sink.write_partition(pa.table({"id": [1], "text": [None]}), "p0")
    with pytest.raises(ConfigError, match="only nulls") as info:
        sink.write_partition(rows(1), "p1")
    assert info.value.where["field"] == "text"


# --------------------------------------------------------------------------- sinks: files


def read_parquet_dir(path: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(path.glob("part-*.parquet"))])


def read_jsonl_dir(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in sorted(path.glob("part-*.jsonl")):
        out.extend(json.loads(line) for line in p.read_text().splitlines())
    return out


def no_temp_files(path: Path) -> bool:
    return not [p for p in path.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_file_sinks_idempotent_per_partition(tmp_path: Path, kind: str) -> None:
    sink: ParquetSink | JSONLSink = (
        ParquetSink({"path": tmp_path}) if kind == "parquet" else JSONLSink({"path": str(tmp_path)})
    )

    def ids() -> list[int]:
        if kind == "parquet":
            return sorted_ids(read_parquet_dir(tmp_path))
        return sorted(r["id"] for r in read_jsonl_dir(tmp_path))

    assert sink.write_partition(rows(3, 0), "p0") == 3
    assert sink.write_partition(rows(2, 10), "p1") == 2
    assert ids() == [0, 1, 2, 10, 11]
    sink.write_partition(rows(2, 10), "p1")
    assert ids() == [0, 1, 2, 10, 11]
    sink.write_partition(rows(1, 20), "p1")
    assert ids() == [0, 1, 2, 20]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"part-p0.{kind}", f"part-p1.{kind}"]
    assert no_temp_files(tmp_path)
    sink.finish()


@pytest.mark.parametrize("sink_cls", [ParquetSink, JSONLSink])
def test_file_sinks_failed_write_keeps_previous_file(
    tmp_path: Path, sink_cls: type[ParquetSink] | type[JSONLSink], monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = sink_cls({"path": str(tmp_path)})
    sink.write_partition(rows(3), "p0")
    target = tmp_path / partition_file_name("p0", sink_cls.suffix)
    before = target.read_bytes()

    def broken(self: Any, table: pa.Table, handle: Any) -> None:
        handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(sink_cls, "_write", broken)
    with pytest.raises(SinkError, match="disk full") as info:
        sink.write_partition(rows(5), "p0")
    assert info.value.where["partition"] == "p0"
    assert target.read_bytes() == before
    assert no_temp_files(tmp_path)


def test_file_sinks_sanitise_partition_keys(tmp_path: Path) -> None:
    sink = ParquetSink({"path": str(tmp_path / "out")})
    for i, key in enumerate(["a/b", "a_b", "../escape", "", "ü ß"]):
        sink.write_partition(rows(1, i), key)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(files) == 5
    assert all(f.startswith("part-") and "/" not in f for f in files)
    assert "part-a_b.parquet" in files
    assert not (tmp_path / "escape.parquet").exists()
    assert sorted_ids(read_parquet_dir(tmp_path / "out")) == [0, 1, 2, 3, 4]


def test_jsonl_non_json_values(tmp_path: Path) -> None:
    table = pa.table(
        {
            "when": pa.array([dt.datetime(2024, 5, 1, 12, 0)], pa.timestamp("us")),
            "raw": [b"\x00\x01"],
            "nested": [{"a": [1, 2]}],
            "text": ["é"],
        }
    )
    JSONLSink({"path": str(tmp_path)}).write_partition(table, "p0")
    (record,) = read_jsonl_dir(tmp_path)
    assert record["when"] == "2024-05-01 12:00:00"
    assert record["nested"] == {"a": [1, 2]}
    assert record["text"] == "é"
    assert isinstance(record["raw"], str)


def test_file_sinks_overwrite_mode(tmp_path: Path) -> None:
    ParquetSink({"path": str(tmp_path)}).write_partition(rows(2), "old")
    (tmp_path / "keep.txt").write_text("not ours")
    sink = ParquetSink({"path": str(tmp_path), "mode": "overwrite"})
    sink.prepare()
    sink.write_partition(rows(1, 7), "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "part-new.parquet"]


# --------------------------------------------------------------------------- sinks: collect, print, config


def test_collect_sink() -> None:
    sink = CollectSink()
    assert sink.collects and not LanceSink.collects
    assert sink.write_partition(rows(3), "p0") == 3
    tables = {"p0": rows(2, 0), "p1": rows(1, 5)}
    tables["p1"] = rows(1, 9)  # a retried partition replaces its entry
    assert sorted_ids(CollectSink.collect(tables)) == [0, 1, 9]
    assert CollectSink.collect({}).num_rows == 0


def test_print_sink(capsys: pytest.CaptureFixture[str]) -> None:
    assert PrintSink({"prefix": "out> "}).write_partition(rows(2), "p0") == 2
    PrintSink().execute({"id": 9})
    assert capsys.readouterr().out.splitlines() == [
        "out> {'id': 0, 'text': '0'}",
        "out> {'id': 1, 'text': '1'}",
        "{'id': 9}",
    ]


def test_builtin_sinks_have_no_per_record_execute(tmp_path: Path) -> None:
    for sink in (LanceSink({"uri": str(tmp_path), "table": "t"}), ParquetSink({"path": str(tmp_path)})):
        with pytest.raises(NotImplementedError, match="one whole partition at a time"):
            sink.execute({"id": 1})


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda p: LanceSink({"uri": p, "table": "t", "bogus": 1}), "bogus"),
        (lambda p: LanceSink({"uri": p}), "table"),
        (lambda p: LanceSink({"uri": 3, "table": "t"}), "uri"),
        (lambda p: LanceSink({"uri": p, "table": "t", "mode": "upsert"}), "mode"),
        (lambda p: LanceSink({"uri": p, "table": "bad name"}), "table"),
        (lambda p: LanceSink({"uri": p, "table": "t", "optimize": "yes"}), "optimize"),
        (lambda p: ParquetSink({"path": p, "compression": "zstd"}), "compression"),
        (lambda p: JSONLSink({"path": ["x"]}), "path"),
        (lambda p: JSONLSink({"path": "s3://bucket/x"}), "path"),
        (lambda p: PrintSink({"prefix": 1}), "prefix"),
        (lambda p: CollectSink({"anything": 1}), "anything"),
    ],
)
def test_sink_config_validation(tmp_path: Path, factory: Any, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        factory(str(tmp_path))
    assert info.value.where["field"] == field
    assert field in str(info.value)
    assert "Sink" in str(info.value)
    assert isinstance(info.value, SageError)


def test_sinks_pickle_and_accept_kwargs(tmp_path: Path) -> None:
    sink = LanceSink(uri=tmp_path, table="t")
    assert isinstance(sink, PartitionSink)
    assert sink.config == {"uri": str(tmp_path.resolve()), "table": "t", "mode": "append", "optimize": False}
    clone = pickle.loads(pickle.dumps(sink))
    assert clone.write_partition(rows(2), "p0") == 2
    assert pickle.loads(pickle.dumps(JSONLSink(path=str(tmp_path)))).config["path"] == str(tmp_path.resolve())


def test_replace_table_swaps_in_a_staging_table(tmp_path: Path) -> None:
    import lancedb

    from sage_prefect.data import replace_table

    db = lancedb.connect(str(tmp_path))
    db.create_table("answers", pa.table({"x": [0]}))
    db.create_table("answers.staging", pa.table({"x": [1, 2]}))
    assert replace_table(str(tmp_path), "answers.staging", "answers") == 2
    assert db.open_table("answers").to_arrow()["x"].to_pylist() == [1, 2]
    assert "answers.staging" not in db.table_names()
