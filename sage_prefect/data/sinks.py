"""Built-in sinks: each writes one partition at a time, idempotently.

The kernel calls ``write_partition(table, partition_key)`` once per partition, where
``partition_key`` is stable across retries and re-runs of the same input partition.
The contract of every built-in sink except `PrintSink`:

* writing a ``partition_key`` again **replaces** that partition's rows: never
  duplicates, never loses rows of other partitions, never leaves a half-written file;
* a failed write leaves the previous state of the partition intact.

Driver-side hooks: ``prepare()`` once before the first partition (``mode="overwrite"``
clears the target there), ``finish()`` once after the last.

>>> import pyarrow as pa, tempfile
>>> sink = JSONLSink({"path": tempfile.mkdtemp()})
>>> sink.write_partition(pa.table({"x": [1, 2]}), "p0")
2
>>> sink.write_partition(pa.table({"x": [1]}), "p0")  # a re-run replaces partition p0
1
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

from sage_prefect.common.errors import ConfigError, SageError
from sage_prefect.common.functions import Record, SinkFunction
from sage_prefect.common.records import concat
from sage_prefect.data._names import is_remote, local_path, safe_name

if TYPE_CHECKING:
    from lancedb.db import DBConnection
    from lancedb.table import Table as LanceTable

__all__ = [
    "PARTITION_COLUMN",
    "ROW_COLUMN",
    "CollectSink",
    "JSONLSink",
    "LanceSink",
    "ParquetSink",
    "PartitionSink",
    "PrintSink",
    "SinkError",
    "conform_to_schema",
    "replace_table",
    "lance_lock",
    "partition_file_name",
]

PARTITION_COLUMN = "_sage_partition"
"""Column `LanceSink` adds: the partition key a row was written under."""
ROW_COLUMN = "_sage_row"
"""Column `LanceSink` adds: ``f"{partition_key}:{i}"``, the merge key of a row."""

_LANCE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_STALE_TEMP_SECONDS = 3600.0


class SinkError(SageError, RuntimeError):
    """A built-in sink failed to write a partition (names the sink, its target and the partition).

    >>> str(SinkError("LanceSink(table='t'): partition 'p0': disk full", sink="LanceSink"))
    "LanceSink(table='t'): partition 'p0': disk full"
    """


@dataclass(frozen=True)
class SinkOption:
    types: tuple[type, ...]
    required: bool = False
    default: Any = None
    choices: tuple[str, ...] = ()
    path: bool = False


class PartitionSink(SinkFunction):
    """Base of the built-in sinks: validated config, ``write_partition``, driver-side hooks.

    Subclasses declare their config keys in ``options``; unknown keys, missing required
    keys and wrong types raise `ConfigError` naming the sink class and the key.

    >>> class CountSink(PartitionSink):
    ...     def write_partition(self, table, partition_key):
    ...         return table.num_rows
    >>> CountSink().write_partition(pa.table({"x": [1, 2, 3]}), "p0")
    3
    """

    options: ClassVar[dict[str, SinkOption]] = {}
    collects: ClassVar[bool] = False
    """True when the kernel must return each partition's table to the caller (see `CollectSink`)."""

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.config = _validate(type(self).__name__, self.options, self.config)

    def prepare(self) -> None:
        """Called on the driver once before the first partition is written."""

    def write_partition(self, table: pa.Table, partition_key: str) -> int:
        """Write (or replace) the rows of partition ``partition_key``; return the rows written."""
        raise NotImplementedError(f"{type(self).__name__}.write_partition(table, partition_key)")

    def execute(self, data: Record) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} is a built-in sink written one whole partition at a time by the "
            "kernel (write_partition(table, partition_key)), so that retries replace a partition "
            "instead of duplicating it; it has no per-record execute(). Use it with "
            "DataStream.sink(...), or call write_partition yourself."
        )

    def _describe(self) -> str:
        return type(self).__name__


# --------------------------------------------------------------------------- Lance


