"""Planning: turn a request into an ordered list of tool calls.

`Planner` first asks the chat model, prompting with the JSON-schemas of the ``candidates``
best tools (ranked by a `ToolSelector`), for a JSON list ``[{"tool": name, "arguments": {...}}]``.
The reply is accepted only if it parses, every tool is one of the candidates and every
``arguments`` object validates against the tool's schema (`ToolRegistry.validate`). Otherwise
the plan comes from retrieval: the best-ranked tool, then the next ones whose score is within
``margin`` of the best and at least ``min_score``, up to ``max_steps``, each with ``{}`` arguments.

Adds ``plan``: a list of ``{"tool": name, "arguments": JSON text}`` (arguments travel as JSON
text so that plans with different argument names share one Arrow type; `decode_plan` turns
them back into dicts), ``plan_source`` (``"llm"`` or ``"retrieval"``) and ``plan_error`` (why
the model's plan was rejected, ``None`` when it was used or not asked for).
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
from pydantic import Field

from sage_prefect.common.functions import MapFunction
from sage_prefect.common.records import with_columns
from sage_prefect.tasks.agent.registry import ToolArgumentError, ToolRegistry, UnknownToolError
from sage_prefect.tasks.agent.selection import ToolSelector, load_tool_specs
from sage_prefect.tasks.base import Operator
from sage_prefect.tasks.client import EndpointConfig, FunctionNames, chat_reply, is_context_length_error

if TYPE_CHECKING:
    from openai import OpenAI

__all__ = ["PLAN_TYPE", "Planner", "decode_plan", "parse_plan"]

PLAN_TYPE = pa.list_(pa.struct([("tool", pa.string()), ("arguments", pa.string())]))


def decode_plan(plan: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """A ``plan`` column value with its ``arguments`` decoded from JSON text into dicts.

    >>> decode_plan([{"tool": "WeatherTool", "arguments": '{"city": "Oslo"}'}])
    [{'tool': 'WeatherTool', 'arguments': {'city': 'Oslo'}}]
    """
    out = []
    for step in plan or []:
        args = step.get("arguments")
        out.append(
            {"tool": step["tool"], "arguments": json.loads(args) if isinstance(args, str) else args or {}}
        )
    return out


def parse_plan(reply: str, registry: ToolRegistry, max_steps: int) -> list[dict[str, Any]]:
    """The calls of a model reply holding a JSON list of ``{"tool", "arguments"}`` objects,
    validated with ``registry``; ``ValueError`` (or a registry error) saying what is wrong.

    >>> reg = ToolRegistry.from_specs([{"name": "NewsTool", "description": "News."}])
    >>> parse_plan('Plan: [{"tool": "NewsTool", "arguments": {}}]', reg, 3)
    [{'tool': 'NewsTool', 'arguments': {}}]
    """
    start, end = reply.find("["), reply.rfind("]")
    if start < 0 or end <= start:
        raise ValueError("the reply holds no JSON list")
    try:
        items = json.loads(reply[start : end + 1])
    except json.JSONDecodeError as exc:
        raise ValueError(f"the reply's JSON list does not parse: {exc.msg}") from None
    if not isinstance(items, list) or not items:
        raise ValueError("the plan is an empty list")
    if len(items) > max_steps:
        raise ValueError(f"the plan has {len(items)} steps, more than max_steps={max_steps}")
    calls = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("tool"), str):
            raise ValueError(f"step {i} is not an object with a 'tool' name")
        args = registry.validate(item["tool"], item.get("arguments", {}))
        calls.append({"tool": item["tool"], "arguments": args})
    return calls


class Planner(Operator, MapFunction):
    """Plan tool calls for each record's query; add ``plan``, ``plan_source``, ``plan_error``."""

    class Config(EndpointConfig):
        tools: list[dict[str, Any]] | None = Field(
            None, description="Inline tools [{name, description, parameters}]"
        )
        tools_path: str | None = Field(None, description="A MetaTool tools.json / tools_multi.json")
        method: Literal["llm", "retrieval"] = Field(
            "llm", description="llm with retrieval fallback, or retrieval only"
        )
        selector_method: Literal["keyword", "embedding", "hybrid"] = "embedding"
        exemplars_path: str | None = Field(None, description="A *_dev selection CSV for the selector's fit")
        query_field: str = "query"
        output_field: str = "plan"
        candidates: int = Field(5, ge=1, description="Tools whose schemas go into the prompt")
        max_steps: int = Field(3, ge=1)
        margin: float = Field(
            0.05, ge=0.0, description="Retrieval: keep tools scoring within this of the best"
        )
        min_score: float = Field(0.0, description="Retrieval: keep only tools scoring at least this")
        embedding_model: str | None = None
        llm_model: str | None = None
        max_tokens: int = Field(128, ge=1)
        temperature: float = Field(0.0, ge=0.0)
        concurrency: int = Field(8, ge=1)

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        cfg = self.cfg
        if cfg.tools is not None or cfg.tools_path is None:
            load_tool_specs(cfg.tools, cfg.tools_path, self.name)
        selector_cfg: dict[str, Any] = {
            "method": cfg.selector_method,
            "top_k": max(cfg.candidates, cfg.max_steps),
            "base_url": cfg.base_url,
            "api_key": cfg.api_key,
            "timeout_s": cfg.timeout_s,
            "max_retries": cfg.max_retries,
            "embedding_model": cfg.embedding_model,
            "exemplars_path": cfg.exemplars_path,
            "query_field": cfg.query_field,
        }
        selector_cfg["tools" if cfg.tools is not None else "tools_path"] = (
            cfg.tools if cfg.tools is not None else cfg.tools_path
        )
        self.selector = ToolSelector(selector_cfg)

    def _runtime_attributes(self) -> tuple[str, ...]:
        return ("_api", "_registry")

    def setup(self) -> None:
        """Set up the selector, build the registry and (method llm) the chat client."""
        from sage_prefect.common.settings import load_settings
        from sage_prefect.tasks.client import client

        self.selector.ensure_setup()
        self._registry = ToolRegistry(self.selector.tools)
        self._api: OpenAI | None = client(self.cfg, self.name) if self.cfg.method == "llm" else None
        self._llm_model = self.cfg.llm_model or load_settings().llm_model
        self._ready = True

    @property
    def registry(self) -> ToolRegistry:
        self.ensure_setup()
        return self._registry

    def retrieval_plan(self, ranked: list[tuple[str, float]]) -> list[dict[str, Any]]:
        """Calls from a ranking: the best tool, then those within ``margin`` of it (and at least
        ``min_score``), best first, at most ``max_steps``, each with empty arguments."""
        if not ranked:
            return []
        best = ranked[0][1]
        keep = [ranked[0][0]]
        for name, score in ranked[1:]:
            if len(keep) >= self.cfg.max_steps:
                break
            if score >= best - self.cfg.margin and score >= self.cfg.min_score:
                keep.append(name)
        return [{"tool": name, "arguments": {}} for name in keep]

    def _ask(self, query: str, ranked: list[tuple[str, float]]) -> list[dict[str, Any]]:
        assert self._api is not None
        names = [n for n, _ in ranked[: self.cfg.candidates]]
        functions = FunctionNames(names)
        messages = [
            {
                "role": "system",
                "content": "Plan the tool calls that the user's request needs: call every tool it needs, "
                "in the order they should run.",
            },
            {"role": "user", "content": query},
        ]
        reply = chat_reply(
            self._api,
            self._llm_model,
            messages,
            self.cfg.max_tokens,
            self.cfg.temperature,
            tools=functions.openai_tools([self._registry.get(n).spec() for n in names]),
            tool_choice="required",
            parallel_tool_calls=True,
        )
        allowed = ToolRegistry([self._registry.get(n) for n in names])
        if not reply.calls:  # an endpoint that answered in text: a JSON list of calls in it
            return parse_plan(reply.text, allowed, self.cfg.max_steps)
        calls: list[dict[str, Any]] = []
        for function, arguments in reply.calls:
            tool = functions.tool(function)
            if tool is None:
                raise UnknownToolError(f"the model called {function!r}, which is not among {names}")
            if tool in (c["tool"] for c in calls):
                continue  # a repeated call adds nothing to the plan
            calls.append({"tool": tool, "arguments": allowed.validate(tool, arguments)})
        return calls[: self.cfg.max_steps]

    def _plan_one(
        self, query: str, ranked: list[tuple[str, float]]
    ) -> tuple[list[dict[str, Any]], str, str | None]:
        if self._api is None:
            return self.retrieval_plan(ranked), "retrieval", None
        try:
            return self._ask(query, ranked), "llm", None
        except Exception as exc:
            # an unusable reply, or a request longer than the chat model takes
            refused = isinstance(exc, (ValueError, UnknownToolError, ToolArgumentError))
            if not refused and not is_context_length_error(exc):
                raise
            reason = re.sub(r"\s+", " ", str(exc))[:300]
            return self.retrieval_plan(ranked), "retrieval", reason

    def plan(self, queries: list[str]) -> list[tuple[list[dict[str, Any]], str, str | None]]:
        """For each query: the calls (``{"tool", "arguments": dict}``), the source and the rejection reason."""
        self.ensure_setup()
        ranked = self.selector.rank(queries)
        with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, max(1, len(queries)))) as pool:
            return list(pool.map(self._plan_one, queries, ranked))

    def execute_batch(self, table: pa.Table) -> pa.Table:
        """Plan every row of a partition (one embedding request, parallel chat requests)."""
        self.ensure_setup()
        queries = self.selector._queries(table) if table.num_rows else []
        results = self.plan(queries) if queries else []
        plans = [
            [{"tool": c["tool"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)} for c in calls]
            for calls, _, _ in results
        ]
        columns = {
            self.cfg.output_field: pa.array(plans, type=PLAN_TYPE),
            "plan_source": pa.array([s for _, s, _ in results], type=pa.string()),
            "plan_error": pa.array([e for _, _, e in results], type=pa.string()),
        }
        return with_columns(table, columns)

    def execute(self, data: dict[str, Any]) -> dict[str, Any]:
        """Plan one record."""
        return self.execute_batch(pa.Table.from_pylist([data])).to_pylist()[0]
