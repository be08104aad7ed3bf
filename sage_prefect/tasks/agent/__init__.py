"""Agent operators: tool registry, tool selection, planning and timing (call a tool or not).

- `registry`: `Tool`, `ToolRegistry` (jsonschema-validated calls), loaders for MetaTool and BFCL tools.
- `data`: loaders for the MetaTool and BFCL benchmark files; ``*_dev`` files are for fitting.
- `selection`: `ToolSelector` (keyword BM25, embedding, hybrid RRF, llm with fallback).
- `planning`: `Planner` (llm JSON plan validated by the registry, retrieval fallback).
- `timing`: `TimingDecider` (rules, embedding logistic regression, llm with rule fallback).

Names resolve lazily, like `sage_prefect.tasks`.
"""

from __future__ import annotations

from sage_prefect.tasks._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "Tool": "sage_prefect.tasks.agent.registry",
    "ToolRegistry": "sage_prefect.tasks.agent.registry",
    "ToolArgumentError": "sage_prefect.tasks.agent.registry",
    "UnknownToolError": "sage_prefect.tasks.agent.registry",
    "DataFormatError": "sage_prefect.tasks.agent.data",
    "ToolSelector": "sage_prefect.tasks.agent.selection",
    "Planner": "sage_prefect.tasks.agent.planning",
    "decode_plan": "sage_prefect.tasks.agent.planning",
    "TimingDecider": "sage_prefect.tasks.agent.timing",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