class LanceSink(PartitionSink):
    """Write partitions to a LanceDB table, one atomic commit per partition.

    Config: ``uri`` (LanceDB directory or object-store URI), ``table`` (name:
    ``[A-Za-z0-9_.-]``), ``mode`` (``"append"``, the default, keeps rows of other
    partitions and earlier runs; ``"overwrite"`` drops the table in ``prepare()``),
    ``optimize`` (compact the table in ``finish()``; default false).

    Two columns are added: ``_sage_partition`` (the partition key) and ``_sage_row``
    (``"<key>:<i>"``). A write is one ``merge_insert`` on ``_sage_row`` that updates
    matched rows, inserts new ones and deletes the partition's rows that are no longer
    there, so a re-written partition is replaced in a single commit. Later partitions
    are cast to the table's schema; an incompatible one raises `ConfigError` naming the
    field and leaves the table as it was. On local directories the table is created, and
    each partition key written, under ``flock`` locks in ``<uri>/.sage-locks/``: Lance alone
    would let a racing create replace the table and racing writes of one key duplicate rows.

    >>> import tempfile
    >>> sink = LanceSink({"uri": tempfile.mkdtemp(), "table": "answers"})
    >>> sink.write_partition(pa.table({"q": ["a", "b"]}), "p0")
    2
    """

    options: ClassVar[dict[str, SinkOption]] = {
        "uri": SinkOption((str, os.PathLike), required=True, path=True),
        "table": SinkOption((str,), required=True),
        "mode": SinkOption((str,), default="append", choices=("append", "overwrite")),
        "optimize": SinkOption((bool,), default=False),
    }

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        name = self.config["table"]
        if not _LANCE_NAME.match(name):
            raise ConfigError(
                f"LanceSink: table name {name!r} may contain only letters, digits, '_', '-' and '.'",
                field="table",
                operator="LanceSink",
            )
        uri = self.config["uri"]
        if not is_remote(uri):
            self.config["uri"] = str(Path(local_path(uri)).expanduser().resolve())

    @property
    def uri(self) -> str:
        return str(self.config["uri"])

    @property
    def table_name(self) -> str:
        return str(self.config["table"])

    def _describe(self) -> str:
        return f"LanceSink(table={self.table_name!r}, uri={self.uri!r})"

    def prepare(self) -> None:
        """In ``overwrite`` mode, drop the table (its rows and history); otherwise nothing."""
        if self.config["mode"] != "overwrite":
            return
        db = self._connect()
        if self._open(db) is not None:
            db.drop_table(self.table_name)

    def write_partition(self, table: pa.Table, partition_key: str) -> int:
        table = _as_table(table, self._describe())
        key = _check_key(partition_key, self._describe())
        db = self._connect()
        # Two attempts at the same partition at once (a duplicated task) would both insert:
        # Lance has no unique keys. Serialise them; different partitions still write in parallel.
        with _partition_lock(self.uri, self.table_name, key):
            return self._write_locked(db, table, key)

    def _write_locked(self, db: DBConnection, table: pa.Table, key: str) -> int:
        from lancedb.expr import col, lit

        lance_table = self._open(db)
        if lance_table is None:
            if table.num_rows == 0:
                # No rows of this partition can exist yet, and an empty partition's column types
                # (often null-typed) should not decide the table's schema: the first non-empty does.
                return 0
            try:
                lance_table, created = self._create(db, _with_partition_columns(table, key))
            except SageError:
                raise
            except Exception as exc:
                raise SinkError(
                    f"{self._describe()}: creating the table from partition {key!r} failed: {exc}",
                    sink="LanceSink",
                    table=self.table_name,
                    partition=key,
                ) from exc
            if created:
                return int(table.num_rows)
        data = self._conform(_with_partition_columns(table, key), lance_table.schema)
        in_partition = col(PARTITION_COLUMN) == lit(key)
        try:
            if data.num_rows == 0:
                lance_table.delete(in_partition)
            else:
                (
                    lance_table.merge_insert(ROW_COLUMN)
                    .when_matched_update_all()
                    .when_not_matched_insert_all()
                    .when_not_matched_by_source_delete(in_partition)
                    .execute(data)
                )
        except Exception as exc:
            raise SinkError(
                f"{self._describe()}: writing partition {key!r} failed: {exc}",
                sink="LanceSink",
                table=self.table_name,
                partition=key,
            ) from exc
        return int(table.num_rows)

    def finish(self) -> None:
        """With ``optimize: true``, compact the table's fragments once all partitions are in."""
        if not self.config["optimize"]:
            return
        lance_table = self._open(self._connect())
        if lance_table is not None:
            lance_table.optimize()

    def _connect(self) -> DBConnection:
        import lancedb

        if not is_remote(self.uri):
            Path(self.uri).mkdir(parents=True, exist_ok=True)
        return lancedb.connect(self.uri)

    def _open(self, db: DBConnection) -> LanceTable | None:
        try:
            return db.open_table(self.table_name)
        except ValueError as exc:
            if "not found" in str(exc) or "does not exist" in str(exc):
                return None
            raise

    def _create(self, db: DBConnection, data: pa.Table) -> tuple[LanceTable, bool]:
        """Create the table from the first partition; (table, True) if this call created it."""
        with _creation_lock(self.uri, self.table_name):
            existing = self._open(db)
            if existing is not None:
                return existing, False
            try:
                created = db.create_table(self.table_name, data, mode="create")
            except ValueError as exc:
                if "already exists" not in str(exc):
                    raise
                opened = self._open(db)
                if opened is None:
                    raise
                return opened, False
        if created.version != 1:
            # Only possible without the lock (object stores): Lance commits a racing create as
            # an overwrite, so another writer's first partition was just replaced.
            raise SinkError(
                f"{self._describe()}: another writer created the table at the same time and this "
                f"create replaced it (version {created.version}); re-run the pipeline, or create "
                "the table before writing partitions concurrently to an object store",
                sink="LanceSink",
                table=self.table_name,
            )
        return created, True

    def _conform(self, data: pa.Table, schema: pa.Schema) -> pa.Table:
        return conform_to_schema(data, schema, self._schema_error)

    def _schema_error(self, field: str, detail: str) -> ConfigError:
        return ConfigError(
            f"{self._describe()}: partition schema does not fit the existing table: {detail}",
            field=field,
            operator="LanceSink",
            table=self.table_name,
        )


