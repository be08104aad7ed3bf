"""LanceDB operators: index chunks (`LanceIndexer`), skip unchanged documents (`SkipIndexed`),
drop vanished ones (`prune_documents`) and retrieve (`LanceRetriever`).

The table holds one row per chunk (the fields chunkers and `Embedder` produce). A document
is the unit of change: `LanceIndexer` replaces *all* chunks of every document present in a
partition in one commit, `SkipIndexed` drops documents whose ``(doc_id, content_hash)`` is
already indexed, and `prune_documents` deletes documents that are gone. Together they
make re-indexing a directory incremental::

    docs = TextDirectorySource(...)  ->  SkipIndexed  ->  chunker  ->  Embedder  ->  LanceIndexer
    prune_documents(uri, table, keep_doc_ids=<every doc_id the source listed>)

Retrieval modes: ``vector`` (cosine similarity), ``fts`` (BM25 over LanceDB's native
full-text index) and ``hybrid``: reciprocal-rank fusion (RRF) of the two result lists,
computed here over both lists (see `reciprocal_rank_fusion`).

``lancedb`` is imported inside functions and ``setup()``, never at module import.

>>> LanceRetriever({"mode": "semantic"})
Traceback (most recent call last):
...
sage_prefect.common.errors.ConfigError: LanceRetriever: config key 'mode': Input should be 'vector', 'fts' or 'hybrid' (got str 'semantic')
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from sage_prefect.common.errors import ConfigError, OperatorError, RecordError
from sage_prefect.common.functions import FilterFunction, MapFunction, Record, SinkFunction
from sage_prefect.common.records import aligned, with_columns
from sage_prefect.common.settings import load_settings
from sage_prefect.data.sinks import conform_to_schema, lance_lock
from sage_prefect.tasks.base import Operator, OperatorConfig
from sage_prefect.tasks.client import EndpointConfig, client
from sage_prefect.tasks.rag.embedding import embed_texts

if TYPE_CHECKING:
    from lancedb.db import DBConnection
    from lancedb.query import LanceVectorQueryBuilder
    from lancedb.table import Table as LanceTable
    from openai import OpenAI

__all__ = [
    "LanceIndexer",
    "LanceRetriever",
    "SkipIndexed",
    "prune_documents",
    "reciprocal_rank_fusion",
    "table_rows",
]

log = logging.getLogger(__name__)

_TABLE_NAME = r"^[A-Za-z0-9_.-]+$"
_WRITE_LOCK = "write"
_SMALL_FRAGMENTS_TO_COMPACT = 16
"""`LanceIndexer.finish` compacts once the table has this many small fragments."""
_ROWS_PER_IVF_PARTITION = 500_000
"""IVF_HNSW_SQ: each IVF partition is one HNSW graph; few, large partitions search best."""


# --------------------------------------------------------------------------- shared helpers


def _resolve_uri(uri: str | None) -> str:
    """``uri`` as LanceDB should see it: settings' ``lance_dir`` for None, local paths absolute."""
    if uri is None:
        return str(load_settings().lance_dir)
    if "://" in uri and not uri.startswith("file://"):
        return uri
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


def _connect(uri: str, create: bool = False) -> DBConnection:
    import lancedb

    if create and "://" not in uri:
        Path(uri).mkdir(parents=True, exist_ok=True)
    return lancedb.connect(uri)


def _open(db: DBConnection, table: str) -> LanceTable | None:
    """The table, or None when it does not exist."""
    try:
        return db.open_table(table)
    except ValueError as exc:
        if "not found" in str(exc) or "does not exist" in str(exc):
            return None
        raise


def _open_existing(uri: str, table: str) -> LanceTable | None:
    if "://" not in uri and not Path(uri).is_dir():
        return None
    return _open(_connect(uri), table)


def _read_columns(lance_table: LanceTable, columns: list[str]) -> pa.Table:
    """Every row of ``columns`` (a projected scan: vectors are not read)."""
    return lance_table.search().select(columns).limit(None).to_arrow()


def _indices(lance_table: LanceTable) -> list[Any]:
    # Lance warns on every listing of a vector index unless told whether its statistics should
    # carry the IVF centroids; opt in to the future default (no centroids), unless set.
    os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")
    return list(lance_table.list_indices())


def _small_fragments(lance_table: LanceTable) -> int:
    """How many small (compactable) fragments the table has."""
    stats: Any = lance_table.stats()
    fragments = stats["fragment_stats"] if isinstance(stats, dict) else stats.fragment_stats
    small = fragments["num_small_fragments"] if isinstance(fragments, dict) else fragments.num_small_fragments
    return int(small)


