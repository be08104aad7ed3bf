"""Engines that forward to any OpenAI-compatible server: a ``vllm serve``, TEI, another gateway.

vLLM runs as its own server (its wheel's pins cannot share an environment with Prefect):
point ``base_url`` at it. ``priority`` is forwarded in the body (vLLM accepts it with
``--scheduling-policy priority``), and where the server exposes vLLM's Prometheus
``/metrics``, ``vllm:num_requests_waiting`` is read by `probe` and feeds routing.

The forwarding path is plain JSON over one persistent ``aiohttp`` session per replica
(keep-alive connections, reused across requests): the request body is built from the
`GenerationRequest` and the answer read as JSON, with no SDK model objects in between, since
this is the gateway's hot path. On this 2-core machine that costs ~0.08 ms of CPU per request,
against ~0.5-1 ms through ``httpx`` (whose pool checks every idle connection's socket on each
request) and ~1.5 ms through the ``openai`` SDK (benchmarks/gateway_overhead.py). A client's
non-streaming request is forwarded non-streaming (one event with the whole text); a streaming
one is streamed (SSE, with ``stream_options.include_usage``). Errors: a 4xx other than
408/429 is the client's (`UpstreamError`, its status and the upstream's message reach the
client); anything else, connection failures and timeouts included, is the replica's
(`EngineError`: the scheduler takes the replica out and retries the request elsewhere).
``HTTP(S)_PROXY``/``NO_PROXY`` are read once, when the engine is made. Health probes and the
embedding engine's blocking calls (made from a worker thread) use ``httpx``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import numpy as np

from sage_prefect.controlplane.engines.base import (
    EmbeddingEngine,
    EngineError,
    GenerationRequest,
    LLMEngine,
    TokenEvent,
    UpstreamError,
)
from sage_prefect.controlplane.metrics import sample_sum


def parse_vllm_waiting(text: str) -> int | None:
    """Sum of ``vllm:num_requests_waiting`` samples in a Prometheus text page (None if absent)."""
    waiting = sample_sum(text, "vllm:num_requests_waiting")
    return None if waiting is None else int(waiting)


def _status_error(status: int, content: bytes) -> Exception:
    """The exception for an upstream error answer: the client's (4xx) or the replica's."""
    try:
        body: Any = json.loads(content)
    except ValueError:
        body = content.decode("utf-8", "replace")[:2000]
    message = f"Error code: {status} - {body}"
    if 400 <= status < 500 and status not in (408, 429):
        detail = body.get("error", body) if isinstance(body, dict) else body
        return UpstreamError(f"upstream rejected the request: {message}", status, detail)
    return EngineError(f"upstream error: {message}")


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


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
        self.base_url = base_url.rstrip("/")
        self.model = model or name or ""
        self.name = name or self.model
        self.api_key = api_key
        self.headers = {"authorization": f"Bearer {api_key}", "content-type": "application/json"}
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        root = self.base_url.removesuffix("/v1")
        self.metrics_url = metrics_url or f"{root}/metrics"
        self._http = httpx.AsyncClient(timeout=2.0)

    async def probe(self) -> int | None:
        """Raises when the upstream is unreachable; returns its waiting queue when it says."""
        response = await self._http.get(self.metrics_url)
        if response.status_code == 404:
            models = await self._http.get(f"{self.base_url}/models", headers=self.headers)
            models.raise_for_status()
            return None
        response.raise_for_status()
        waiting = parse_vllm_waiting(response.text)
        if waiting is None:  # this project's own engine server (a placed replica)
            queued = sample_sum(response.text, "sage_queue_depth")
            waiting = None if queued is None else int(queued)
        return waiting


class OpenAILLMEngine(_Upstream, LLMEngine):
    slots = 64  # the upstream batches; this bounds what we keep in flight there
    max_context_tokens = None  # the upstream knows its model's context and answers 400 past it
    accepts_media = True  # content parts go upstream unchanged (a vision model may take images)

    def __init__(self, base_url: str, *, slots: int = 64, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self.slots = slots
        self._session: aiohttp.ClientSession | None = None  # made on the serving loop, at first use
        self._proxy = _env_proxy(self.base_url)

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # idle connections are dropped after 4 s, before the upstream's own keep-alive timeout
            # (uvicorn's default, in front of vLLM, is 5 s) can close one as a request goes out on it
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=4.0)
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=self.timeout.connect, sock_read=self.timeout.read
            )
            self._session = aiohttp.ClientSession(
                headers=self.headers, connector=connector, timeout=timeout, trust_env=False
            )
        return self._session

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)  # an estimate for budgets; usage comes from the upstream

    def _body(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.stop:
            body["stop"] = request.stop
        if request.seed is not None:
            body["seed"] = request.seed
        if request.priority:
            body["priority"] = request.priority
        body.update(request.extra)
        if request.messages is not None:
            body["messages"] = request.messages
            # tool calling and structured output, forwarded unchanged (vLLM serves both)
            if request.tools:
                body["tools"] = request.tools
                body["tool_choice"] = request.tool_choice
                if not request.parallel_tool_calls:
                    body["parallel_tool_calls"] = False
            if request.response_format is not None:
                body["response_format"] = request.response_format
            return f"{self.base_url}/chat/completions", body
        body["prompt"] = request.prompt
        return f"{self.base_url}/completions", body

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        url, body = self._body(request)
        chat = request.messages is not None
        if request.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        payload = json.dumps(body).encode()
        finish: str | None = None
        prompt_tokens = completion_tokens = 0
        try:
            async with self.session().post(url, data=payload, proxy=self._proxy) as response:
                if response.status >= 400:
                    raise _status_error(response.status, await response.read())
                if not request.stream:
                    content = await response.read()
                    try:
                        doc = json.loads(content)
                        choice = doc["choices"][0]
                        text = choice["message"].get("content") if chat else choice.get("text")
                        calls = _indexed(choice["message"].get("tool_calls")) if chat else None
                        finish = choice.get("finish_reason")
                        usage = doc.get("usage") or {}
                        prompt_tokens = int(usage.get("prompt_tokens") or 0)
                        completion_tokens = int(usage.get("completion_tokens") or 0)
                    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
                        raise EngineError(
                            f"upstream {self.base_url} sent a malformed answer ({_describe(exc)}): {content[:300]!r}"
                        ) from exc
                    if text or calls:
                        yield TokenEvent(text or "", tool_calls=calls)
                else:
                    async for data in _sse_data(response):
                        if data == b"[DONE]":
                            break
                        try:
                            chunk = json.loads(data)
                            if not isinstance(chunk, dict):
                                raise ValueError("not an object")
                        except ValueError as exc:
                            raise EngineError(
                                f"upstream {self.base_url} sent a malformed event: {data[:300]!r}"
                            ) from exc
                        if chunk.get("error") is not None and not chunk.get("choices"):
                            raise EngineError(f"upstream {self.base_url} failed mid-stream: {chunk['error']}")
                        usage = chunk.get("usage")
                        if usage:
                            prompt_tokens = int(usage.get("prompt_tokens") or 0)
                            completion_tokens = int(usage.get("completion_tokens") or 0)
                        for choice in chunk.get("choices") or ():
                            delta = choice.get("delta") or {}
                            text = delta.get("content") if chat else choice.get("text")
                            calls = delta.get("tool_calls") if chat else None
                            if choice.get("finish_reason"):
                                finish = choice["finish_reason"]
                            if text or calls:
                                yield TokenEvent(text or "", tool_calls=calls or None)
        except (aiohttp.ClientError, TimeoutError) as exc:  # connection errors, timeouts, a broken stream
            raise EngineError(f"upstream {self.base_url} failed: {_describe(exc)}") from exc
        yield TokenEvent(
            "",
            finish_reason=finish or "stop",
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
        await self._http.aclose()


async def _sse_data(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The ``data:`` payloads of a server-sent-event stream (no line-length limit)."""
    pending = b""
    async for piece in response.content.iter_any():
        pending += piece
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip()
    if pending.startswith(b"data:"):
        yield pending[5:].strip()


