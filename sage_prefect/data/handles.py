"""Stage handles: a reference ``(uri, table, version)`` to a stage's output in a Lance table.

Between pipeline stages a small partition travels inline as a ``pyarrow.Table``; a
large one is written ("spilled") to a Lance table in the run's stage directory and
only its `StageHandle` travels. The handle pins the table version, so a later
overwrite of the same table never changes what an existing handle loads.

>>> import pyarrow as pa, tempfile
>>> d = tempfile.mkdtemp()
>>> h = spill(pa.table({"x": [1, 2]}), d, "stage-0/part-0")
>>> (h.num_rows, load(h).column("x").to_pylist())
(2, [1, 2])
>>> drop_stage_data(d)
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from sage_prefect.common.errors import ConfigError, SageError
from sage_prefect.data._names import is_remote, local_path, safe_name

__all__ = [
    "StageDataMissingError",
    "StageHandle",
    "drop_stage_data",
    "load",
    "maybe_spill",
    "resolve",
    "spill",
]


class StageDataMissingError(SageError, FileNotFoundError):
    """A stage handle whose Lance table or version is gone (stage data dropped or never written).

    >>> try:
    ...     load(StageHandle("/nonexistent", "t", 1, 0, 0))
    ... except StageDataMissingError as exc:
    ...     exc.table
    't'
    """


@dataclass(frozen=True)
class StageHandle:
    """Where a stage's output lives: Lance table ``table`` under ``uri``, pinned at ``version``.

    ``num_rows`` and ``nbytes`` describe the data without opening it (for planning and logs).
    Handles are small, hashable and JSON-able (`to_dict` / `from_dict`).

    >>> h = StageHandle(uri="/runs/r1/stages", table="map-1_p0", version=1, num_rows=10, nbytes=80)
    >>> StageHandle.from_dict(h.to_dict()) == h
    True
    """

    uri: str
    table: str
    version: int
    num_rows: int
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        """The handle as a plain dict of JSON types."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageHandle:
        """Rebuild a handle from `to_dict` output; unknown or missing keys raise `ConfigError`."""
        expected = {"uri", "table", "version", "num_rows", "nbytes"}
        if set(data) != expected:
            raise ConfigError(
                f"a stage handle needs exactly the keys {sorted(expected)}, got {sorted(data)}",
                field="stage_handle",
            )
        return cls(
            uri=str(data["uri"]),
            table=str(data["table"]),
            version=int(data["version"]),
            num_rows=int(data["num_rows"]),
            nbytes=int(data["nbytes"]),
        )


def _normalise_uri(directory: str | os.PathLike[str]) -> str:
    uri = os.fspath(directory)
    if is_remote(uri):
        return uri
    return str(Path(local_path(uri)).expanduser().resolve())


def spill(table: pa.Table, directory: str | os.PathLike[str], name: str) -> StageHandle:
    """Write ``table`` to the Lance table ``name`` (sanitised) under ``directory``; return its handle.

    The table is written with ``mode="overwrite"``: spilling the same name again (a retried
    task) makes a new version, and handles to older versions keep loading the older data.
    ``name`` must be unique per stage and partition within a run.
    """
    import lancedb

    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    if table.num_columns == 0:
        raise ConfigError(f"cannot spill a table with no columns (stage {name!r})", field="table")
    uri = _normalise_uri(directory)
    if not is_remote(uri):
        Path(uri).mkdir(parents=True, exist_ok=True)
    table_name = safe_name(name)
    lance_table = lancedb.connect(uri).create_table(table_name, table, mode="overwrite")
    return StageHandle(
        uri=uri,
        table=table_name,
        version=int(lance_table.version),
        num_rows=table.num_rows,
        nbytes=int(table.nbytes),
    )


def load(handle: StageHandle) -> pa.Table:
    """Read the data a handle points to, at exactly the handle's version."""
    import lancedb

    try:
        lance_table = lancedb.connect(handle.uri).open_table(handle.table)
        lance_table.checkout(handle.version)
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise StageDataMissingError(
            f"stage data {handle.table!r} version {handle.version} under {handle.uri} "
            f"cannot be opened (dropped, or never written?): {exc}",
            uri=handle.uri,
            table=handle.table,
            version=handle.version,
        ) from exc
    return lance_table.to_arrow()


def maybe_spill(
    table: pa.Table, threshold_bytes: int, directory: str | os.PathLike[str], name: str
) -> pa.Table | StageHandle:
    """Spill ``table`` when it is larger than ``threshold_bytes`` (> 0), else return it unchanged.

    A threshold of 0 or less disables spilling; an empty table (no columns or no rows)
    never spills.
    """
    if threshold_bytes <= 0 or table.num_columns == 0 or table.num_rows == 0:
        return table
    if table.nbytes <= threshold_bytes:
        return table
    return spill(table, directory, name)


def resolve(obj: pa.Table | pa.RecordBatch | StageHandle) -> pa.Table:
    """The table itself, or the data behind a handle (a record batch becomes a table)."""
    if isinstance(obj, StageHandle):
        return load(obj)
    if isinstance(obj, pa.Table):
        return obj
    if isinstance(obj, pa.RecordBatch):
        return pa.Table.from_batches([obj])
    raise TypeError(f"expected a pyarrow.Table or a StageHandle, got {type(obj).__name__}")


def drop_stage_data(directory: str | os.PathLike[str]) -> None:
    """Remove a run's stage directory and every Lance table in it (no error when it is gone).

    As a guard against a misconfigured path, a local directory is only removed when it
    holds nothing but Lance tables (``*.lance``); otherwise `ConfigError` is raised.
    """
    uri = _normalise_uri(directory)
    if is_remote(uri):
        import lancedb

        lancedb.connect(uri).drop_all_tables()
        return
    path = Path(uri)
    if not path.exists():
        return
    if not path.is_dir():
        raise ConfigError(f"stage directory {path} is not a directory", file=str(path))
    foreign = [p.name for p in path.iterdir() if not (p.is_dir() and p.name.endswith(".lance"))]
    if foreign:
        raise ConfigError(
            f"refusing to remove stage directory {path}: it holds more than Lance tables "
            f"({', '.join(sorted(foreign)[:5])})",
            file=str(path),
        )
    shutil.rmtree(path, ignore_errors=True)