def _index_on(indices: Iterable[Any], column: str, kinds: tuple[str, ...]) -> Any | None:
    for index in indices:
        if list(index.columns) == [column] and str(index.index_type).upper().replace("_", "") in kinds:
            return index
    return None


_VECTOR_KINDS = ("IVFPQ", "IVFHNSWSQ", "IVFHNSWPQ", "IVFHNSWFLAT", "IVFFLAT", "IVFSQ", "IVFRQ")


# --------------------------------------------------------------------------- LanceIndexer


class LanceIndexer(Operator, SinkFunction):
    """Write chunk rows to a LanceDB table, replacing each document's chunks together.

    Config: ``uri`` (LanceDB directory or object-store URI; default settings ``lance_dir``),
    ``table`` (``"docs"``), ``id_field`` (``"chunk_id"``, unique per row), ``doc_field``
    (``"doc_id"``), ``text_field`` (``"text"``), ``vector_field`` (``"vector"``),
    ``vector_index_min_rows`` (50 000: build the ANN index once the table is this large),
    ``fts`` (true: keep a full-text index on ``text_field``, which ``fts``/``hybrid``
    retrieval needs).

    ``write_partition`` is one ``merge_insert`` on ``id_field``: rows of matching ids are
    updated, new ids inserted, and the table's other chunks *of the documents in this
    partition* deleted (``when_not_matched_by_source_delete`` restricted to those doc ids).
    So a changed document that now has fewer chunks loses its old extras, other documents
    are untouched, and writing the same partition again changes nothing. All chunks of a
    document must arrive in the same partition (true for a chunker downstream of a document
    source). The first write creates the table; later partitions are cast to its schema, and
    one that does not fit raises `ConfigError` naming the field. Writes to one table are
    serialised by a file lock (``lance_lock``) so partitions written in parallel by Dask
    workers neither race on creating the table nor conflict on commits.

    ``finish()`` (once, after the last partition) maintains the indexes: a BTree on
    ``id_field`` (merge lookups), the FTS index on ``text_field``, and an ``IVF_HNSW_SQ``
    cosine index on ``vector_field`` once the table has ``vector_index_min_rows`` rows
    (``num_partitions`` = one per 500 000 rows, at least 1; re-trained when the table has
    doubled since the index last covered it). Rows written since indexes were built are
    folded in with ``optimize()``, which also compacts small fragments.
    """

    class Config(OperatorConfig):
        uri: str | None = Field(None, min_length=1, description="LanceDB URI; default settings lance_dir")
        table: str = Field("docs", pattern=_TABLE_NAME, description="Table name")
        id_field: str = Field("chunk_id", min_length=1, description="Unique id of a row (chunk)")
        doc_field: str = Field("doc_id", min_length=1, description="Document a row belongs to")
        text_field: str = Field("text", min_length=1, description="Text column (full-text index)")
        vector_field: str = Field("vector", min_length=1, description="Embedding column")
        vector_index_min_rows: int = Field(
            50_000, ge=1, description="Build the IVF_HNSW_SQ vector index once the table has this many rows"
        )
        fts: bool = Field(True, description="Build/refresh a full-text index on text_field in finish()")

    cfg: Config

    @property
    def uri(self) -> str:
        """The resolved LanceDB URI."""
        return _resolve_uri(self.cfg.uri)

    def _describe(self) -> str:
        return f"{self.name}(table={self.cfg.table!r}, uri={self.uri!r})"

    def execute(self, data: Record) -> None:
        raise NotImplementedError(
            f"{self.name} writes whole partitions (write_partition(table, key)): a document's "
            "chunks are replaced together, so one record at a time would delete the chunks "
            "written before it. Use it with DataStream.sink(...), op.run(rows) or op.as_task()."
        )

    def write_partition(self, table: pa.Table, partition_key: str) -> int:
        """Replace the chunks of every document in ``table``; return the rows written."""
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if table.num_rows == 0:
            return 0
        data = self._prepare(aligned(table))
        cfg = self.cfg
        doc_ids = pc.unique(data.column(cfg.doc_field)).to_pylist()
        uri = self.uri
        db = _connect(uri, create=True)
        with lance_lock(uri, cfg.table, _WRITE_LOCK):
            lance_table = _open(db, cfg.table)
            if lance_table is None:
                try:
                    db.create_table(cfg.table, data, mode="create")
                    return int(data.num_rows)
                except ValueError as exc:
                    # Only without a working lock (object stores): another writer created it first.
                    lance_table = _open(db, cfg.table) if "already exists" in str(exc) else None
                    if lance_table is None:
                        raise self._create_error(partition_key, exc) from exc
                except Exception as exc:
                    raise self._create_error(partition_key, exc) from exc
            from lancedb.expr import col

            data = conform_to_schema(data, lance_table.schema, self._schema_error)
            try:
                (
                    lance_table.merge_insert(cfg.id_field)
                    .when_matched_update_all()
                    .when_not_matched_insert_all()
                    .when_not_matched_by_source_delete(col(cfg.doc_field).isin(doc_ids))
                    .execute(data)
                )
            except Exception as exc:
                raise OperatorError(
                    f"{self._describe()}: writing partition {partition_key!r} "
                    f"({len(doc_ids)} documents) failed: {exc}",
                    operator=self.name,
                    table=cfg.table,
                    partition=partition_key,
                ) from exc
        return int(data.num_rows)

    def finish(self) -> None:
        """Build missing indexes, re-train an outgrown vector index, fold new rows in, compact."""
        cfg = self.cfg
        uri = self.uri
        lance_table = _open_existing(uri, cfg.table)
        if lance_table is None:
            return
        from lancedb.index import FTS, BTree, HnswSq

        with lance_lock(uri, cfg.table, _WRITE_LOCK):
            lance_table = _open(_connect(uri), cfg.table) or lance_table
            rows = lance_table.count_rows()
            if rows == 0:
                return
            indices = _indices(lance_table)
            built: list[str] = []
            vector = _index_on(indices, cfg.vector_field, _VECTOR_KINDS)
            covered = (vector.num_indexed_rows + vector.num_unindexed_rows) if vector is not None else 0
            outgrown = vector is not None and rows >= 2 * max(int(vector.num_indexed_rows), 1)
            if rows >= cfg.vector_index_min_rows and (vector is None or outgrown):
                partitions = vector_index_partitions(rows)
                started = time.perf_counter()
                lance_table.create_index(
                    cfg.vector_field,
                    config=HnswSq(distance_type="cosine", num_partitions=partitions),
                    replace=True,
                )
                built.append(
                    f"IVF_HNSW_SQ on {cfg.vector_field!r} ({rows} rows, {partitions} partitions, "
                    f"{time.perf_counter() - started:.1f} s; index covered {covered} rows before)"
                )
            if cfg.fts and _index_on(indices, cfg.text_field, ("FTS", "INVERTED")) is None:
                lance_table.create_index(cfg.text_field, config=FTS(), replace=True)
                built.append(f"FTS on {cfg.text_field!r}")
            if _index_on(indices, cfg.id_field, ("BTREE",)) is None:
                lance_table.create_index(cfg.id_field, config=BTree(), replace=True)
                built.append(f"BTree on {cfg.id_field!r}")
            stale = any(int(ix.num_unindexed_rows) > 0 for ix in _indices(lance_table))
            small = _small_fragments(lance_table)
            if stale or small >= _SMALL_FRAGMENTS_TO_COMPACT:
                lance_table.optimize()
                built.append(f"optimize (unindexed rows: {stale}, small fragments: {small})")
        if built:
            log.info("%s: %s", self._describe(), "; ".join(built))

    def _create_error(self, partition_key: str, exc: Exception) -> OperatorError:
        return OperatorError(
            f"{self._describe()}: creating the table from partition {partition_key!r} failed: {exc}",
            operator=self.name,
            table=self.cfg.table,
            partition=partition_key,
        )

    # -- schema ----------------------------------------------------------------------------------
    def _prepare(self, table: pa.Table) -> pa.Table:
        """Check the key fields, make the vector column ``fixed_size_list<float32>``."""
        cfg = self.cfg
        for field in (cfg.id_field, cfg.doc_field, cfg.text_field, cfg.vector_field):
            if field not in table.column_names:
                raise ConfigError(
                    f"{self._describe()}: partition has no field {field!r} (fields: {table.column_names})",
                    operator=self.name,
                    field=field,
                )
        for field in (cfg.id_field, cfg.doc_field, cfg.vector_field):
            column = table.column(field)
            if column.null_count:
                row = column.is_null().to_pylist().index(True)
                raise RecordError(
                    f"{self._describe()}: row {row}: field {field!r} is null",
                    operator=self.name,
                    field=field,
                    row=row,
                )
        ids = table.column(cfg.id_field)
        if pc.count_distinct(ids).as_py() != table.num_rows:
            seen: set[Any] = set()
            for row, value in enumerate(ids.to_pylist()):
                if value in seen:
                    raise RecordError(
                        f"{self._describe()}: row {row}: {cfg.id_field} {value!r} appears twice in the "
                        "partition (ids must be unique)",
                        operator=self.name,
                        field=cfg.id_field,
                        row=row,
                    )
                seen.add(value)
        vectors = _fixed_size_vectors(table.column(cfg.vector_field), cfg.vector_field, self._describe())
        index = table.column_names.index(cfg.vector_field)
        return table.set_column(index, pa.field(cfg.vector_field, vectors.type), vectors)

    def _schema_error(self, field: str, detail: str) -> ConfigError:
        return ConfigError(
            f"{self._describe()}: partition schema does not fit the existing table: {detail}",
            operator=self.name,
            field=field,
            table=self.cfg.table,
        )