def _indexed(calls: Any) -> list[dict[str, Any]] | None:
    """Whole ``message.tool_calls`` as the delta entries `TokenEvent` carries (with ``index``)."""
    if not calls:
        return None
    return [{"index": i, **call} for i, call in enumerate(calls)]


def _env_proxy(url: str) -> str | None:
    """The proxy ``HTTP(S)_PROXY``/``NO_PROXY`` choose for ``url`` (read once, not per request)."""
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(url)
    if parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def _vector(item: Any) -> list[float]:
    value = item["embedding"]
    if isinstance(value, str):  # encoding_format base64: little-endian float32
        raw = base64.b64decode(value, validate=True)
        if len(raw) % 4:
            raise ValueError(f"a base64 embedding of {len(raw)} bytes is not float32s")
        vector: list[float] = np.frombuffer(raw, dtype="<f4").tolist()
        return vector
    return [float(v) for v in value]


class OpenAIEmbeddingEngine(_Upstream, EmbeddingEngine):
    def __init__(
        self,
        base_url: str,
        *,
        dimensions: int = 0,
        max_input_tokens: int = 8192,
        encoding_format: str = "base64",
        **kwargs: Any,
    ) -> None:
        super().__init__(base_url, **kwargs)
        self.dimensions = dimensions
        self.max_input_tokens = max_input_tokens
        # base64 (OpenAI's, vLLM's, this gateway's): ~4 bytes a number instead of ~20 of JSON text,
        # decoded by numpy; `float` for a server that only speaks JSON numbers
        if encoding_format not in ("base64", "float"):
            raise ValueError(f"encoding_format must be 'base64' or 'float', got {encoding_format!r}")
        self.encoding_format = encoding_format
        # `embed` runs in a worker thread (the service's batches): a blocking client of its own
        self.sync_client = httpx.Client(headers=self.headers, timeout=self.timeout)

    def embed(self, texts: list[str]) -> list[list[float]]:
        body: dict[str, Any] = {"model": self.model, "input": texts}
        if self.encoding_format != "float":
            body["encoding_format"] = self.encoding_format
        payload = json.dumps(body).encode()
        try:
            response = self.sync_client.post(f"{self.base_url}/embeddings", content=payload)
        except httpx.HTTPError as exc:
            raise EngineError(f"upstream {self.base_url} failed: {_describe(exc)}") from exc
        if response.status_code >= 400:
            raise _status_error(response.status_code, response.content)
        try:
            data = json.loads(response.content)["data"]
            return [_vector(item) for item in sorted(data, key=lambda d: d["index"])]
        except (ValueError, KeyError, TypeError) as exc:
            raise EngineError(
                f"upstream {self.base_url} sent a malformed answer ({_describe(exc)}): {response.content[:300]!r}"
            ) from exc

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [max(1, len(t) // 4) for t in texts]

    def truncate(self, texts: list[str], keep: int) -> list[str]:
        # The upstream's tokenizer is not here: cut by the same 4-characters-per-token estimate
        # that `count_tokens` uses for budgets (the gateway's limit check then agrees with it).
        return [t if len(t) // 4 <= keep else t[-4 * keep :] for t in texts]

    def close(self) -> None:
        self.sync_client.close()
