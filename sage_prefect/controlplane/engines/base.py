"""What the control plane asks of an engine.

Engines do the compute (or forward to an upstream server); the scheduler decides what runs
when. Both kinds are plain classes constructed from their model config's ``params``.

* `EmbeddingEngine.embed` is synchronous: the service calls it in a worker thread with a
  whole coalesced batch (texts from many clients) and gets one vector per text back.
* `LLMEngine.generate` is an async iterator of `TokenEvent` for one request. An engine that
  batches (continuous batching in the local engine, the upstream server's own batching for
  the ``openai`` engine) does so across concurrent ``generate`` calls; `slots` tells the
  scheduler how many sequences it may have in flight at once.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any


class EngineError(Exception):
    """An engine (replica) failed; the request may be retried on another replica."""


class RequestFailed(Exception):
    """One request failed inside an engine for a reason of its own (a value the model cannot
    take, a grammar state, an output it cannot decode): that request alone is answered with
    ``status``; the replica and the other requests batched with it go on."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class UpstreamError(EngineError):
    """The upstream answered with an error status that belongs to the client (4xx): not retried."""

    def __init__(self, message: str, status: int, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass
class GenerationRequest:
    """One completion request as the engine sees it (chat messages are already rendered,
    unless the engine renders them itself: ``messages`` is kept for upstream engines)."""

    id: str
    prompt: str
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    messages: list[dict[str, Any]] | None = None  # chat requests: the original messages
    priority: int = 0  # forwarded to upstreams that understand it (vLLM)
    extra: dict[str, Any] = field(default_factory=dict)  # other OpenAI fields, forwarded upstream
    stream: bool = True  # the client streams; upstream engines forward a non-streaming one whole
    # tool calling and structured output (checked by the gateway: `structured.check_*`); an
    # upstream gets them unchanged, the local engine constrains its decoding to match them
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] = "none"
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    # filled in by the gateway off the event loop (`LLMEngine.prepare`): the prompt's token ids
    # where the engine tokenises locally, and whatever else the engine precomputed
    prompt_ids: list[int] | None = None
    prepared: Any = None

    @property
    def constrained(self) -> bool:
        """Whether the output must follow a grammar (tool calls or a JSON format)."""
        return self.response_format is not None or (bool(self.tools) and self.tool_choice != "none")


@dataclass
class TokenEvent:
    """A piece of generated text, or of tool calls (OpenAI's ``delta.tool_calls`` entries:
    ``index``, then ``id``/``type``/``function.name`` once per call, ``function.arguments``
    fragments). The last event of a request has ``finish_reason`` set ("stop", "length" or
    "tool_calls") and the final token counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tool_calls: list[dict[str, Any]] | None = None


class EmbeddingEngine(abc.ABC):
    """Turns texts into vectors."""

    name: str = "embedding"
    dimensions: int = 0
    max_input_tokens: int = 512

    @abc.abstractmethod
    def embed(self, texts: list[str]) -> list[list[float]]:
        """One vector per text, in order (called from a worker thread)."""

    @abc.abstractmethod
    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text as the model counts them (for budgets and usage)."""

    def truncate(self, texts: list[str], keep: int) -> list[str]:
        """Each text cut to its last ``keep`` tokens, special tokens included (vLLM's
        ``truncate_prompt_tokens``: left truncation); texts within ``keep`` unchanged."""
        raise NotImplementedError(f"{type(self).__name__} cannot truncate inputs")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release models, threads, connections."""


class LLMEngine(abc.ABC):
    """Generates text for prompts; batches concurrent requests itself."""

    name: str = "llm"
    slots: int = 1  # sequences it can usefully run at once
    max_context_tokens: int | None = 2048  # None: not known here (an upstream checks it itself)
    accepts_media: bool = False  # content parts other than text (images, audio) reach the model

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream the completion of one request (an async generator)."""

    @abc.abstractmethod
    def count_tokens(self, text: str) -> int:
        """Prompt tokens as the model counts them."""

    def prepare(self, request: GenerationRequest) -> None:
        """Check ``request`` and precompute what it needs (called off the event loop, before the
        request is queued): raise ``ValueError`` (an `InvalidRequest` to name a field) for one
        that would fail in the engine, so it is a 400 before it is batched with others."""
        return None

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt for a chat request (engines with a chat template override this); ``tools``
        are described in it, and earlier calls and results written out (`structured`)."""
        from sage_prefect.controlplane.structured import messages_for_template

        lines = [f"{m['role']}: {m['content']}" for m in messages_for_template(messages, tools)]
        return "\n".join(lines) + "\nassistant:"

    def queue_depth(self) -> int | None:
        """Requests waiting inside the engine (an upstream's own queue), if known."""
        return None

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Stop background loops, close connections."""
