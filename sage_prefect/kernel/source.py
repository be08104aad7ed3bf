"""Cutting a source into partitions (Arrow tables of at most ``batch_size`` rows), lazily.

Each partition gets a key derived from its content, so a retried or re-run partition
has the same key and idempotent sinks replace instead of duplicating its rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa

from sage_prefect.common.errors import EmptySourceError, OperatorError, PipelineDefinitionError, SageError
from sage_prefect.common.functions import SourceFunction
from sage_prefect.common.records import check_record, records_to_table
from sage_prefect.kernel.plan import SourceSpec


def content_key(table: pa.Table, index: int) -> str:
    """``p<index>-<digest>``: the partition's position and a digest of its Arrow content."""
    digest = hashlib.blake2b(digest_size=8)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    digest.update(memoryview(sink.getvalue()))
    return f"p{index}-{digest.hexdigest()}"


def iter_partitions(source: SourceSpec, batch_size: int) -> Iterator[pa.Table]:
    """Yield the source's partitions; raise `EmptySourceError` if it yields no rows at all."""
    produced = 0
    for table in _tables(source, batch_size):
        if table.num_rows == 0:
            continue
        produced += table.num_rows
        yield table
    if produced == 0 and not source.allow_empty:
        raise EmptySourceError(
            f"source {source.name!r} produced no records; pass allow_empty=True if an empty run is expected",
            source=source.name,
        )


def _tables(source: SourceSpec, batch_size: int) -> Iterator[pa.Table]:
    data = source.data
    where = f"source {source.name!r}"
    if source.function is not None:
        yield from _from_function(source, batch_size)
        return
    if isinstance(data, pa.Table | pa.RecordBatch):
        table = data if isinstance(data, pa.Table) else pa.Table.from_batches([data])
        for offset in range(0, table.num_rows, batch_size):
            yield table.slice(offset, batch_size)
        return
    if _is_dataframe(data):
        try:
            table = pa.Table.from_pandas(data, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise PipelineDefinitionError(
                f"{where}: the DataFrame cannot be carried as Arrow: {exc}"
            ) from None
        yield from _tables(SourceSpec(kind=source.kind, data=table, name=source.name), batch_size)
        return
    if isinstance(data, dict | str | bytes) or not isinstance(data, Iterable):
        raise PipelineDefinitionError(
            f"{where}: expected a list/iterable of dict records, a pyarrow Table, a pandas DataFrame "
            f"or a SourceFunction/BatchFunction class, got {type(data).__name__}"
        )
    buffer: list[dict[str, Any]] = []
    start = 0
    for i, record in enumerate(data):
        buffer.append(check_record(record, where, i))
        if len(buffer) >= batch_size:
            yield records_to_table(buffer, f"{where}, records {start}-{i}")
            buffer, start = [], i + 1
    if buffer:
        yield records_to_table(buffer, f"{where}, records {start}-{start + len(buffer) - 1}")


def _from_function(source: SourceSpec, batch_size: int) -> Iterator[pa.Table]:
    cls = source.function
    assert cls is not None
    where = f"source {source.name!r}"
    try:
        fn: SourceFunction = cls(source.config) if source.config is not None else cls()  # type: ignore[assignment]
        fn.setup()
    except SageError:
        raise
    except Exception as exc:
        raise OperatorError(
            f"{where}: setup failed: {type(exc).__name__}: {exc}", operator=source.name
        ) from exc
    buffer: list[dict[str, Any]] = []
    calls = 0
    while True:
        try:
            item = fn.execute()
        except Exception as exc:
            raise OperatorError(
                f"{where}: execute() call {calls} failed: {type(exc).__name__}: {exc}", operator=source.name
            ) from exc
        if item is None:
            break
        if isinstance(item, pa.Table | pa.RecordBatch):
            if buffer:
                yield records_to_table(buffer, where)
                buffer = []
            yield from _tables(SourceSpec(kind="batch", data=item, name=source.name), batch_size)
        elif isinstance(item, list):
            buffer.extend(check_record(r, f"{where}, execute() call {calls}", j) for j, r in enumerate(item))
        else:
            buffer.append(check_record(item, where, calls))
        calls += 1
        while len(buffer) >= batch_size:
            yield records_to_table(buffer[:batch_size], where)
            buffer = buffer[batch_size:]
    if buffer:
        yield records_to_table(buffer, where)


def _is_dataframe(data: Any) -> bool:
    module = type(data).__module__
    return module.startswith("pandas") and type(data).__name__ == "DataFrame"