def vector_index_partitions(rows: int) -> int:
    """IVF partitions for an ``IVF_HNSW_SQ`` index over ``rows`` rows: one per 500 000, 1..1024.

    >>> vector_index_partitions(60_000), vector_index_partitions(3_000_000)
    (1, 6)
    """
    return max(1, min(1024, math.ceil(rows / _ROWS_PER_IVF_PARTITION)))


def _fixed_size_vectors(column: pa.ChunkedArray, field: str, where: str) -> pa.Array:
    """``column`` as ``fixed_size_list<float32>[dim]`` (from any list of numbers of one length)."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    kind = array.type
    if pa.types.is_fixed_size_list(kind):
        if pa.types.is_float32(kind.value_type):
            return array
        if pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type):
            return array.cast(pa.list_(pa.float32(), kind.list_size))
    elif (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and (
        pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)
    ):
        lengths = pc.list_value_length(array)
        low, high = pc.min_max(lengths).values()
        if low.as_py() != high.as_py():
            row = lengths.to_pylist().index(high.as_py())
            raise RecordError(
                f"{where}: row {row}: field {field!r} has {high.as_py()} values where others have "
                f"{low.as_py()} (vectors must have one size)",
                field=field,
                row=row,
            )
        values = pc.list_flatten(array).cast(pa.float32())
        return pa.FixedSizeListArray.from_arrays(values, int(low.as_py()))
    raise ConfigError(
        f"{where}: field {field!r} must hold vectors (lists of numbers), got {kind}",
        field=field,
    )


def table_rows(uri: str | None, table: str) -> int:
    """Rows in LanceDB table ``table`` under ``uri`` (default: settings.lance_dir); 0 when it does not exist."""
    found = _open_existing(_resolve_uri(uri), table)
    return 0 if found is None else int(found.count_rows())


def prune_documents(
    uri: str | None,
    table: str,
    keep_doc_ids: Iterable[Any] | Mapping[Any, str],
    doc_field: str = "doc_id",
    hash_field: str = "content_hash",
) -> int:
    """Delete the chunks of every document not in ``keep_doc_ids``; return the rows deleted.

    Pass every doc id the source still has (not only the changed ones): an empty
    ``keep_doc_ids`` deletes everything. A missing table deletes nothing (returns 0).
    Given a mapping ``{doc_id: content_hash}``, chunks of a kept document whose stored
    ``hash_field`` differs from its current hash are deleted too: a document edited into one
    that yields no chunks (blank) leaves nothing for the indexer to replace, so its old
    chunks would otherwise stay searchable.
    """
    resolved = _resolve_uri(uri)
    lance_table = _open_existing(resolved, table)
    if lance_table is None:
        return 0
    hashes = dict(keep_doc_ids) if isinstance(keep_doc_ids, Mapping) else None
    needed = [doc_field, hash_field] if hashes is not None else [doc_field]
    for name in needed:
        if name not in lance_table.schema.names:
            raise ConfigError(
                f"prune_documents: table {table!r} at {resolved!r} has no field {name!r} "
                f"(its fields: {lance_table.schema.names})",
                field=name,
                table=table,
            )
    from lancedb.expr import col

    keep = set(hashes if hashes is not None else keep_doc_ids)
    with lance_lock(resolved, table, _WRITE_LOCK):
        lance_table = _open(_connect(resolved), table) or lance_table
        before = lance_table.count_rows()
        pairs = _read_columns(lance_table, needed).group_by(needed).aggregate([]).to_pylist()
        gone = sorted({p[doc_field] for p in pairs if p[doc_field] not in keep})
        if gone:
            lance_table.delete(col(doc_field).isin(gone))
        if hashes is not None:
            for doc in sorted(
                {
                    p[doc_field]
                    for p in pairs
                    if p[doc_field] in keep and p[hash_field] != hashes[p[doc_field]]
                }
            ):
                lance_table.delete(
                    f"{doc_field} = {_sql_string(doc)} AND {hash_field} != {_sql_string(hashes[doc])}"
                )
        return before - lance_table.count_rows()


def _sql_string(value: Any) -> str:
    """A SQL string literal for a Lance filter (single quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


# --------------------------------------------------------------------------- SkipIndexed


class SkipIndexed(Operator, FilterFunction):
    """Keep only documents whose ``(doc_field, hash_field)`` pair is not in the table yet.

    Config: ``uri`` (default settings ``lance_dir``), ``table`` (``"docs"``), ``doc_field``
    (``"doc_id"``), ``hash_field`` (``"content_hash"``). ``setup()`` reads the pairs the
    table holds once (a projection of two columns); a missing table keeps every document.
    Place it right after the document source: unchanged documents are then neither
    re-chunked nor re-embedded, changed ones (new hash) and new ones pass through, and
    `LanceIndexer` replaces the changed documents' chunks.
    """

    class Config(OperatorConfig):
        uri: str | None = Field(None, min_length=1, description="LanceDB URI; default settings lance_dir")
        table: str = Field("docs", pattern=_TABLE_NAME, description="Table name")
        doc_field: str = Field("doc_id", min_length=1, description="Document id field")
        hash_field: str = Field("content_hash", min_length=1, description="Document content hash field")

    cfg: Config

    def _runtime_attributes(self) -> tuple[str, ...]:
        return ("_indexed",)

    def setup(self) -> None:
        """Read the ``(doc, hash)`` pairs already indexed."""
        cfg = self.cfg
        uri = _resolve_uri(cfg.uri)
        self._indexed: set[tuple[Any, Any]] = set()
        lance_table = _open_existing(uri, cfg.table)
        if lance_table is not None:
            for field in (cfg.doc_field, cfg.hash_field):
                if field not in lance_table.schema.names:
                    raise ConfigError(
                        f"{self.name}: table {cfg.table!r} at {uri!r} has no field {field!r} "
                        f"(its fields: {lance_table.schema.names}); index the documents' "
                        f"{cfg.hash_field!r} with their chunks",
                        operator=self.name,
                        field=field,
                    )
            pairs = _read_columns(lance_table, [cfg.doc_field, cfg.hash_field])
            unique = pairs.group_by([cfg.doc_field, cfg.hash_field]).aggregate([])
            self._indexed = set(
                zip(
                    unique.column(cfg.doc_field).to_pylist(),
                    unique.column(cfg.hash_field).to_pylist(),
                    strict=True,
                )
            )
        self._ready = True

    def execute(self, data: Record) -> bool:
        """True when this document (id and content) is not indexed yet."""
        self.ensure_setup()
        cfg = self.cfg
        for field in (cfg.doc_field, cfg.hash_field):
            if field not in data:
                raise RecordError(
                    f"{self.name}: record has no field {field!r} (fields: {sorted(data)})",
                    operator=self.name,
                    field=field,
                )
        return (data[cfg.doc_field], data[cfg.hash_field]) not in self._indexed

    def execute_batch(self, table: pa.Table) -> pa.Table:
        """The partition without the documents already indexed."""
        self.ensure_setup()
        cfg = self.cfg
        for field in (cfg.doc_field, cfg.hash_field):
            if field not in table.column_names:
                raise RecordError(
                    f"{self.name}: partition has no field {field!r} (fields: {table.column_names})",
                    operator=self.name,
                    field=field,
                )
        if not self._indexed or table.num_rows == 0:
            return table
        pairs = zip(
            table.column(cfg.doc_field).to_pylist(), table.column(cfg.hash_field).to_pylist(), strict=True
        )
        mask = [pair not in self._indexed for pair in pairs]
        return table.filter(pa.array(mask, type=pa.bool_()))


# --------------------------------------------------------------------------- LanceRetriever


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Any]], k: int = 60) -> list[tuple[Any, float]]:
    """Fuse ranked id lists: ``score(id) = sum over lists of 1 / (k + rank)``, rank from 1.

    Best first; ties go to the id ranked higher in any list, then to the earlier list.

    >>> reciprocal_rank_fusion([["a", "b"], ["c", "a"]], k=60)
    [('a', 0.03252247488101534), ('c', 0.01639344262295082), ('b', 0.016129032258064516)]
    """
    scores: dict[Any, float] = {}
    best: dict[Any, tuple[int, int]] = {}
    for list_index, ranking in enumerate(rankings):
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
            best[item] = min(best.get(item, (rank, list_index)), (rank, list_index))
    return sorted(scores.items(), key=lambda kv: (-kv[1], best[kv[0]]))


