"""The three flows end to end: real Prefect API, real Dask cluster, real control plane, real LanceDB."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REAL_LLM

from sage_prefect.examples import AGENT_SAMPLE_DIR, DOCS_DIR, QUESTIONS_PATH

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def flows() -> Iterator[dict[str, Any]]:
    """The flow objects of flows/*.py, as Prefect loads them for a deployment."""
    from prefect.flows import load_flow_from_entrypoint

    yield {
        name: load_flow_from_entrypoint(f"{ROOT / 'flows' / name}.py:{name}")
        for name in ("rag_index", "rag_qa", "agent_tools")
    }
    for name in list(sys.modules):
        if name.startswith("__prefect_loader"):
            del sys.modules[name]


@pytest.fixture
def small_cluster(monkeypatch: pytest.MonkeyPatch, controlplane_env: str, tmp_path: Path) -> str:
    """Settings the flows read: the shared control plane, one local thread worker, a temp home."""
    monkeypatch.setenv("SAGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SAGE_N_CPU_WORKERS", "1")
    monkeypatch.setenv("SAGE_N_GPU_WORKERS", "0")
    monkeypatch.setenv("SAGE_PROCESSES", "false")
    monkeypatch.setenv("SAGE_THREADS_PER_WORKER", "2")
    return controlplane_env


def _table(uri: Path, name: str) -> Any:
    import lancedb

    return lancedb.connect(str(uri)).open_table(name).to_arrow()


def test_rag_index_is_incremental(
    flows: dict[str, Any], prefect_api: str, small_cluster: str, tmp_path: Path
) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(DOCS_DIR, docs)
    uri = tmp_path / "lance"
    index = flows["rag_index"]

    first = index(docs_dir=str(docs), lance_uri=str(uri), chunk_size=400, chunk_overlap=40)
    rows = _table(uri, "docs")
    assert first["documents"] == 8 and first["chunks_written"] == rows.num_rows == first["table_rows"] > 8
    assert len(set(rows["chunk_id"].to_pylist())) == rows.num_rows
    assert set(rows["doc_id"].to_pylist()) == {p.name for p in docs.glob("*.md")}

    again = index(docs_dir=str(docs), lance_uri=str(uri), chunk_size=400, chunk_overlap=40)
    assert again["chunks_written"] == 0 and again["chunks_pruned"] == 0
    assert _table(uri, "docs").num_rows == rows.num_rows  # nothing added twice

    # One document shrinks to a single paragraph, one disappears.
    (docs / "operators.md").write_text("# The operator library\n\nOperators validate their config.\n")
    removed = [r for r in rows.to_pylist() if r["doc_id"] == "benchmarks.md"]
    (docs / "benchmarks.md").unlink()
    old_ops = [r for r in rows.to_pylist() if r["doc_id"] == "operators.md"]
    third = index(docs_dir=str(docs), lance_uri=str(uri), chunk_size=400, chunk_overlap=40)
    after = _table(uri, "docs").to_pylist()
    ops = [r for r in after if r["doc_id"] == "operators.md"]
    assert third["chunks_written"] == len(ops) == 1 and len(old_ops) > 1
    assert ops[0]["text"].endswith("Operators validate their config.")
    assert third["chunks_pruned"] == len(removed) and not [r for r in after if r["doc_id"] == "benchmarks.md"]
    assert len(after) == rows.num_rows - len(old_ops) + 1 - len(removed)

    # A document edited to blank yields no chunks to replace the old ones with: they go too.
    (docs / "deployments.md").write_text("   \n")
    fourth = index(docs_dir=str(docs), lance_uri=str(uri), chunk_size=400, chunk_overlap=40)
    stale = [r for r in after if r["doc_id"] == "deployments.md"]
    assert fourth["chunks_written"] == 0 and fourth["chunks_pruned"] == len(stale) > 0
    assert not [r for r in _table(uri, "docs").to_pylist() if r["doc_id"] == "deployments.md"]


def test_rag_qa_answers_with_retrieved_ids_and_stage_latency(
    flows: dict[str, Any], prefect_api: str, small_cluster: str, tmp_path: Path
) -> None:
    uri = tmp_path / "lance"
    flows["rag_index"](lance_uri=str(uri))
    state = flows["rag_qa"](lance_uri=str(uri), top_k=3, llm_model=REAL_LLM, return_state=True)
    summary = state.result()

    answers = _table(uri, "answers").to_pylist()
    questions = QUESTIONS_PATH.read_text().splitlines()
    assert summary["rows"] == len(answers) == len(questions)
    for row in answers:
        assert len(row["retrieved_ids"]) == 3 and all("#" in cid for cid in row["retrieved_ids"])
        assert row["cited_ids"] and set(row["cited_ids"]) <= set(row["retrieved_ids"])
        assert isinstance(row["answer"], str) and row["completion_tokens"] > 0
        for stage in ("retrieve", "rerank", "generate"):
            assert row[f"latency_{stage}_ms"] > 0
    # Retrieval with the real MiniLM model finds the right document for most questions.
    assert summary["mean_recall_at_k"] >= 0.75, summary
    assert {"latency_retrieve_ms_p50", "latency_generate_ms_p50"} <= set(summary)
    # The real model's answers: greedy, so the same every run (8 of 16 when measured); a
    # random-weight model scores 0 here.
    assert summary["mean_answer_contains"] >= 3 / 16, summary

    # The answers are on the flow run as a table artifact.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["rag-qa-answers"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            )
        )
    table = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert sorted(r["question"] for r in table) == sorted(r["question"] for r in answers)
    assert all({"answer", "cited_ids", "exact_match", "answer_contains", "token_f1"} <= set(r) for r in table)

    # A run that fails part-way leaves the last complete answers table as it was.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "What is SageError?"}\n{"question": \n')
    with pytest.raises(Exception, match=r"bad.jsonl:2"):
        flows["rag_qa"](questions=str(bad), lance_uri=str(uri))
    assert _table(uri, "answers").to_pylist() == answers


def test_agent_tools_on_the_shipped_sample(
    flows: dict[str, Any], prefect_api: str, small_cluster: str, tmp_path: Path
) -> None:
    out = tmp_path / "lance"
    summary = flows["agent_tools"](data_dir=str(AGENT_SAMPLE_DIR), lance_uri=str(out))
    rows = _table(out, summary["output_table"]).to_pylist()
    assert summary["queries"] == len(rows) > 0
    for row in rows:
        assert isinstance(row["needs_tool"], bool)
        assert row["selected_tools"] and all(isinstance(t, str) for t in row["selected_tools"])
        assert isinstance(row["plan"], list)
