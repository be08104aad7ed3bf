"""L5 apps: example operators and the small data sets the project ships for its flows.

>>> from sage_prefect.examples import DOCS_DIR, QUESTIONS_PATH
>>> sorted(p.name for p in DOCS_DIR.glob("*.md"))[:2]
['architecture.md', 'benchmarks.md']
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCS_DIR = HERE / "docs"
"""Eight short Markdown documents about sage-prefect, written for the project (the RAG demo corpus)."""
QUESTIONS_PATH = HERE / "rag_questions.jsonl"
"""Questions about `DOCS_DIR` with gold ``answers`` and ``relevant_ids`` (document ids)."""
AGENT_SAMPLE_DIR = HERE / "agent_sample"
"""A small agent data set in the MetaTool/BFCL formats of ``../shared/data/agent``, written for the project."""

__all__ = ["AGENT_SAMPLE_DIR", "DOCS_DIR", "HERE", "QUESTIONS_PATH"]