def replace_table(uri: str, source: str, target: str) -> int:
    """Make LanceDB table ``target`` hold exactly the rows of ``source``, then drop ``source``.

    For results written to a staging table first: ``target`` keeps its previous contents
    until the new ones are complete (one overwrite commit; readers see the old table or the
    new one, never a half-written one). Returns the rows of ``target`` afterwards.

    >>> import tempfile, lancedb
    >>> uri = tempfile.mkdtemp(); db = lancedb.connect(uri)
    >>> _ = db.create_table("answers", pa.table({"x": [0]})); _ = db.create_table("staging", pa.table({"x": [1, 2]}))
    >>> replace_table(uri, "staging", "answers"), "staging" in db.table_names()
    (2, False)
    """
    import lancedb

    db = lancedb.connect(uri)
    with _creation_lock(uri, target):
        rows = db.open_table(source).to_arrow()
        db.create_table(target, data=rows, mode="overwrite")
    db.drop_table(source)
    return rows.num_rows


def conform_to_schema(
    data: pa.Table, schema: pa.Schema, schema_error: Callable[[str, str], Exception]
) -> pa.Table:
    """Cast ``data`` to an existing table's ``schema`` (missing nullable fields become nulls).

    A field ``data`` has that the table lacks, a missing non-nullable field, or a value that
    does not cast raises ``schema_error(field, detail)`` for the first such field, so a
    partition is rejected before anything is written.

    >>> schema = pa.schema([("id", pa.int64()), ("note", pa.string())])
    >>> conform_to_schema(pa.table({"id": pa.array([1], pa.int32())}), schema, ValueError).to_pylist()
    [{'id': 1, 'note': None}]
    """
    extra = [name for name in data.column_names if name not in schema.names]
    if extra:
        raise schema_error(extra[0], f"field {extra[0]!r} is not in the table (its fields: {schema.names})")
    columns: list[pa.ChunkedArray] = []
    for field in schema:
        if field.name not in data.column_names:
            if not field.nullable:
                raise schema_error(field.name, f"non-nullable field {field.name!r} is missing")
            columns.append(pa.chunked_array([pa.nulls(data.num_rows, field.type)], field.type))
            continue
        column = data.column(field.name)
        if column.type != field.type:
            try:
                column = column.cast(field.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                hint = (
                    " (the partition that created the table had only nulls in it; give the "
                    "source an explicit schema)"
                    if pa.types.is_null(field.type)
                    else ""
                )
                raise schema_error(
                    field.name,
                    f"field {field.name!r} is {column.type} here but {field.type} in the table "
                    f"and cannot be cast{hint}: {exc}",
                ) from None
        if not field.nullable and column.null_count:
            raise schema_error(field.name, f"non-nullable field {field.name!r} has nulls")
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def _with_partition_columns(table: pa.Table, key: str) -> pa.Table:
    for name in (PARTITION_COLUMN, ROW_COLUMN):
        if name in table.column_names:
            table = table.drop_columns([name])
    n = table.num_rows
    table = table.append_column(pa.field(PARTITION_COLUMN, pa.string()), pa.array([key] * n, pa.string()))
    return table.append_column(
        pa.field(ROW_COLUMN, pa.string()), pa.array([f"{key}:{i}" for i in range(n)], pa.string())
    )


_LOCK_BUCKETS = 64


def _lock_path(uri: str, table: str, what: str) -> Path:
    return Path(uri) / ".sage-locks" / f"{table}.{what}.lock"


def _partition_lock(uri: str, table: str, key: str) -> contextlib.AbstractContextManager[None]:
    """Serialise writes of one partition key (hashed into a bounded set of lock files)."""
    bucket = zlib.crc32(key.encode("utf-8", "surrogatepass")) % _LOCK_BUCKETS
    return _file_lock(uri, _lock_path(uri, table, f"p{bucket:02d}"))


def _creation_lock(uri: str, table: str) -> contextlib.AbstractContextManager[None]:
    return _file_lock(uri, _lock_path(uri, table, "create"))


def lance_lock(uri: str, table: str, what: str) -> contextlib.AbstractContextManager[None]:
    """An exclusive lock named ``what`` on LanceDB table ``table`` under ``uri``.

    The same ``flock`` files `LanceSink` uses (``<uri>/.sage-locks/<table>.<what>.lock``):
    it serialises threads and processes on one machine (Dask workers included) and is a
    no-op on object stores. ``uri`` is a local directory (``file://`` accepted) or an
    object-store URI; ``what`` names the lock (``[A-Za-z0-9_.-]``, e.g. ``"create"``).

    >>> import tempfile
    >>> with lance_lock(tempfile.mkdtemp(), "docs", "write"):
    ...     pass
    """
    if not _LANCE_NAME.match(what):
        raise ValueError(f"lance_lock: lock name {what!r} may contain only letters, digits, '_', '-' and '.'")
    if not is_remote(uri):
        uri = str(Path(local_path(uri)).expanduser().resolve())
    return _file_lock(uri, _lock_path(uri, table, what))


@contextlib.contextmanager
def _file_lock(uri: str, path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (threads and processes alike); a no-op for object stores."""
    if is_remote(uri) or sys.platform == "win32":
        yield
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- files


def partition_file_name(partition_key: str, suffix: str) -> str:
    """``part-<key><suffix>``, the key made filename-safe (with a hash when it had to change).

    >>> partition_file_name("p0", ".parquet")
    'part-p0.parquet'
    """
    return f"part-{safe_name(partition_key)}{suffix}"


class _FileSink(PartitionSink):
    """A directory of one file per partition, each replaced atomically (temp file + ``os.replace``)."""

    suffix: ClassVar[str] = ""
    options: ClassVar[dict[str, SinkOption]] = {
        "path": SinkOption((str, os.PathLike), required=True, path=True),
        "mode": SinkOption((str,), default="append", choices=("append", "overwrite")),
    }

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        path = self.config["path"]
        if is_remote(path):
            raise ConfigError(
                f"{type(self).__name__}: path {path!r} must be a local directory",
                field="path",
                operator=type(self).__name__,
            )
        self.config["path"] = str(Path(local_path(path)).expanduser().resolve())

    @property
    def path(self) -> Path:
        return Path(self.config["path"])

    def _describe(self) -> str:
        return f"{type(self).__name__}(path={str(self.path)!r})"

    def prepare(self) -> None:
        """In ``overwrite`` mode, remove this sink's ``part-*`` files; otherwise nothing."""
        if self.config["mode"] != "overwrite" or not self.path.is_dir():
            return
        for file in self.path.glob(f"part-*{self.suffix}"):
            file.unlink(missing_ok=True)

    def write_partition(self, table: pa.Table, partition_key: str) -> int:
        table = _as_table(table, self._describe())
        key = _check_key(partition_key, self._describe())
        self.path.mkdir(parents=True, exist_ok=True)
        target = self.path / partition_file_name(key, self.suffix)
        fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=self.path)
        try:
            with os.fdopen(fd, "wb") as handle:
                self._write(table, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            if isinstance(exc, Exception) and not isinstance(exc, SageError):
                raise SinkError(
                    f"{self._describe()}: writing partition {key!r} failed: {exc}",
                    sink=type(self).__name__,
                    path=str(target),
                    partition=key,
                ) from exc
            raise
        return table.num_rows

    def finish(self) -> None:
        """Remove temp files a killed worker may have left (older than an hour)."""
        if not self.path.is_dir():
            return
        cutoff = time.time() - _STALE_TEMP_SECONDS
        for file in self.path.glob(f".part-*{self.suffix}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if file.stat().st_mtime < cutoff:
                    file.unlink()

    def _write(self, table: pa.Table, handle: IO[bytes]) -> None:
        raise NotImplementedError


class ParquetSink(_FileSink):
    """Write each partition to ``<path>/part-<key>.parquet``, replaced atomically on re-write.

    Config: ``path`` (a local directory), ``mode`` (``"append"`` default, or
    ``"overwrite"``: ``prepare()`` removes existing ``part-*.parquet`` files).
    Read the result with ``pyarrow.parquet.read_table(path)``.

    >>> import tempfile
    >>> ParquetSink({"path": tempfile.mkdtemp()}).write_partition(pa.table({"x": [1]}), "p0")
    1
    """

    suffix: ClassVar[str] = ".parquet"

    def _write(self, table: pa.Table, handle: IO[bytes]) -> None:
        import pyarrow.parquet as pq

        pq.write_table(table, handle)


class JSONLSink(_FileSink):
    """Write each partition to ``<path>/part-<key>.jsonl``: one JSON object per row.

    Values JSON cannot hold (timestamps, bytes, ...) are written as ``str(value)``.
    Config as for `ParquetSink`.

    >>> import tempfile
    >>> JSONLSink({"path": tempfile.mkdtemp()}).write_partition(pa.table({"x": [1, 2]}), "p/1")
    2
    """

    suffix: ClassVar[str] = ".jsonl"

    def _write(self, table: pa.Table, handle: IO[bytes]) -> None:
        for batch in table.to_batches():
            lines = [json.dumps(row, default=str, ensure_ascii=False) for row in batch.to_pylist()]
            if lines:
                handle.write(("\n".join(lines) + "\n").encode("utf-8"))


# --------------------------------------------------------------------------- collect, print


class CollectSink(PartitionSink):
    """Return the pipeline's output to the caller instead of writing it anywhere.

    ``write_partition`` keeps nothing on the worker; because ``collects`` is true, the
    kernel returns each partition's table to the driver keyed by its partition key (a
    retried partition replaces its entry, so collecting is idempotent by construction)
    and builds the result with `CollectSink.collect`.

    >>> CollectSink.collect({"p0": pa.table({"x": [1]}), "p1": pa.table({"x": [2]})}).num_rows
    2
    """

    collects: ClassVar[bool] = True

    def write_partition(self, table: pa.Table, partition_key: str) -> int:
        table = _as_table(table, "CollectSink")
        _check_key(partition_key, "CollectSink")
        return int(table.num_rows)

    @staticmethod
    def collect(tables_by_key: Mapping[str, pa.Table]) -> pa.Table:
        """Concatenate partition tables in the mapping's order (missing columns become nulls)."""
        return concat([_as_table(t, "CollectSink") for t in tables_by_key.values()])


class PrintSink(PartitionSink):
    """Print every record of each partition (``DataStream.print()``), with an optional prefix.

    Output goes to the standard output of the process that runs the partition (a Dask
    worker's log for process workers). Printing cannot be undone: a retried partition
    prints again.

    >>> PrintSink({"prefix": "> "}).write_partition(pa.table({"x": [1]}), "p0")
    > {'x': 1}
    1
    """

    options: ClassVar[dict[str, SinkOption]] = {"prefix": SinkOption((str,), default="")}

    def write_partition(self, table: pa.Table, partition_key: str) -> int:
        table = _as_table(table, "PrintSink")
        _check_key(partition_key, "PrintSink")
        for record in table.to_pylist():
            self.execute(record)
        sys.stdout.flush()
        return int(table.num_rows)

    def execute(self, data: Record) -> None:
        print(f"{self.config['prefix']}{data}", file=sys.stdout)


# --------------------------------------------------------------------------- helpers


def _validate(sink: str, options: Mapping[str, SinkOption], config: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(config) - set(options))
    if unknown:
        raise ConfigError(
            f"{sink}: unknown config key {unknown[0]!r} (known: {sorted(options) or 'none'})",
            field=unknown[0],
            operator=sink,
        )
    out: dict[str, Any] = {}
    for key, option in options.items():
        if key not in config or config[key] is None:
            if option.required:
                raise ConfigError(f"{sink}: config key {key!r} is required", field=key, operator=sink)
            out[key] = option.default
            continue
        value = config[key]
        wrong = not isinstance(value, option.types) or (bool not in option.types and isinstance(value, bool))
        if wrong:
            expected = " or ".join(t.__name__ for t in option.types)
            raise ConfigError(
                f"{sink}: config key {key!r} must be {expected}, got {type(value).__name__} ({value!r})",
                field=key,
                operator=sink,
            )
        if option.path:
            value = os.fspath(value)
            if not value:
                raise ConfigError(f"{sink}: config key {key!r} must not be empty", field=key, operator=sink)
        if option.choices and value not in option.choices:
            raise ConfigError(
                f"{sink}: config key {key!r} must be one of {list(option.choices)}, got {value!r}",
                field=key,
                operator=sink,
            )
        out[key] = value
    return out


def _as_table(table: Any, where: str) -> pa.Table:
    if isinstance(table, pa.Table):
        return table
    if isinstance(table, pa.RecordBatch):
        return pa.Table.from_batches([table])
    raise TypeError(f"{where}: expected a pyarrow.Table partition, got {type(table).__name__}")


def _check_key(partition_key: Any, where: str) -> str:
    if not isinstance(partition_key, str):
        raise TypeError(f"{where}: partition_key must be a str, got {type(partition_key).__name__}")
    return partition_key
