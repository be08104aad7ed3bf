"""Arrow record helpers: dict records <-> ``pyarrow.Table`` with errors that say where.

>>> t = records_to_table([{"id": 1, "text": "a"}], where="source")
>>> t.num_rows, t.column_names
(1, ['id', 'text'])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from sage_prefect.common.errors import RecordError


def check_record(record: Any, where: str, index: int) -> dict[str, Any]:
    """Return ``record`` if it is a dict, else raise `RecordError` naming ``where`` and ``index``."""
    if not isinstance(record, dict):
        raise RecordError(
            f"{where}: record {index} is {type(record).__name__} ({_short(record)}), expected a dict",
            record_index=index,
        )
    return record


def records_to_table(records: Sequence[Any], where: str, schema: pa.Schema | None = None) -> pa.Table:
    """Convert dict records to a table; every record must be a dict with Arrow-compatible values."""
    for i, record in enumerate(records):
        check_record(record, where, i)
    if not records:
        return schema.empty_table() if schema is not None else pa.table({})
    try:
        return pa.Table.from_pylist(list(records), schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        field = _bad_field(records)
        detail = f" in field {field!r}" if field else ""
        raise RecordError(
            f"{where}: records cannot be carried as Arrow{detail}: {exc}", field=field
        ) from None


def table_to_records(table: pa.Table) -> list[dict[str, Any]]:
    return table.to_pylist()


def concat(tables: Sequence[pa.Table]) -> pa.Table:
    """Concatenate tables whose schemas may differ by missing columns or null-typed columns."""
    tables = [t for t in tables if t.num_columns]
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="permissive")


def _bad_field(records: Sequence[dict[str, Any]]) -> str | None:
    columns: dict[str, list[Any]] = {}
    for record in records:
        for key, value in record.items():
            columns.setdefault(key, []).append(value)
    for key, values in columns.items():
        try:
            pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            return key
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def aligned(table: pa.Table, alignment: int = 8) -> pa.Table:
    """``table`` with every buffer aligned, copying only when some buffer is not.

    Tables unpickled from Dask's out-of-band frames may sit at any address; Arrow's Rust
    readers (LanceDB) abort on unaligned buffers instead of copying them.
    """
    for column in table.columns:
        for chunk in column.chunks:
            if any(buf is not None and buf.address % alignment for buf in chunk.buffers()):
                return _copy(table)
    return table


def _copy(table: pa.Table) -> pa.Table:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return pa.ipc.open_stream(sink.getvalue()).read_all()


def apply_function(kind: str, fn: Any, table: pa.Table, where: str) -> pa.Table:
    """Apply a ``map``/``filter``/``flatmap`` function to a whole partition.

    Prefers a vectorised ``execute_batch(table) -> table`` and falls back to ``execute``
    per record. Used by the kernel for every stage and by operators run as plain tasks.

    >>> class Double:
    ...     def execute(self, r):
    ...         return {"x": r["x"] * 2}
    >>> apply_function("map", Double(), pa.table({"x": [1, 2]}), "doc").to_pydict()
    {'x': [2, 4]}
    """
    batch = getattr(fn, "execute_batch", None)
    if callable(batch) and kind != "sink":
        out = batch(table)
        if isinstance(out, pa.RecordBatch):
            out = pa.Table.from_batches([out])
        if not isinstance(out, pa.Table):
            raise RecordError(
                f"{where}: execute_batch returned {type(out).__name__}, expected a pyarrow.Table"
            )
        return out
    records = table.to_pylist()
    if kind == "map":
        return records_to_table([fn.execute(r) for r in records], where)
    if kind == "filter":
        mask = [bool(fn.execute(r)) for r in records]
        return table.filter(pa.array(mask, type=pa.bool_())) if records else table
    if kind == "flatmap":
        out_records: list[Any] = []
        for i, r in enumerate(records):
            produced = fn.execute(r)
            if produced is None:
                continue
            if isinstance(produced, dict):
                raise RecordError(f"{where}: record {i}: flatmap returned a dict; return a list of dicts")
            out_records.extend(produced)
        return records_to_table(out_records, where)
    raise RecordError(f"{where}: cannot apply an operator of kind {kind!r} to a partition")


def with_columns(table: pa.Table, columns: dict[str, pa.Array | pa.ChunkedArray]) -> pa.Table:
    """``table`` with each of ``columns`` set: replaced in place where the name exists, else appended.

    >>> t = with_columns(pa.table({"a": [1], "b": [2]}), {"a": pa.array(["x"]), "c": pa.array([3.0])})
    >>> t.column_names, t.column("a").type
    (['a', 'b', 'c'], DataType(string))
    """
    for name, values in columns.items():
        field = pa.field(name, values.type)
        index = table.schema.get_field_index(name)
        table = table.set_column(index, field, values) if index >= 0 else table.append_column(field, values)
    return table
