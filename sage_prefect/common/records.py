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
