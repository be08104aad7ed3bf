"""rag_qa: questions -> retrieve -> rerank -> prompt -> generate -> an answers table.

Each answer row keeps the question, the retrieved chunk ids (best first), the chunk ids the
prompt cited, the answer, token counts and the latency of each stage (retrieve, rerank,
generate). When the questions carry gold fields (``answers``, ``relevant_ids``) the rows are
scored too (exact match, answer contained, token F1, recall@k, MRR) and the flow reports the
means. The answers (question, answer, cited ids, scores) are published as a table artifact on
the flow run.

On the embedded defaults the chat model is SmolLM2-135M-Instruct, a real but small model:
retrieval is sound, and 8 of its 16 answers to the shipped questions contain the gold answer
(README, "Quickstart time and answers"). One retrieved passage per prompt by default
(``context_chunks``): with two, the same model got 5 of 16 and spent twice as long in prefill.
Point ``SAGE_CONTROLPLANE_URL`` (or ``--llm-model`` on a control plane that
serves one) at a larger model, e.g. a vLLM server, for better answers.

Run it (after ``rag_index``)::

    python flows/rag_qa.py
    python flows/rag_qa.py --questions my_questions.jsonl --mode vector --top-k 3
    sage-prefect flow run rag_qa -p questions=my_questions.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_table_artifact

from sage_prefect.common.errors import ConfigError
from sage_prefect.common.settings import command_line_defaults, load_settings
from sage_prefect.controlplane.server import connect_or_start
from sage_prefect.data import replace_table
from sage_prefect.examples import QUESTIONS_PATH
from sage_prefect.kernel import environment_from_settings
from sage_prefect.tasks import (
    MRR,
    AnswerContains,
    ExactMatch,
    Generator,
    JSONLSource,
    LanceRetriever,
    LanceSink,
    QAPromptor,
    RecallAtK,
    Reranker,
    TokenF1,
)
from sage_prefect.tasks.rag.evaluate import latency_summary

METRICS = ("exact_match", "answer_contains", "token_f1", "recall_at_k", "mrr")
ARTIFACT_FIELDS = ("id", "question", "answer", "cited_ids", *METRICS)


@flow(name="rag_qa", log_prints=True)
def rag_qa(
    questions: str | None = None,
    table: str = "docs",
    answers_table: str = "answers",
    lance_uri: str | None = None,
    mode: Literal["vector", "fts", "hybrid"] = "hybrid",
    candidates: int = 8,
    top_k: int = 4,
    rerank: Literal["auto", "cross-encoder", "score"] = "auto",
    reranker_model: str | None = None,
    llm_model: str | None = None,
    context_chunks: int = 1,
    max_tokens: int = 48,
    slo_class: str = "batch",
    questions_per_partition: int = 8,
) -> dict[str, Any]:
    """Answer every question of ``questions`` (JSONL with a ``question`` field) from table ``table``."""
    settings = load_settings()
    path = Path(questions).expanduser().resolve() if questions else QUESTIONS_PATH
    uri = lance_uri or str(settings.lance_dir)
    gold = _gold_fields(path)
    staging = f"{answers_table}.staging"
    with connect_or_start() as base_url:
        env = environment_from_settings("rag_qa-pipeline", settings, batch_size=questions_per_partition)
        with env:
            stream = (
                env.from_source(JSONLSource, {"path": str(path)})
                .map(
                    LanceRetriever,
                    {
                        "base_url": base_url,
                        "uri": uri,
                        "table": table,
                        "mode": mode,
                        "top_k": max(candidates, top_k),
                    },
                )
                .map(Reranker, {"method": rerank, "model": reranker_model, "top_k": top_k})
                .map(QAPromptor, {"max_chunks": context_chunks})
                .map(
                    Generator,
                    {
                        "base_url": base_url,
                        "model": llm_model,
                        "max_tokens": max_tokens,
                        "slo_class": slo_class,
                    },
                )
            )
            if "answers" in gold:
                stream = stream.map(ExactMatch, {}).map(AnswerContains, {}).map(TokenF1, {})
            if "relevant_ids" in gold:
                stream = stream.map(RecallAtK, {"k": top_k, "level": "doc"}).map(MRR, {"level": "doc"})
            stream.sink(LanceSink, {"uri": uri, "table": staging, "mode": "overwrite"})
            result = env.submit()
    replace_table(uri, staging, answers_table)  # the previous table stays until this run's rows are complete
    summary = summarize_answers(uri, answers_table)
    summary.update(
        questions=str(path),
        answers_table=answers_table,
        lance_uri=uri,
        pipeline_flow_run_id=result.flow_run_id,
    )
    create_table_artifact(
        key="rag-qa-summary",
        table=[{"metric": k, "value": v} for k, v in summary.items()],
        description=f"rag_qa over {path.name}: answers in LanceDB table {answers_table!r} at {uri}",
    )
    create_table_artifact(
        key="rag-qa-answers",
        table=answer_rows(uri, answers_table),
        description=f"rag_qa answers to {path.name} (table {answers_table!r} at {uri}), scored where gold answers exist",
    )
    print(f"rag_qa: {summary['rows']} answers in table {answers_table!r} at {uri}")
    for key, value in summary.items():
        if key.startswith(("latency_", "mean_")):
            print(f"  {key}: {value}")
    return summary


def summarize_answers(uri: str, table: str) -> dict[str, Any]:
    """Rows, the mean of each metric column and p50/p90 of each stage's latency in the answers table."""
    import lancedb

    answers = lancedb.connect(uri).open_table(table).to_arrow()
    summary: dict[str, Any] = {"rows": answers.num_rows}
    for metric in METRICS:
        if metric in answers.column_names:
            values = [v for v in answers[metric].to_pylist() if v is not None]
            summary[f"mean_{metric}"] = round(sum(values) / len(values), 4) if values else None
    for column, stats in latency_summary(answers).items():
        summary[f"{column}_p50"] = round(stats["p50"], 2)
        summary[f"{column}_p90"] = round(stats["p90"], 2)
    return summary


