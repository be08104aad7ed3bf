"""rag_index: a directory of documents -> chunks -> embeddings -> a LanceDB table.

Incremental: a document whose content hash is already in the table is skipped before it
is chunked or embedded, a changed document has all its chunks replaced in one commit,
and (``prune=True``) chunks of documents no longer in the directory, or no longer matching
their file (edited to blank), are deleted. Changing the chunking or the embedding model does
not re-index unchanged documents: index into a new table (``--table``) for that. Running
it twice on the same directory adds nothing the second time.

Run it::

    python flows/rag_index.py                       # the shipped docs, embedded defaults
    python flows/rag_index.py --docs-dir ~/notes --table notes
    sage-prefect flow run rag_index -p docs_dir=~/notes
    prefect deployment run rag_index/rag-index-nightly   # after `sage-prefect deploy`

Where it computes: ``SAGE_DASK_ADDRESS`` (an existing Dask scheduler) or a local cluster;
which control plane: ``SAGE_CONTROLPLANE_URL`` or an embedded one started for the run.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from sage_prefect.common.settings import command_line_defaults, load_settings
from sage_prefect.controlplane.server import connect_or_start
from sage_prefect.examples import DOCS_DIR
from sage_prefect.kernel import environment_from_settings
from sage_prefect.tasks import (
    CharacterChunker,
    Embedder,
    LanceIndexer,
    SkipIndexed,
    TextDirectorySource,
    TokenChunker,
)
from sage_prefect.tasks.rag.lance import prune_documents, table_rows


@flow(name="rag_index", log_prints=True)
def rag_index(
    docs_dir: str | None = None,
    table: str = "docs",
    lance_uri: str | None = None,
    chunker: Literal["character", "token"] = "character",
    chunk_size: int = 600,
    chunk_overlap: int = 80,
    embedding_model: str | None = None,
    prune: bool = True,
    documents_per_partition: int | None = None,
) -> dict[str, Any]:
    """Index ``docs_dir`` (default: the project's shipped docs) into LanceDB table ``table``.

    ``documents_per_partition`` unset: an eighth of the documents, between 16 and 1024 (a few
    partitions per worker to pipeline over, without paying per-task overhead thousands of times).
    """
    settings = load_settings()
    docs = str(Path(docs_dir).expanduser().resolve()) if docs_dir else str(DOCS_DIR)
    uri = lance_uri or str(settings.lance_dir)
    chunker_cls = TokenChunker if chunker == "token" else CharacterChunker
    source = {"path": docs}
    listed = len(TextDirectorySource(source).document_ids())
    per_partition = documents_per_partition or min(1024, max(16, math.ceil(listed / 8)))
    with connect_or_start() as base_url:
        env = environment_from_settings("rag_index-pipeline", settings, batch_size=per_partition)
        with env:
            (
                env.from_source(TextDirectorySource, source)
                .filter(SkipIndexed, {"uri": uri, "table": table})
                .flatmap(chunker_cls, {"size": chunk_size, "overlap": chunk_overlap})
                .map(Embedder, {"base_url": base_url, "model": embedding_model})
                .sink(LanceIndexer, {"uri": uri, "table": table})
            )
            result = env.submit()
    # Listed again after the run: a file added meanwhile was indexed and must not be pruned.
    # With the current hashes, chunks of a file edited into one with no chunks (blank) go too.
    current = TextDirectorySource(source).document_hashes()
    pruned = prune_documents(uri, table, keep_doc_ids=current) if prune else 0
    summary = {
        "docs_dir": docs,
        "documents": len(current),
        "chunks_written": result.rows,
        "chunks_pruned": pruned,
        "table_rows": table_rows(uri, table),
        "lance_uri": uri,
        "table": table,
        "pipeline_flow_run_id": result.flow_run_id,
    }
    create_markdown_artifact(
        key="rag-index-summary",
        markdown="## rag_index\n\n" + "\n".join(f"- **{k}**: `{v}`" for k, v in summary.items()),
        description=f"LanceDB table {table!r} at {uri}",
    )
    print(
        f"rag_index: {summary['documents']} documents, {summary['chunks_written']} chunks written, "
        f"{pruned} pruned; table {table!r} now has {summary['table_rows']} rows at {uri}"
    )
    return summary


def main(argv: list[str] | None = None) -> None:
    command_line_defaults()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--docs-dir", default=None, help="directory of .md/.txt files (default: shipped docs)"
    )
    parser.add_argument("--table", default="docs")
    parser.add_argument(
        "--lance-uri", default=None, help="LanceDB directory or URI (default: $SAGE_HOME/lancedb)"
    )
    parser.add_argument("--chunker", choices=["character", "token"], default="character")
    parser.add_argument("--chunk-size", type=int, default=600)
    parser.add_argument("--chunk-overlap", type=int, default=80)
    args = parser.parse_args(argv)
    summary = rag_index(
        docs_dir=args.docs_dir,
        table=args.table,
        lance_uri=args.lance_uri,
        chunker=args.chunker,
        chunk_size=args.chunk_size,
        chunk_overlap=args.chunk_overlap,
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":  # Dask process workers re-import this file: keep the run behind this guard
    main()