class LanceRetriever(Operator, MapFunction):
    """Add the ``top_k`` chunks most relevant to each record's ``query_field``.

    Config (besides ``base_url``, ``api_key``, ``timeout_s``, ``max_retries``): ``uri``
    (default settings ``lance_dir``), ``table`` (``"docs"``), ``mode`` (``"vector"``,
    ``"fts"`` or ``"hybrid"``, the default), ``top_k`` (5), ``query_field``
    (``"question"``), ``filter`` (SQL ``WHERE`` applied *before* the search, e.g.
    ``"doc_id LIKE 'guides/%'"``), ``model`` (embedding model; default settings; must be
    the one the table was embedded with), ``rrf_k`` (60), ``candidates`` (results each
    side contributes to hybrid fusion; default ``max(2 * top_k, 20)``), ``columns`` (extra
    table columns to copy into each retrieved item, e.g. ``["title", "path"]``), the
    table's ``id_field``/``doc_field``/``text_field``/``vector_field``, and the ANN search
    settings passed to LanceDB's vector query when set (unset: LanceDB's defaults):
    ``nprobes`` (IVF partitions searched), ``ef`` (HNSW candidate list size; at least
    ``top_k`` is sensible) and ``refine_factor`` (fetch ``limit * refine_factor`` candidates
    and re-rank them by their full vectors, which recovers recall a quantised index loses).

    Adds ``retrieved`` (list of ``{chunk_id, doc_id, text, score, *columns}``, best first),
    ``retrieved_ids`` (the chunk ids) and ``latency_retrieve_ms``. Scores by mode:

    * ``vector``: cosine similarity of query and chunk vectors, computed exactly from the
      stored vectors (an ANN index, when the table has one, only picks the candidates);
    * ``fts``: LanceDB's BM25 score (needs the full-text index `LanceIndexer` builds);
    * ``hybrid``: reciprocal-rank fusion of the vector and full-text lists,
      ``sum 1 / (rrf_k + rank)`` (`reciprocal_rank_fusion`). Fusing ranks, not scores, lets
      a chunk only one side finds (an exact rare term, a paraphrase) still surface.

    ``execute_batch`` embeds all queries of a partition in one request. The latency of a
    query is its own search time plus its share of that request.
    """

    class Config(EndpointConfig):
        uri: str | None = Field(None, min_length=1, description="LanceDB URI; default settings lance_dir")
        table: str = Field("docs", pattern=_TABLE_NAME, description="Table name")
        mode: Literal["vector", "fts", "hybrid"] = Field("hybrid", description="Retrieval mode")
        top_k: int = Field(5, ge=1, le=1000, description="Chunks returned per query")
        query_field: str = Field("question", min_length=1, description="Field holding the query text")
        filter: str | None = Field(None, min_length=1, description="SQL WHERE prefilter on table columns")
        model: str | None = Field(None, min_length=1, description="Embedding model; default settings")
        rrf_k: int = Field(60, ge=0, description="RRF constant: score = sum 1 / (rrf_k + rank)")
        candidates: int | None = Field(
            None, ge=1, le=10_000, description="Hybrid: results per side before fusion"
        )
        columns: list[str] = Field(default_factory=list, description="Extra table columns per retrieved item")
        id_field: str = Field("chunk_id", min_length=1, description="Chunk id column")
        doc_field: str = Field("doc_id", min_length=1, description="Document id column")
        text_field: str = Field("text", min_length=1, description="Text column")
        vector_field: str = Field("vector", min_length=1, description="Embedding column")
        nprobes: int | None = Field(
            None, ge=1, description="ANN: IVF partitions searched per query; default LanceDB's"
        )
        ef: int | None = Field(
            None, ge=1, description="ANN: HNSW candidate list size per query; default LanceDB's"
        )
        refine_factor: int | None = Field(
            None, ge=1, description="ANN: re-rank limit x refine_factor candidates by full vectors"
        )

    cfg: Config

    def _runtime_attributes(self) -> tuple[str, ...]:
        return ("_client", "_table")

    def _describe(self) -> str:
        return f"{self.name}(table={self.cfg.table!r}, uri={_resolve_uri(self.cfg.uri)!r})"

    def setup(self) -> None:
        """Open the table, check fields, indexes and filter; create the client for vector modes."""
        cfg = self.cfg
        uri = _resolve_uri(cfg.uri)
        lance_table = _open_existing(uri, cfg.table)
        if lance_table is None:
            raise ConfigError(
                f"{self.name}: there is no table {cfg.table!r} at {uri!r}; index documents into it "
                "first (LanceIndexer) or fix config keys 'uri' and 'table'",
                operator=self.name,
                field="table",
                uri=uri,
                table=cfg.table,
            )
        schema = lance_table.schema
        needed = [cfg.id_field, cfg.doc_field, cfg.text_field, *cfg.columns]
        if cfg.mode != "fts":
            needed.append(cfg.vector_field)
        for field in needed:
            if field not in schema.names:
                key = next(
                    (
                        k
                        for k in ("id_field", "doc_field", "text_field", "vector_field")
                        if getattr(cfg, k) == field
                    ),
                    "columns",
                )
                raise ConfigError(
                    f"{self.name}: table {cfg.table!r} at {uri!r} has no field {field!r} (config key "
                    f"{key!r}; its fields: {schema.names})",
                    operator=self.name,
                    field=key,
                )
        if (
            cfg.mode != "vector"
            and _index_on(_indices(lance_table), cfg.text_field, ("FTS", "INVERTED")) is None
        ):
            raise ConfigError(
                f"{self.name}: mode {cfg.mode!r} needs a full-text index on {cfg.text_field!r} in table "
                f"{cfg.table!r} at {uri!r}; run LanceIndexer with fts: true (its finish() builds it) "
                "or use mode 'vector'",
                operator=self.name,
                field="mode",
            )
        if cfg.filter is not None:
            try:
                lance_table.search().where(cfg.filter).select([cfg.id_field]).limit(1).to_arrow()
            except Exception as exc:
                raise ConfigError(
                    f"{self.name}: config key 'filter' {cfg.filter!r} is not a valid filter on table "
                    f"{cfg.table!r}: {exc}",
                    operator=self.name,
                    field="filter",
                ) from None
        self._table: LanceTable = lance_table
        self._dim = (
            schema.field(cfg.vector_field).type.list_size
            if cfg.mode != "fts" and pa.types.is_fixed_size_list(schema.field(cfg.vector_field).type)
            else None
        )
        if cfg.mode != "fts":
            self._client: OpenAI = client(cfg, self.name)
            self.model: str = cfg.model or load_settings().embedding_model
        self._item_type = pa.struct(
            [
                pa.field("chunk_id", schema.field(cfg.id_field).type),
                pa.field("doc_id", schema.field(cfg.doc_field).type),
                pa.field("text", schema.field(cfg.text_field).type),
                pa.field("score", pa.float64()),
                *[schema.field(c) for c in cfg.columns if c not in ("chunk_id", "doc_id", "text", "score")],
            ]
        )
        self._ready = True

    # -- SAGE function interface -----------------------------------------------------------------
    def execute(self, data: Record) -> Record:
        """Retrieve for one record."""
        self.ensure_setup()
        if self.cfg.query_field not in data:
            raise RecordError(
                f"{self.name}: record has no field {self.cfg.query_field!r} (fields: {sorted(data)})",
                operator=self.name,
                field=self.cfg.query_field,
                row=0,
            )
        [(hits, ms)] = self.search([data[self.cfg.query_field]])
        return {
            **data,
            "retrieved": hits,
            "retrieved_ids": [h["chunk_id"] for h in hits],
            "latency_retrieve_ms": ms,
        }

    def execute_batch(self, table: pa.Table) -> pa.Table:
        """Retrieve for every row of the partition (queries embedded in one request)."""
        self.ensure_setup()
        field = self.cfg.query_field
        if field not in table.column_names and table.num_rows:
            raise RecordError(
                f"{self.name}: partition has no field {field!r} (fields: {table.column_names})",
                operator=self.name,
                field=field,
            )
        results = self.search(table.column(field).to_pylist()) if table.num_rows else []
        item_type = self._item_type
        id_type = item_type.field("chunk_id").type
        retrieved = pa.array([hits for hits, _ in results], type=pa.list_(item_type))
        ids = pa.array([[h["chunk_id"] for h in hits] for hits, _ in results], type=pa.list_(id_type))
        latency = pa.array([ms for _, ms in results], type=pa.float64())
        return with_columns(
            table, {"retrieved": retrieved, "retrieved_ids": ids, "latency_retrieve_ms": latency}
        )

    # -- retrieval -------------------------------------------------------------------------------
    def search(self, queries: Sequence[Any]) -> list[tuple[list[dict[str, Any]], float]]:
        """``(hits, latency_ms)`` per query, hits best first (see the class docs for scores)."""
        self.ensure_setup()
        cfg = self.cfg
        for row, query in enumerate(queries):
            if not isinstance(query, str):
                got = "null" if query is None else type(query).__name__
                raise RecordError(
                    f"{self.name}: row {row}: field {cfg.query_field!r} is {got}, expected the query text",
                    operator=self.name,
                    field=cfg.query_field,
                    row=row,
                )
        if not queries:
            return []
        vectors: np.ndarray | None = None
        embed_ms = 0.0
        if cfg.mode != "fts":
            started = time.perf_counter()
            vectors = embed_texts(
                self._client,
                self.model,
                list(queries),
                batch_size=2048,
                concurrency=4,
                operator=self.name,
                field=cfg.query_field,
            )
            embed_ms = (time.perf_counter() - started) * 1000 / len(queries)
            if self._dim is not None and vectors.shape[1] != self._dim:
                raise OperatorError(
                    f"{self.name}: model {self.model!r} gives {vectors.shape[1]}-dimensional vectors but "
                    f"field {cfg.vector_field!r} of table {cfg.table!r} holds {self._dim}; set config key "
                    "'model' to the model the table was embedded with",
                    operator=self.name,
                    field="model",
                )
        out: list[tuple[list[dict[str, Any]], float]] = []
        for row, query in enumerate(queries):
            started = time.perf_counter()
            try:
                hits = self._search_one(query, vectors[row] if vectors is not None else None)
            except (ConfigError, RecordError, OperatorError):
                raise
            except Exception as exc:
                raise OperatorError(
                    f"{self._describe()}: row {row}: {cfg.mode} search failed: {exc}",
                    operator=self.name,
                    row=row,
                ) from exc
            out.append((hits, (time.perf_counter() - started) * 1000 + embed_ms))
        return out

    def _search_one(self, query: str, vector: np.ndarray | None) -> list[dict[str, Any]]:
        cfg = self.cfg
        if cfg.mode == "vector":
            assert vector is not None
            return self._vector_hits(vector, cfg.top_k)
        if cfg.mode == "fts":
            return self._fts_hits(query, cfg.top_k)
        assert vector is not None
        depth = cfg.candidates or max(2 * cfg.top_k, 20)
        by_id: dict[Any, dict[str, Any]] = {}
        rankings: list[list[Any]] = []
        for hits in (self._vector_hits(vector, depth), self._fts_hits(query, depth)):
            rankings.append([h["chunk_id"] for h in hits])
            for h in hits:
                by_id.setdefault(h["chunk_id"], h)
        fused = reciprocal_rank_fusion(rankings, k=cfg.rrf_k)[: cfg.top_k]
        return [{**by_id[chunk_id], "score": score} for chunk_id, score in fused]

    def _columns(self) -> list[str]:
        cfg = self.cfg
        wanted = [cfg.id_field, cfg.doc_field, cfg.text_field, *cfg.columns]
        return list(dict.fromkeys(wanted))

    def _item(self, row: dict[str, Any], score: float) -> dict[str, Any]:
        cfg = self.cfg
        item = {
            "chunk_id": row[cfg.id_field],
            "doc_id": row[cfg.doc_field],
            "text": row[cfg.text_field],
            "score": float(score),
        }
        for column in cfg.columns:
            item.setdefault(column, row[column])
        return item

    def _vector_hits(self, vector: np.ndarray, limit: int) -> list[dict[str, Any]]:
        cfg = self.cfg
        builder = cast(
            "LanceVectorQueryBuilder", self._table.search(vector, vector_column_name=cfg.vector_field)
        )
        query = builder.distance_type("cosine")
        if cfg.nprobes is not None:
            query = query.nprobes(cfg.nprobes)
        if cfg.ef is not None:
            query = query.ef(cfg.ef)
        if cfg.refine_factor is not None:
            query = query.refine_factor(cfg.refine_factor)
        if cfg.filter is not None:
            query = query.where(cfg.filter, prefilter=True)
        found = query.select([*self._columns(), cfg.vector_field, "_distance"]).limit(limit).to_arrow()
        if found.num_rows == 0:
            return []
        stored = found.column(cfg.vector_field).combine_chunks()
        matrix = stored.flatten().to_numpy(zero_copy_only=False).reshape(found.num_rows, -1)
        norms = np.linalg.norm(matrix, axis=1) * (np.linalg.norm(vector) or 1.0)
        scores = (matrix @ vector) / np.where(norms == 0, 1.0, norms)
        rows = found.select(self._columns()).to_pylist()
        order = sorted(range(len(rows)), key=lambda i: -scores[i])
        return [self._item(rows[i], float(scores[i])) for i in order]

    def _fts_hits(self, text: str, limit: int) -> list[dict[str, Any]]:
        cfg = self.cfg
        if not text.strip():
            return []
        query = self._table.search(text, query_type="fts", fts_columns=cfg.text_field)
        if cfg.filter is not None:
            query = query.where(cfg.filter, prefilter=True)
        found = query.select([*self._columns(), "_score"]).limit(limit).to_arrow()
        scores = found.column("_score").to_pylist()
        return [
            self._item(row, s)
            for row, s in zip(found.select(self._columns()).to_pylist(), scores, strict=True)
        ]
