"""File sources (JSONL, CSV, Parquet, text directories) and the chunkers, on real files.

Covers batching, the records' fields, errors that name the operator, file, line and key,
exact chunk offsets and overlap, and both ways of running an operator: as a Prefect task in
a ``@flow`` and as a stage of a pipeline on a local Dask cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sage_prefect.common.errors import ConfigError, RecordError
from sage_prefect.data import CollectSink
from sage_prefect.tasks.io import (
    CSVSource,
    JSONLSink,
    JSONLSource,
    LanceSink,
    ParquetSink,
    ParquetSource,
    TextDirectorySource,
    markdown_title,
)
from sage_prefect.tasks.rag.chunking import (
    CharacterChunker,
    TokenChunker,
    bundled_tokenizer_dir,
    load_tokenizer,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.timeout(180)

PROSE = (
    "# Retrieval pipelines\n\n"
    "A retrieval pipeline reads documents, cuts them into chunks and embeds every chunk. "
    "Queries are embedded the same way; the nearest chunks are handed to the model.\n\n"
    "Chunk size is a trade-off! Small chunks retrieve precisely, large ones keep context. "
    "Overlap keeps a sentence that straddles a cut whole in at least one chunk?\n"
    "Naïve café owners say “déjà vu” — unbelievably often. 日本語のテキストも入ります。\n\n\n"
    "   Trailing paragraph with    irregular   spacing and a verylongwordwithoutanybreakswhatsoever "
    "that forces hard cuts when the window is small.   \n"
)


def drain(source: Any) -> list[Any]:
    """Every ``execute()`` result up to and including the final None."""
    source.setup()
    out = []
    while True:
        batch = source.execute()
        out.append(batch)
        if batch is None:
            return out


# --------------------------------------------------------------------------- JSONL


def test_jsonl_source_batches_skips_blank_lines_and_restarts(tmp_path: Path) -> None:
    rows = [{"id": i, "text": f"row {i}", "tags": ["a"] * (i % 3)} for i in range(7)]
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "   ")
    lines.insert(1, "")
    file = tmp_path / "rows.jsonl"
    file.write_text("\n".join(lines) + "\n", encoding="utf-8")

    source = JSONLSource({"path": str(file), "batch_size": 3})
    batches = drain(source)
    assert [len(b) for b in batches[:-1]] == [3, 3, 1] and batches[-1] is None
    assert [r for b in batches[:-1] for r in b] == rows
    # run() drains the source; after the end it starts over, so a second run() sees everything again.
    assert source.run() == rows
    assert source.run() == rows
    # A PathLike path is accepted too.
    assert JSONLSource({"path": file}).run() == rows


def test_jsonl_source_reads_a_directory_written_by_jsonl_sink(tmp_path: Path) -> None:
    assert JSONLSink.__module__ == "sage_prefect.data.sinks"  # the data layer's sink, re-exported
    sink = JSONLSink({"path": str(tmp_path / "out")})
    sink.write_partition(pa.table({"id": [1, 2], "text": ["a", "b"]}), "p0")
    sink.write_partition(pa.table({"id": [3], "text": ["c"]}), "p1")
    rows = JSONLSource({"path": str(tmp_path / "out"), "batch_size": 2}).run()
    assert sorted(r["id"] for r in rows) == [1, 2, 3]


@pytest.mark.parametrize(
    ("content", "line", "fragment"),
    [
        (b'{"id": 1}\n\n{"id": 2,}\n', 3, "invalid JSON"),
        (b'{"id": 1}\n[1, 2]\n', 2, "expected a JSON object, got a list"),
        (b'{"id": 1}\n{"id": 2}\n"text"\n', 3, "got a string"),
        (b'{"id": 1}\n{"text": "caf\xe9"}\n', 2, "not UTF-8"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path: Path, content: bytes, line: int, fragment: str) -> None:
    file = tmp_path / "bad.jsonl"
    file.write_bytes(content)
    with pytest.raises(RecordError) as info:
        JSONLSource({"path": str(file)}).run()
    exc = info.value
    assert f"{file}:{line}:" in str(exc) and fragment in str(exc)
    assert str(exc).startswith("JSONLSource: ")
    assert exc.file == str(file) and exc.line == line and exc.operator == "JSONLSource"


# --------------------------------------------------------------------------- CSV


def test_csv_source_batches_types_and_delimiter(tmp_path: Path) -> None:
    file = tmp_path / "rows.csv"
    file.write_text("id;name;score\n" + "".join(f"{i};name {i};{i / 2}\n" for i in range(10)))
    source = CSVSource({"path": str(file), "batch_size": 4, "delimiter": ";"})
    batches = drain(source)
    assert all(isinstance(b, pa.Table) for b in batches[:-1]) and batches[-1] is None
    assert [b.num_rows for b in batches[:-1]] == [4, 4, 2]
    table = pa.concat_tables(batches[:-1])
    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("score").type == pa.float64()
    assert table.column("name").to_pylist() == [f"name {i}" for i in range(10)]
    assert source.run()[9] == {"id": 9, "name": "name 9", "score": 4.5}


def test_csv_source_malformed_row_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "broken.csv"
    file.write_text("id,text\n1,a\n2,b,extra\n")
    with pytest.raises(RecordError, match=r"CSVSource: .*broken\.csv: .*Expected 2 columns, got 3") as info:
        CSVSource({"path": str(file)}).run()
    assert info.value.file == str(file)


# --------------------------------------------------------------------------- Parquet


def test_parquet_source_file_directory_and_columns(tmp_path: Path) -> None:
    file = tmp_path / "one.parquet"
    table = pa.table({"id": list(range(25)), "text": [f"t{i}" for i in range(25)]})
    pq.write_table(table, file, row_group_size=7)
    batches = drain(ParquetSource({"path": str(file), "batch_size": 10}))
    assert [b.num_rows for b in batches[:-1]] == [10, 10, 5]
    assert pa.concat_tables(batches[:-1]).equals(table)

    out = tmp_path / "dataset"
    sink = ParquetSink({"path": str(out)})
    sink.write_partition(table.slice(0, 12), "p0")
    sink.write_partition(table.slice(12), "p1")
    rows = ParquetSource({"path": str(out), "columns": ["text"], "batch_size": 5}).run()
    assert sorted(r["text"] for r in rows) == sorted(table.column("text").to_pylist())
    assert all(set(r) == {"text"} for r in rows)


def test_parquet_source_errors_name_file_and_key(tmp_path: Path) -> None:
    file = tmp_path / "one.parquet"
    pq.write_table(pa.table({"id": [1]}), file)
    with pytest.raises(ConfigError, match="has no column 'nope'") as info:
        ParquetSource({"path": str(file), "columns": ["id", "nope"]}).run()
    assert info.value.field == "columns" and info.value.file == str(file)

    # Files of a directory are opened one by one; a later file lacking the column is named too.
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    pq.write_table(pa.table({"id": [1], "text": ["a"]}), dataset / "a.parquet")
    pq.write_table(pa.table({"id": [2]}), dataset / "b.parquet")
    with pytest.raises(ConfigError, match=r"b\.parquet has no column 'text'") as info:
        ParquetSource({"path": str(dataset), "columns": ["text"]}).run()
    assert info.value.field == "columns" and info.value.operator == "ParquetSource"

    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet at all")
    with pytest.raises(RecordError, match=r"ParquetSource: .*fake\.parquet: "):
        ParquetSource({"path": str(fake)}).run()


# --------------------------------------------------------------------------- text directory


def make_corpus(root: Path) -> dict[str, bytes]:
    files = {
        "guide/intro.md": b"Preface line\n\n```sh\n# not a title\n```\n#  Getting started #\n\nBody.\n",
        "notes.txt": b"Plain notes without a heading.\n",
        "a.md": b"## Sub only\ntext\n",
        "deep/er/z.md": b"# Zed\n",
        "bom.md": b"\xef\xbb\xbf# With BOM\nbody\n",
        "skipped.rst": b"Title\n=====\n",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_text_directory_source_records_exactly(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    files = make_corpus(root)
    source = TextDirectorySource({"path": str(root), "batch_size": 2})
    batches = drain(source)
    assert [len(b) for b in batches[:-1]] == [2, 2, 1] and batches[-1] is None
    records = [r for b in batches[:-1] for r in b]
    assert [r["doc_id"] for r in records] == ["a.md", "bom.md", "deep/er/z.md", "guide/intro.md", "notes.txt"]
    titles = {r["doc_id"]: r["title"] for r in records}
    assert titles == {
        "a.md": "a",
        "bom.md": "With BOM",
        "deep/er/z.md": "Zed",
        "guide/intro.md": "Getting started",
        "notes.txt": "notes",
    }
    for record in records:
        data = files[record["doc_id"]]
        assert set(record) == {"doc_id", "path", "title", "text", "content_hash"}
        assert Path(record["path"]).is_absolute()
        assert Path(record["path"]) == (root / record["doc_id"]).resolve()
        assert record["content_hash"] == hashlib.sha256(data).hexdigest()
        assert record["text"] == data.decode("utf-8-sig")
    # Patterns choose the files; the order stays by doc_id.
    only_md = TextDirectorySource({"path": root, "patterns": ["*.md"]}).run()
    assert [r["doc_id"] for r in only_md] == ["a.md", "bom.md"]


def test_markdown_title_rules() -> None:
    assert markdown_title("#NoSpace\n# Real\n") == "Real"
    assert markdown_title("~~~\n# fenced\n~~~\n# After fence\n") == "After fence"
    assert markdown_title("#\n## two\n") is None


def test_text_directory_undecodable_file_and_missing_directory(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "good.md").write_text("# Good\n")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(RecordError, match=r"latin1\.txt: does not decode as utf-8") as info:
        TextDirectorySource({"path": str(root)}).run()
    assert info.value.file == str((root / "latin1.txt").resolve())
    assert info.value.operator == "TextDirectorySource"
    # With the right encoding the same file reads.
    rows = TextDirectorySource({"path": str(root), "patterns": ["*.txt"], "encoding": "latin-1"}).run()
    assert rows[0]["text"] == "café crème"

    missing = TextDirectorySource({"path": str(tmp_path / "nowhere")})  # declared fine: checked at setup
    with pytest.raises(
        ConfigError, match=r"TextDirectorySource: config key 'path': .*nowhere.* does not exist"
    ) as err:
        missing.run()
    assert err.value.operator == "TextDirectorySource" and err.value.field == "path"


@pytest.mark.parametrize("cls", [JSONLSource, CSVSource, ParquetSource, TextDirectorySource])
def test_missing_path_is_a_config_error_at_setup(tmp_path: Path, cls: type[Any]) -> None:
    source = cls({"path": str(tmp_path / "missing.data")})
    with pytest.raises(ConfigError) as info:
        source.setup()
    assert info.value.operator == cls.__name__ and info.value.field == "path"
    assert "missing.data" in str(info.value) and str(info.value).startswith(f"{cls.__name__}: ")


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("cls", "config", "field", "fragment"),
    [
        (JSONLSource, {"path": "x.jsonl", "batchsize": 5}, "batchsize", "unknown config key"),
        (JSONLSource, {"path": "x.jsonl", "batch_size": "5"}, "batch_size", "valid integer"),
        (JSONLSource, {}, "path", "is required"),
        (CSVSource, {"path": "x.csv", "delimiter": ";;"}, "delimiter", "one character"),
        (ParquetSource, {"path": "x", "batch_size": 0}, "batch_size", "greater than 0"),
        (ParquetSource, {"path": "x", "columns": "id"}, "columns", "valid list"),
        (TextDirectorySource, {"path": "d", "encoding": "klingon"}, "encoding", "unknown text encoding"),
        (TextDirectorySource, {"path": "d", "patterns": ["../*.md"]}, "patterns", "relative"),
        (TextDirectorySource, {"path": 3}, "path", "valid string"),
        (CharacterChunker, {"size": 100, "overlap": 100}, "overlap", "less than size (100)"),
        (CharacterChunker, {"size": 0}, "size", "greater than 0"),
        (CharacterChunker, {"size": 10, "overlap": -1}, "overlap", "greater than or equal to 0"),
        (CharacterChunker, {"size": 10.0}, "size", "valid integer"),
        (TokenChunker, {"size": 10, "tokenizer": 5}, "tokenizer", "valid string"),
        (TokenChunker, {"size": 10, "overlapp": 2}, "overlapp", "unknown config key"),
    ],
)
def test_config_errors_name_operator_and_key(
    cls: type[Any], config: dict[str, Any], field: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        cls(config)
    assert info.value.operator == cls.__name__
    assert info.value.field == field
    assert fragment in str(info.value) and f"'{field}'" in str(info.value)


def test_token_chunker_tokenizer_location_is_local_only(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="never downloaded") as info:
        TokenChunker({"size": 8, "tokenizer": "sentence-transformers/all-MiniLM-L6-v2"}).setup()
    assert info.value.field == "tokenizer" and info.value.operator == "TokenChunker"
    # A directory holding tokenizer.json, and one with only the vocabulary (built by transformers).
    bundled = bundled_tokenizer_dir()
    with_json = tmp_path / "json"
    with_json.mkdir()
    shutil.copy(bundled / "tokenizer.json", with_json)
    vocab_only = tmp_path / "vocab"
    vocab_only.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundled / name, vocab_only)
    text = "Chunkers count tokens, not characters."
    expected = load_tokenizer(None).encode(text, add_special_tokens=False).tokens
    for location in (with_json, vocab_only):
        tokenizer = load_tokenizer(str(location))
        assert tokenizer.encode(text, add_special_tokens=False).tokens == expected


# --------------------------------------------------------------------------- chunkers


DOC = {
    "doc_id": "guide/rag.md",
    "title": "RAG",
    "path": "/abs/rag.md",
    "content_hash": "ab" * 32,
    "text": PROSE,
}


def check_chunks(chunks: list[dict[str, Any]], doc: dict[str, Any], text_field: str = "text") -> None:
    """Fields carried, ids and indices in order, offsets exact, edges trimmed, no content lost."""
    text = doc[text_field]
    assert chunks, "no chunks"
    assert [c["chunk_index"] for c in chunks] == list(range(len(chunks)))
    assert [c["chunk_id"] for c in chunks] == [f"{doc['doc_id']}#{i}" for i in range(len(chunks))]
    covered = [False] * len(text)
    for chunk in chunks:
        assert {k: v for k, v in chunk.items() if k in doc and k != text_field} == {
            k: v for k, v in doc.items() if k != text_field
        }
        assert set(chunk) == set(doc) | {"chunk_id", "chunk_index", "start", "end"}
        start, end = chunk["start"], chunk["end"]
        assert text[start:end] == chunk[text_field]
        assert chunk[text_field].strip() == chunk[text_field] != ""
        for i in range(start, end):
            covered[i] = True
    assert all(covered[i] for i, ch in enumerate(text) if not ch.isspace()), "a character is in no chunk"
    assert [c["start"] for c in chunks] == sorted(c["start"] for c in chunks)


@pytest.mark.parametrize(("size", "overlap"), [(60, 0), (60, 15), (25, 24), (7, 3), (400, 50), (5000, 10)])
def test_character_chunker_offsets_size_and_overlap(size: int, overlap: int) -> None:
    chunker = CharacterChunker({"size": size, "overlap": overlap})
    chunks = chunker.run([DOC])
    check_chunks(chunks, DOC)
    assert all(len(c["text"]) <= size for c in chunks)
    for prev, nxt in zip(chunks, chunks[1:], strict=False):
        shared = prev["end"] - nxt["start"]
        assert shared <= overlap, (prev, nxt)
        assert nxt["start"] > prev["start"]
    if overlap and size < len(PROSE):
        assert any(prev["end"] > nxt["start"] for prev, nxt in zip(chunks, chunks[1:], strict=False))
    assert chunker.run([DOC]) == chunks  # deterministic


def test_character_chunker_hard_cuts_share_exactly_overlap() -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(100))
    chunks = CharacterChunker({"size": 30, "overlap": 10}).run([{"doc_id": "x", "text": text}])
    assert [(c["start"], c["end"]) for c in chunks] == [(0, 30), (20, 50), (40, 70), (60, 90), (80, 100)]


def test_character_chunker_prefers_paragraph_then_sentence_then_space() -> None:
    chunker = CharacterChunker({"size": 40})
    para = "First paragraph, short. More words.\n\nNext paragraph starts here and goes on."
    assert chunker.run([{"doc_id": "p", "text": para}])[0]["text"] == "First paragraph, short. More words."
    # A sentence end in the last fifth of the window beats the later whitespace at index 40.
    sentence = "Alpha beta gamma delta epsilon zeta. Eta theta iota kappa lambda."
    assert (
        chunker.run([{"doc_id": "s", "text": sentence}])[0]["text"] == "Alpha beta gamma delta epsilon zeta."
    )
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    assert (
        chunker.run([{"doc_id": "w", "text": words}])[0]["text"] == "alpha beta gamma delta epsilon zeta eta"
    )
    # Nothing to cut at in the last fifth: the second half of the window is searched.
    early = "Alpha beta gamma delta eps. Zetaetathetaiotakappalambdamu more"
    assert chunker.run([{"doc_id": "e", "text": early}])[0]["text"] == "Alpha beta gamma delta eps."
    # Nothing in the second half either: a hard cut after exactly `size` characters.
    hard = "Tiny " + "x" * 60
    assert [c["text"] for c in chunker.run([{"doc_id": "h", "text": hard}])] == ["Tiny " + "x" * 35, "x" * 25]


def test_chunkers_drop_blank_documents_and_check_fields() -> None:
    for chunker in (CharacterChunker({"size": 10}), TokenChunker({"size": 4})):
        assert chunker.run([{"doc_id": "blank", "text": " \n\t  \n"}, {"doc_id": "empty", "text": ""}]) == []
        with pytest.raises(RecordError, match="no 'doc_id' field") as info:
            chunker.run([{"id": 1, "text": "some text"}])
        assert info.value.field == "doc_id" and info.value.operator == type(chunker).__name__
        with pytest.raises(RecordError, match=r"document 'd': field 'text' must be a string \(int\)"):
            chunker.run([{"doc_id": "d", "text": 5}])


def test_chunkers_honour_text_and_id_fields() -> None:
    doc = {"key": 7, "body": "One two three four five six seven eight nine ten.", "lang": "en"}
    for chunker in (
        CharacterChunker({"size": 20, "overlap": 5, "text_field": "body", "id_field": "key"}),
        TokenChunker({"size": 4, "overlap": 1, "text_field": "body", "id_field": "key"}),
    ):
        chunks = chunker.run([doc])
        assert len(chunks) > 1
        assert all("text" not in c and c["lang"] == "en" and c["key"] == 7 for c in chunks)
        assert [c["chunk_id"] for c in chunks] == [f"7#{i}" for i in range(len(chunks))]
        assert all(doc["body"][c["start"] : c["end"]] == c["body"] for c in chunks)


@pytest.mark.parametrize(("size", "overlap"), [(16, 0), (16, 4), (5, 4), (64, 8), (1000, 0)])
def test_token_chunker_offsets_size_and_overlap(size: int, overlap: int) -> None:
    chunker = TokenChunker({"size": size, "overlap": overlap})
    chunks = chunker.run([DOC])
    check_chunks(chunks, DOC)
    encoding = load_tokenizer(None).encode(PROSE, add_special_tokens=False)
    starts = [s for s, _ in encoding.offsets]

    def tokens_in(start: int, end: int) -> set[int]:
        return {i for i, (s, e) in enumerate(encoding.offsets) if s >= start and e <= end}

    for chunk in chunks:
        # Chunks begin on a token's first character and hold at most `size` tokens.
        assert chunk["start"] in starts
        assert 0 < len(tokens_in(chunk["start"], chunk["end"])) <= size
    for prev, nxt in zip(chunks, chunks[1:], strict=False):
        shared = tokens_in(prev["start"], prev["end"]) & tokens_in(nxt["start"], nxt["end"])
        assert len(shared) <= overlap
    if overlap:
        assert any(prev["end"] > nxt["start"] for prev, nxt in zip(chunks, chunks[1:], strict=False))
    if size >= len(encoding.offsets):
        assert len(chunks) == 1
    assert len({c["chunk_id"] for c in chunks}) == len(chunks)


def test_chunk_ids_unique_across_documents() -> None:
    docs = [{"doc_id": f"d{i}", "text": PROSE[i * 40 :]} for i in range(5)]
    for chunker in (CharacterChunker({"size": 80, "overlap": 20}), TokenChunker({"size": 20, "overlap": 5})):
        chunks = chunker.run(docs)
        assert len({c["chunk_id"] for c in chunks}) == len(chunks) > 5
        for c in chunks:
            doc = docs[int(c["doc_id"][1:])]
            assert doc["text"][c["start"] : c["end"]] == c["text"]


def test_chunkers_run_on_tables_and_survive_pickling() -> None:
    import pickle

    table = pa.table({"doc_id": ["a", "b"], "text": ["Alpha beta gamma delta.", "Epsilon zeta."]})
    for chunker in (CharacterChunker({"size": 12}), TokenChunker({"size": 3})):
        out = chunker.run(table)
        assert isinstance(out, pa.Table)
        assert out.column_names == ["doc_id", "chunk_id", "chunk_index", "text", "start", "end"]
        again = pickle.loads(pickle.dumps(chunker))  # set up: the tokenizer stays behind
        assert "_tokenizer" not in again.__dict__
        assert again.run(table).equals(out)


# --------------------------------------------------------------------------- Prefect and pipelines


def test_operators_run_as_prefect_tasks_in_a_flow(prefect_api: str, tmp_path: Path) -> None:
    from prefect import flow

    root = tmp_path / "corpus"
    make_corpus(root)
    source = TextDirectorySource({"path": str(root), "patterns": ["**/*.md"]})
    chunker = CharacterChunker({"size": 24, "overlap": 6})
    sink_dir = tmp_path / "out"

    @flow(name=f"io-test-{uuid.uuid4().hex[:6]}")
    def chunk_corpus() -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
        docs = source.as_task(retries=1)()
        chunks = chunker.as_task()(docs)
        direct = chunker.run(docs)
        written = JSONLSink({"path": str(sink_dir)}).write_partition(pa.Table.from_pylist(chunks), "all")
        return chunks, direct, written

    chunks, direct, written = chunk_corpus()
    assert chunks == direct and written == len(chunks)
    assert {c["doc_id"] for c in chunks} == {"a.md", "bom.md", "deep/er/z.md", "guide/intro.md"}
    assert JSONLSource({"path": str(sink_dir)}).run() == chunks
    assert LanceSink.__module__ == "sage_prefect.data.sinks"


def test_pipeline_text_directory_to_character_chunks(
    prefect_api: str, sage_home: Path, tmp_path: Path
) -> None:
    from sage_prefect.kernel.environment import LocalEnvironment

    root = tmp_path / "corpus"
    make_corpus(root)
    for i in range(6):
        (root / f"more-{i}.txt").write_text(f"Document {i}. " + PROSE)
    config = {"path": str(root), "batch_size": 3}
    expected = CharacterChunker({"size": 120, "overlap": 20}).run(TextDirectorySource(config).run())

    env = LocalEnvironment("io-chunks", n_cpu_workers=1, processes=False, batch_size=4, progress=False)
    try:
        (
            env.from_source(TextDirectorySource, config)
            .flatmap(CharacterChunker, {"size": 120, "overlap": 20})
            .sink(CollectSink)
        )
        result = env.submit()
    finally:
        env.close()
    assert result.rows_in == 11 and result.partitions == 3
    rows = result.to_pylist()
    assert sorted(rows, key=lambda r: (r["doc_id"], r["chunk_index"])) == sorted(
        expected, key=lambda r: (r["doc_id"], r["chunk_index"])
    )
    assert len({r["chunk_id"] for r in rows}) == len(rows)


def test_setup_runs_once_whether_the_kernel_or_run_calls_it() -> None:
    """The kernel calls setup() itself; run()/as_task() must not load the model a second time."""
    from sage_prefect.tasks import QAPromptor

    calls: list[int] = []

    class Counting(QAPromptor):
        def setup(self) -> None:
            calls.append(1)
            super().setup()

    op = Counting({})
    op.setup()
    op.run([{"question": "q", "retrieved": []}])
    assert len(calls) == 1
