"""L3 libs: the operator library (io, rag, agent, eval).

Every operator is a SAGE function class usable in a pipeline
(``stream.map(Embedder, {"model": ...})``) and, through ``as_task()``, a plain Prefect task
for hand-written ``@flow`` code. Names resolve lazily, so ``import sage_prefect.tasks`` does
not import lancedb, jinja2 or the openai SDK until an operator needs them.

>>> from sage_prefect.tasks import CharacterChunker
>>> CharacterChunker.__module__
'sage_prefect.tasks.rag.chunking'
"""

from __future__ import annotations

from sage_prefect.tasks._lazy import lazy_exports
from sage_prefect.tasks.base import Operator, OperatorConfig

_EXPORTS: dict[str, str] = {
    # io
    "JSONLSource": "sage_prefect.tasks.io",
    "CSVSource": "sage_prefect.tasks.io",
    "ParquetSource": "sage_prefect.tasks.io",
    "TextDirectorySource": "sage_prefect.tasks.io",
    "LanceSink": "sage_prefect.tasks.io",
    "ParquetSink": "sage_prefect.tasks.io",
    "JSONLSink": "sage_prefect.tasks.io",
    # rag
    "CharacterChunker": "sage_prefect.tasks.rag.chunking",
    "TokenChunker": "sage_prefect.tasks.rag.chunking",
    "Embedder": "sage_prefect.tasks.rag.embedding",
    "LanceIndexer": "sage_prefect.tasks.rag.lance",
    "LanceRetriever": "sage_prefect.tasks.rag.lance",
    "SkipIndexed": "sage_prefect.tasks.rag.lance",
    "Reranker": "sage_prefect.tasks.rag.generation",
    "QAPromptor": "sage_prefect.tasks.rag.generation",
    "Generator": "sage_prefect.tasks.rag.generation",
    "ExactMatch": "sage_prefect.tasks.rag.evaluate",
    "AnswerContains": "sage_prefect.tasks.rag.evaluate",
    "TokenF1": "sage_prefect.tasks.rag.evaluate",
    "RecallAtK": "sage_prefect.tasks.rag.evaluate",
    "MRR": "sage_prefect.tasks.rag.evaluate",
    "LatencySummary": "sage_prefect.tasks.rag.evaluate",
    # agent
    "Tool": "sage_prefect.tasks.agent.registry",
    "ToolRegistry": "sage_prefect.tasks.agent.registry",
    "ToolSelector": "sage_prefect.tasks.agent.selection",
    "Planner": "sage_prefect.tasks.agent.planning",
    "TimingDecider": "sage_prefect.tasks.agent.timing",
}

__all__ = ["Operator", "OperatorConfig", *_EXPORTS]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, ["Operator", "OperatorConfig"])
