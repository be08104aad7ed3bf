"""Engines that forward to any OpenAI-compatible server: a ``vllm serve``, TEI, another gateway.

vLLM runs as its own server (its wheel's pins cannot share an environment with Prefect):
point ``base_url`` at it. ``priority`` is forwarded in the body (vLLM accepts it with
``--scheduling-policy priority``), and where the server exposes vLLM's Prometheus
``/metrics``, ``vllm:num_requests_waiting`` is read by `probe` and feeds routing.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx

from sage_prefect.controlplane.engines.base import (
    EmbeddingEngine,
    EngineError,
    GenerationRequest,
    LLMEngine,
    TokenEvent,
    UpstreamError,
)

_WAITING = re.compile(r"^vllm:num_requests_waiting(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.M)


def parse_vllm_waiting(text: str) -> int | None:
    """Sum of ``vllm:num_requests_waiting`` samples in a Prometheus text page (None if absent)."""
    values = [float(v) for v in _WAITING.findall(text)]
    return int(sum(values)) if values else None


def _status_error(exc: Any) -> Exception:
    status = getattr(exc, "status_code", None)
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return UpstreamError(f"upstream rejected the request: {exc}", status)
    return EngineError(f"upstream error: {exc}")


class _Upstream:
    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str = "EMPTY",
        timeout: float = 600.0,
        metrics_url: str | None = None,
        name: str | None = None,
    ) -> None:
        import openai

        self.base_url = base_url.rstrip("/")
        self.model = model or name or ""
        self.name = name or self.model
        self.api_key = api_key
        self.client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=api_key, timeout=timeout, max_retries=0
        )
        self.sync_client = openai.OpenAI(
            base_url=self.base_url, api_key=api_key, timeout=timeout, max_retries=0
        )
        root = self.base_url.removesuffix("/v1")
        self.metrics_url = metrics_url or f"{root}/metrics"
        self._http = httpx.AsyncClient(timeout=2.0)

    async def probe(self) -> int | None:
        """Raises when the upstream is unreachable; returns its waiting queue when it says."""
        response = await self._http.get(self.metrics_url)
        if response.status_code == 404:
            await self.client.models.list()
            return None
        response.raise_for_status()
        return parse_vllm_waiting(response.text)


class OpenAILLMEngine(_Upstream, LLMEngine):
    slots = 64  # the upstream batches; this bounds what we keep in flight there

    def __init__(self, base_url: str, *, slots: int = 64, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self.slots = slots

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)  # an estimate for budgets; usage comes from the upstream

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        import openai

        extra = {"priority": request.priority, **request.extra} if request.priority else dict(request.extra)
        common: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
            "extra_body": extra or None,
        }
        if request.stop:
            common["stop"] = request.stop
        if request.seed is not None:
            common["seed"] = request.seed
        finish: str | None = None
        usage = (0, 0)
        try:
            if request.messages is not None:
                stream: Any = await self.client.chat.completions.create(
                    messages=request.messages,  # type: ignore[arg-type]
                    **common,
                )
            else:
                stream = await self.client.completions.create(prompt=request.prompt, **common)
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                for choice in chunk.choices:
                    text = choice.delta.content if request.messages is not None else choice.text
                    if choice.finish_reason:
                        finish = choice.finish_reason
                    if text:
                        yield TokenEvent(text)
        except openai.APIStatusError as exc:
            raise _status_error(exc) from exc
        except openai.APIError as exc:  # connection errors, timeouts
            raise EngineError(f"upstream {self.base_url} failed: {exc}") from exc
        yield TokenEvent(
            "", finish_reason=finish or "stop", prompt_tokens=usage[0], completion_tokens=usage[1]
        )

    async def aclose(self) -> None:
        await self.client.close()
        await self._http.aclose()


class OpenAIEmbeddingEngine(_Upstream, EmbeddingEngine):
    def __init__(
        self, base_url: str, *, dimensions: int = 0, max_input_tokens: int = 8192, **kwargs: Any
    ) -> None:
        super().__init__(base_url, **kwargs)
        self.dimensions = dimensions
        self.max_input_tokens = max_input_tokens

    def embed(self, texts: list[str]) -> list[list[float]]:
        import openai

        try:
            response = self.sync_client.embeddings.create(model=self.model, input=texts)
        except openai.APIStatusError as exc:
            raise _status_error(exc) from exc
        except openai.APIError as exc:
            raise EngineError(f"upstream {self.base_url} failed: {exc}") from exc
        return [item.embedding for item in sorted(response.data, key=lambda d: d.index)]

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [max(1, len(t) // 4) for t in texts]
