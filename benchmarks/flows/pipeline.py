"""Pipeline benchmark: end-to-end RAG indexing + QA throughput and per-stage latency, as a
Prefect flow logged to MLflow (experiment ``pipeline``).

It runs the project's own flows, ``flows/rag_index.py`` then ``flows/rag_qa.py``, as subflows
on a fresh LanceDB directory: the corpus is the shipped docs (or ``docs_dir``) copied
``copies`` times (each copy's text differs, so nothing is deduplicated), the questions are the
shipped ``rag_questions.jsonl`` (or ``questions``). Where they compute: the embedded defaults
(a local Dask cluster per pipeline) or, with ``dask_address``, an existing Dask scheduler
(``SAGE_DASK_ADDRESS`` for the run). One control plane (``SAGE_CONTROLPLANE_URL``, else an
embedded one started before the clock starts) serves both flows.

Logged: parameters (corpus, copies, cluster, chunking, retrieval, models, partition sizes,
git commit, machine); metrics ``index_seconds``, ``index_documents_per_s``,
``index_chunks_per_s``, ``qa_seconds``, ``qa_questions_per_s``, the per-stage latency
percentiles of the answers (``latency_<stage>_ms_p50``/``_p90``: retrieve, rerank, generate)
and answer quality where the questions carry gold fields; artifacts: the summary and the
per-question latencies as JSON and a bar plot of the stage latencies.

Run::

    sage-prefect bench run pipeline                         # embedded defaults
    sage-prefect bench run pipeline -p copies=16 -p dask_address=tcp://10.0.0.5:8786
    python benchmarks/flows/pipeline.py --copies 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.flows import load_flow_from_entrypoint

from sage_prefect.benchmark.plots import grouped_bars
from sage_prefect.benchmark.tracking import benchmark_run, publish_table, runs_table
from sage_prefect.common.errors import ConfigError
from sage_prefect.common.settings import command_line_defaults, load_settings
from sage_prefect.controlplane.server import connect_or_start
from sage_prefect.examples import DOCS_DIR, QUESTIONS_PATH

ROOT = Path(__file__).resolve().parents[2]
HEADLINE = ("index_chunks_per_s", "qa_questions_per_s", "latency_retrieve_ms_p50", "latency_generate_ms_p50")


def build_corpus(source: Path, copies: int, target: Path) -> int:
    """``copies`` copies of the ``.md``/``.txt`` files of ``source`` in ``target`` (each copy's
    text ends differently, so content hashes differ); returns the number of files written."""
    files = sorted(p for p in source.rglob("*") if p.suffix in (".md", ".txt") and p.is_file())
    if not files:
        raise ConfigError(
            f"pipeline benchmark: no .md/.txt files in {source}", field="docs_dir", file=str(source)
        )
    target.mkdir(parents=True, exist_ok=True)
    for i in range(copies):
        for path in files:
            text = path.read_text(encoding="utf-8")
            (target / f"{path.stem}-copy{i:03d}{path.suffix}").write_text(
                f"{text.rstrip()}\n\n(Copy {i} of {path.name}.)\n", encoding="utf-8"
            )
    return len(files) * copies


@contextmanager
def _dask_address(address: str | None) -> Iterator[None]:
    previous = os.environ.get("SAGE_DASK_ADDRESS")
    if address:
        os.environ["SAGE_DASK_ADDRESS"] = address
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("SAGE_DASK_ADDRESS", None)
        else:
            os.environ["SAGE_DASK_ADDRESS"] = previous


def _stage_latencies(uri: str, table: str) -> list[dict[str, Any]]:
    import lancedb

    answers = lancedb.connect(uri).open_table(table).to_arrow()
    cols = [c for c in answers.column_names if c.startswith("latency_") or c in ("id", "question")]
    return answers.select(cols).to_pylist()


@flow(name="bench-pipeline", log_prints=True)
def pipeline_bench(
    docs_dir: str | None = None,
    copies: int = 4,
    questions: str | None = None,
    dask_address: str | None = None,
    chunk_size: int = 600,
    chunk_overlap: int = 80,
    mode: Literal["vector", "fts", "hybrid"] = "hybrid",
    top_k: int = 4,
    max_tokens: int = 32,
    experiment: str = "pipeline",
    run_name: str | None = None,
) -> dict[str, Any]:
    """RAG index + QA end to end on a fresh LanceDB directory: throughput and per-stage latency."""
    if copies < 1:
        raise ConfigError("pipeline benchmark: copies must be >= 1", field="copies")
    settings = load_settings()
    source = Path(docs_dir).expanduser().resolve() if docs_dir else DOCS_DIR
    question_path = Path(questions).expanduser().resolve() if questions else QUESTIONS_PATH
    rag_index: Any = load_flow_from_entrypoint(str(ROOT / "flows" / "rag_index.py") + ":rag_index")
    rag_qa: Any = load_flow_from_entrypoint(str(ROOT / "flows" / "rag_qa.py") + ":rag_qa")
    work = Path(
        tempfile.mkdtemp(prefix="sage-bench-pipeline-", dir=settings.home if settings.home.is_dir() else None)
    )
    try:
        corpus, uri = work / "corpus", str(work / "lancedb")
        n_docs = build_corpus(source, copies, corpus)
        params = {
            "docs_dir": str(source),
            "copies": copies,
            "documents": n_docs,
            "questions": str(question_path),
            "cluster": dask_address or "embedded LocalCluster",
            "chunk_size": chunk_size,
            "chunk_overlap": chunk_overlap,
            "mode": mode,
            "top_k": top_k,
            "max_tokens": max_tokens,
            "embedding_model": settings.embedding_model,
            "llm_model": settings.llm_model,
            "batch_size": settings.batch_size,
        }
        with connect_or_start() as base_url, _dask_address(dask_address):
            params["controlplane_url"] = base_url
            started = time.perf_counter()
            index = rag_index(
                docs_dir=str(corpus),
                lance_uri=uri,
                chunk_size=chunk_size,
                chunk_overlap=chunk_overlap,
                prune=False,
            )
            index_s = time.perf_counter() - started
            started = time.perf_counter()
            qa = rag_qa(
                questions=str(question_path), lance_uri=uri, mode=mode, top_k=top_k, max_tokens=max_tokens
            )
            qa_s = time.perf_counter() - started
        per_question = _stage_latencies(uri, qa["answers_table"])
        metrics: dict[str, float] = {
            "index_seconds": index_s,
            "index_documents_per_s": n_docs / index_s,
            "index_chunks": float(index["chunks_written"]),
            "index_chunks_per_s": index["chunks_written"] / index_s,
            "qa_seconds": qa_s,
            "qa_questions": float(qa["rows"]),
            "qa_questions_per_s": qa["rows"] / qa_s,
        }
        for key, value in qa.items():
            if isinstance(value, int | float) and key.startswith(("latency_", "mean_")):
                metrics[key] = float(value)
        with benchmark_run(experiment, params, run_name=run_name or f"copies={copies}") as run:
            run.log_metrics(metrics)
            run.set_headline(HEADLINE)
            run.log_json(
                {"params": params, "metrics": metrics, "rag_index": index, "rag_qa": qa}, "summary.json"
            )
            run.log_json(per_question, "raw/per_question_latency.json")
            stages = {
                k[len("latency_") : -len("_ms_p50")]: {
                    "p50": v,
                    "p90": metrics.get(k[:-3] + "p90", float("nan")),
                }
                for k, v in metrics.items()
                if k.startswith("latency_") and k.endswith("_ms_p50")
            }
            if stages:
                run.log_figure(
                    grouped_bars(stages, f"per-stage latency, {qa['rows']} questions", "ms"),
                    "plots/stage_latency.png",
                )
            run_id, artifact_uri = run.run_id, run.artifact_uri
        table = runs_table(experiment, list(HEADLINE), ["copies", "cluster"], max_runs=10)
        publish_table(table, f"bench-{experiment}-runs", f"MLflow experiment {experiment!r}, newest first")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"pipeline: {n_docs} documents -> {index['chunks_written']} chunks in {index_s:.1f} s "
        f"({metrics['index_chunks_per_s']:.1f} chunks/s); {qa['rows']} questions in {qa_s:.1f} s"
    )
    return {"experiment": experiment, "mlflow_run_id": run_id, "artifact_uri": artifact_uri, **metrics}


def main(argv: list[str] | None = None) -> None:
    command_line_defaults()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs-dir", default=None)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--questions", default=None)
    parser.add_argument("--dask-address", default=None)
    args = parser.parse_args(argv)
    out = pipeline_bench(
        docs_dir=args.docs_dir, copies=args.copies, questions=args.questions, dask_address=args.dask_address
    )
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":  # Dask process workers re-import this file: keep the run behind this guard
    main()