def answer_rows(uri: str, table: str) -> list[dict[str, Any]]:
    """The answers table's rows as the artifact shows them (ids joined, scores rounded)."""
    import lancedb

    answers = lancedb.connect(uri).open_table(table).to_arrow()
    fields = [f for f in ARTIFACT_FIELDS if f in answers.column_names]
    rows = []
    for row in answers.select(fields).to_pylist():
        row["cited_ids"] = ", ".join(row.get("cited_ids") or [])
        rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    return rows


def _gold_fields(path: Path) -> set[str]:
    """The gold fields of the first question (``answers``, ``relevant_ids``), for scoring."""
    try:
        with path.open(encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), None)
    except OSError as exc:
        raise ConfigError(f"rag_qa: cannot read questions file {path}: {exc}", file=str(path)) from None
    if first is None:
        raise ConfigError(f"rag_qa: questions file {path} is empty", file=str(path))
    try:
        record = json.loads(first)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"rag_qa: {path}: first record is not JSON: {exc}", file=str(path), line=1
        ) from None
    return {k for k in ("answers", "relevant_ids") if isinstance(record, dict) and k in record}


def main(argv: list[str] | None = None) -> None:
    command_line_defaults()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--questions", default=None, help="JSONL with a 'question' field (default: shipped set)"
    )
    parser.add_argument("--table", default="docs")
    parser.add_argument("--answers-table", default="answers")
    parser.add_argument("--lance-uri", default=None)
    parser.add_argument("--mode", choices=["vector", "fts", "hybrid"], default="hybrid")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--llm-model", default=None)
    parser.add_argument("--context-chunks", type=int, default=1, help="passages in each prompt")
    args = parser.parse_args(argv)
    summary = rag_qa(
        questions=args.questions,
        table=args.table,
        answers_table=args.answers_table,
        lance_uri=args.lance_uri,
        mode=args.mode,
        top_k=args.top_k,
        llm_model=args.llm_model,
        context_chunks=args.context_chunks,
    )
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":  # Dask process workers re-import this file: keep the run behind this guard
    main()
