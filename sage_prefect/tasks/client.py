"""The `openai` clients operators use to reach the control plane (or any OpenAI-compatible server).

Operators never import the control plane: they speak its wire protocol. The base URL
and key come from the operator's config (``base_url``, ``api_key``), else from settings
(``SAGE_CONTROLPLANE_URL``, ``SAGE_CONTROLPLANE_API_KEY``). One client per process and
endpoint is shared by every operator instance (the SDK's client is thread-safe and keeps
a connection pool).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import Field

from sage_prefect.common.errors import ConfigError
from sage_prefect.common.settings import load_settings
from sage_prefect.tasks.base import OperatorConfig

if TYPE_CHECKING:
    from openai import AsyncOpenAI, OpenAI

__all__ = [
    "ChatReply",
    "EndpointConfig",
    "FunctionNames",
    "async_client",
    "chat_reply",
    "client",
    "is_context_length_error",
    "resolve_endpoint",
]


class EndpointConfig(OperatorConfig):
    """Config keys of every operator that calls a model."""

    base_url: str | None = Field(
        None, description="OpenAI-compatible base URL; default SAGE_CONTROLPLANE_URL"
    )
    api_key: str | None = Field(None, description="API key; default SAGE_CONTROLPLANE_API_KEY")
    timeout_s: float = Field(600.0, gt=0, description="Per-request timeout in seconds")
    max_retries: int = Field(2, ge=0, le=20, description="SDK retries (429 and 5xx, with backoff)")
    slo_class: str | None = Field(
        "batch",
        description="Sent as X-SLO-Class: pipeline work is throughput work, held to the batch class's "
        "objective (600 s) rather than the interactive one's, which refuses (429) what would wait "
        "longer than 10 s; None: the gateway's default class",
    )


_clients: dict[tuple[str, str, float, int, str | None], OpenAI | AsyncOpenAI] = {}
_lock = threading.Lock()


def resolve_endpoint(cfg: EndpointConfig, operator: str) -> tuple[str, str]:
    """The base URL and key an operator uses: its own config first, then settings."""
    settings = load_settings()
    base_url = cfg.base_url or settings.controlplane_url
    if not base_url:
        raise ConfigError(
            f"{operator}: no control plane address: set config key 'base_url' or SAGE_CONTROLPLANE_URL "
            "(flows start an embedded control plane and set it for you)",
            operator=operator,
            field="base_url",
        )
    key = cfg.api_key or (
        settings.controlplane_api_key.get_secret_value() if settings.controlplane_api_key else ""
    )
    # The SDK refuses an empty key; a loopback control plane without keys accepts any.
    return base_url.rstrip("/"), key or "sage-no-key"


def client(cfg: EndpointConfig, operator: str) -> OpenAI:
    """A shared synchronous `openai.OpenAI` for this endpoint."""
    from openai import OpenAI

    base_url, key = resolve_endpoint(cfg, operator)
    ident = (base_url, key, cfg.timeout_s, cfg.max_retries, cfg.slo_class)
    with _lock:
        found = _clients.get(ident)
        if found is None:
            found = _clients[ident] = OpenAI(
                base_url=base_url,
                api_key=key,
                timeout=cfg.timeout_s,
                max_retries=cfg.max_retries,
                default_headers=_headers(cfg),
            )
    assert isinstance(found, OpenAI)
    return found


def async_client(cfg: EndpointConfig, operator: str) -> AsyncOpenAI:
    """A new `openai.AsyncOpenAI` for this endpoint (async clients belong to one event loop)."""
    from openai import AsyncOpenAI

    base_url, key = resolve_endpoint(cfg, operator)
    return AsyncOpenAI(
        base_url=base_url,
        api_key=key,
        timeout=cfg.timeout_s,
        max_retries=cfg.max_retries,
        default_headers=_headers(cfg),
    )


def _headers(cfg: EndpointConfig) -> dict[str, str]:
    return {"X-SLO-Class": cfg.slo_class} if cfg.slo_class else {}


@dataclass
class ChatReply:
    """One chat completion: its text and its tool calls (``(name, arguments dict)``; arguments
    that are not a JSON object come back as ``{}`` with ``bad_arguments`` counting them)."""

    text: str
    calls: list[tuple[str, dict[str, Any]]]
    finish_reason: str | None
    bad_arguments: int = 0


def chat_reply(
    api: OpenAI,
    model: str,
    messages: list[dict[str, Any]],
    max_tokens: int,
    temperature: float,
    *,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] | None = None,
    parallel_tool_calls: bool | None = None,
    response_format: dict[str, Any] | None = None,
) -> ChatReply:
    """One chat completion with OpenAI's ``tools`` / ``tool_choice`` / ``response_format`` (any
    OpenAI-compatible endpoint: the control plane constrains its local model to them, vLLM and
    OpenAI serve them natively)."""
    extra: dict[str, Any] = {}
    if tools:
        extra["tools"] = tools
        if tool_choice is not None:
            extra["tool_choice"] = tool_choice
        if parallel_tool_calls is not None:
            extra["parallel_tool_calls"] = parallel_tool_calls
    if response_format is not None:
        extra["response_format"] = response_format
    resp = api.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=temperature,
        **extra,
    )
    choice = resp.choices[0]
    calls: list[tuple[str, dict[str, Any]]] = []
    bad = 0
    for call in choice.message.tool_calls or ():
        fn = getattr(call, "function", None)
        if fn is None:
            continue
        try:
            args = json.loads(fn.arguments or "{}")
        except ValueError:
            args = None
        if not isinstance(args, dict):
            bad += 1
            args = {}
        calls.append((fn.name, args))
    return ChatReply(choice.message.content or "", calls, choice.finish_reason, bad)


class FunctionNames:
    """Tool names as OpenAI function names (``^[a-zA-Z0-9_-]{1,64}$``) and back: other
    characters become ``_`` (``PDF&URLTool`` → ``PDF_URLTool``), clashes get a numeric suffix.

    >>> names = FunctionNames(["PDF&URLTool", "math.sqrt"])
    >>> names.function("PDF&URLTool"), names.tool("math_sqrt")
    ('PDF_URLTool', 'math.sqrt')
    """

    def __init__(self, tools: list[str]) -> None:
        self._to_fn: dict[str, str] = {}
        self._to_tool: dict[str, str] = {}
        for name in tools:
            base = re.sub(r"[^a-zA-Z0-9_-]", "_", name)[:60] or "tool"
            fn, k = base, 1
            while fn in self._to_tool:
                k += 1
                fn = f"{base}_{k}"
            self._to_fn[name], self._to_tool[fn] = fn, name

    def function(self, tool: str) -> str:
        return self._to_fn[tool]

    def tool(self, function: str) -> str | None:
        return self._to_tool.get(function)

    def openai_tools(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``[{name, description, parameters}]`` as OpenAI ``tools`` under their function names."""
        return [
            {
                "type": "function",
                "function": {
                    "name": self.function(spec["name"]),
                    "description": spec.get("description") or "",
                    "parameters": spec.get("parameters") or {"type": "object", "properties": {}},
                },
            }
            for spec in specs
        ]


def is_context_length_error(exc: BaseException) -> bool:
    """Whether an endpoint refused a request as longer than its model takes: a 400 with
    OpenAI's ``context_length_exceeded`` code, or the wording the control plane and vLLM use."""
    from openai import BadRequestError

    if not isinstance(exc, BadRequestError):
        return False
    if exc.code == "context_length_exceeded":
        return True
    text = str(exc).lower()
    return "tokens" in text and any(w in text for w in ("maximum", "context", "shorten"))
