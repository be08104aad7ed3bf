"""The OpenAI-compatible gateway: thin FastAPI routes over `service.ControlPlane`.

Every error is OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}`` with the
right status: 400 for a client mistake (naming the field), 401 without a valid key, 404 for an
unknown model, 413 for an oversize body, 429 with ``Retry-After`` from admission control or
rate limits, 503 when no replica can serve. A client mistake is never a 500.
"""

from __future__ import annotations

import base64
import gc
import json
import math
import os
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sage_prefect.controlplane.auth import KeyRing, RateLimiter
from sage_prefect.controlplane.config import ControlPlaneConfig
from sage_prefect.controlplane.engines.base import GenerationRequest, UpstreamError
from sage_prefect.controlplane.service import ControlPlane, ServiceError
from sage_prefect.controlplane.structured import (
    InvalidRequest,
    check_response_format,
    check_tool_choice,
    check_tools,
)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    502: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = (
            status,
            message,
            param,
            code,
            retry_after,
        )


def error_response(exc: APIError) -> JSONResponse:
    body = {
        "error": {
            "message": exc.message,
            "type": ERROR_TYPES.get(exc.status, "server_error"),
            "param": exc.param,
            "code": exc.code,
        }
    }
    headers = (
        {"Retry-After": str(max(1, math.ceil(exc.retry_after)))} if exc.retry_after is not None else None
    )
    return JSONResponse(body, status_code=exc.status, headers=headers)


@dataclass
class Caller:
    key: str | None
    slo: str
    priority: int


def create_app(config: ControlPlaneConfig, plane: ControlPlane | None = None) -> FastAPI:
    plane = plane or ControlPlane(config)
    keys = KeyRing.load(config.api_keys_env, config.api_keys_file)
    if not config.loopback and not keys.enabled:
        raise ServiceError(
            500,
            f"refusing to bind {config.host} without API keys: set {config.api_keys_env} or api_keys_file",
        )
    limiter = RateLimiter()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not plane.started:
            await plane.start()
        # the start-up heap (Prefect, pydantic, models: ~170k objects) never becomes garbage;
        # out of the collector's reach, a full collection no longer stalls requests for ~50 ms
        gc.freeze()
        yield
        await plane.stop()

    app = FastAPI(title="sage-prefect control plane", lifespan=lifespan)
    app.state.plane = plane

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(APIError(exc.status, exc.message, code=exc.code, retry_after=exc.retry_after))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:  # a bug, not the client's fault
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

    async def body_of(request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        limit = config.limits.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"invalid JSON body: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the body must be a JSON object, got {type(body).__name__}")
        return body

    def caller(request: Request, body: dict[str, Any]) -> Caller:
        name: str | None = None
        if keys.enabled:
            header = request.headers.get("authorization", "")
            token = header[7:].strip() if header.lower().startswith("bearer ") else ""
            name = keys.identify(token) if token else None
            if name is None:
                raise APIError(
                    401,
                    "missing or invalid API key (send 'Authorization: Bearer <key>')",
                    code="invalid_api_key",
                )
        key_cfg = config.keys.get(name or "")
        if key_cfg is not None and key_cfg.rate_limit_rps is not None:
            wait = limiter.acquire(
                name or "", key_cfg.rate_limit_rps, key_cfg.burst or max(1, int(key_cfg.rate_limit_rps))
            )
            if wait > 0:
                raise APIError(
                    429,
                    f"rate limit of {key_cfg.rate_limit_rps} requests/s for key {name!r} exceeded",
                    code="rate_limit_exceeded",
                    retry_after=wait,
                )
        slo = request.headers.get("x-slo-class") or body.get("slo_class")
        if slo is None:
            slo = (
                key_cfg.default_class if key_cfg and key_cfg.default_class else None
            ) or config.default_class
        if not isinstance(slo, str) or slo not in config.classes:
            raise APIError(
                400,
                f"unknown SLO class {slo!r}; configured: {', '.join(sorted(config.classes))}",
                param="slo_class",
            )
        raw_priority = request.headers.get("x-priority", body.get("priority"))
        if raw_priority is None:
            priority = (
                key_cfg.priority if key_cfg and key_cfg.priority is not None else config.classes[slo].priority
            )
        else:
            try:
                priority = int(raw_priority)
            except (TypeError, ValueError):
                raise APIError(
                    400, f"priority must be an integer, got {raw_priority!r}", param="priority"
                ) from None
        return Caller(name, slo, priority)

    def require_model(body: dict[str, Any]) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "'model' is required and must be a non-empty string", param="model")
        return model

    async def guarded(coro: Any) -> Any:
        try:
            return await coro
        except UpstreamError as exc:
            raise APIError(exc.status, str(exc)) from None
        except ValueError as exc:
            raise APIError(400, str(exc), param=getattr(exc, "param", None)) from None

    @app.get("/health")
    async def health() -> dict[str, Any]:
        replicas = {r.id: r.healthy for r in plane.scheduler.replicas.values()}
        return {"status": "ok" if all(replicas.values()) else "degraded", "replicas": replicas}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(plane.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(request: Request) -> JSONResponse:
        caller(request, {})
        created = int(time.time())
        data = [
            {"id": m.name, "object": "model", "created": created, "owned_by": "sage-prefect", "kind": m.kind}
            for m in config.models
        ]
        return JSONResponse({"object": "list", "data": data})

    async def embeddings(request: Request) -> JSONResponse:
        body = await body_of(request)
        who = caller(request, body)
        name = require_model(body)
        engine = plane.embedding_engine(name)
        texts = _embedding_inputs(body.get("input"), config.limits.max_inputs)
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise APIError(
                400, f"encoding_format must be 'float' or 'base64', got {fmt!r}", param="encoding_format"
            )
        keep = _truncation(body.get("truncate_prompt_tokens"), engine.max_input_tokens)
        tokens = engine.count_tokens(texts)
        # only the inputs over ``keep`` are cut, and counted again
        if keep is not None and (over := [i for i, n in enumerate(tokens) if n > keep]):
            try:
                cut = engine.truncate([texts[i] for i in over], keep)
            except NotImplementedError as exc:
                raise APIError(400, f"{exc} (model {name})", param="truncate_prompt_tokens") from None
            for i, text, n in zip(over, cut, engine.count_tokens(cut), strict=True):
                texts[i], tokens[i] = text, n
        for i, n in enumerate(tokens):
            if n > engine.max_input_tokens:
                raise APIError(
                    400,
                    f"input[{i}] has {n} tokens; the maximum for {name} is {engine.max_input_tokens}",
                    param=f"input[{i}]",
                    code="context_length_exceeded",
                )
        plane.metrics.requests.labels(name, who.slo, "embeddings").inc()
        vectors = await guarded(plane.embed(name, texts, tokens, who.slo, who.priority))
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(v, fmt)} for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}
        return JSONResponse({"object": "list", "data": data, "model": name, "usage": usage})

    async def completion(request: Request, chat: bool) -> Response:
        body = await body_of(request)
        who = caller(request, body)
        name = require_model(body)
        engine = plane.llm_engine(name)
        try:
            greq = _generation_request(body, chat, engine, config)
        except InvalidRequest as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        greq.priority = who.priority
        plane.metrics.requests.labels(name, who.slo, "chat" if chat else "completions").inc()
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, "stream must be a boolean", param="stream")
        greq.stream = stream
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise APIError(400, "stream_options must be an object", param="stream_options")
        created = int(time.time())
        prefix = "chatcmpl-" if chat else "cmpl-"
        rid = prefix + os.urandom(12).hex()
        greq.id = rid
        events = plane.generate(name, greq, who.slo)
        if not stream:
            text, finish, usage = "", "stop", {"prompt_tokens": 0, "completion_tokens": 0}
            calls: list[dict[str, Any]] = []

            async def collect() -> None:
                nonlocal text, finish, usage
                async for ev in events:
                    text += ev.text
                    if ev.tool_calls:
                        merge_tool_calls(calls, ev.tool_calls)
                    if ev.finish_reason:
                        finish = ev.finish_reason
                        usage = {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens}

            await guarded(collect())
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": None}
                if calls:
                    message["tool_calls"] = calls
                elif not text:
                    message["content"] = ""
                choice["message"] = message
            else:
                choice["text"] = text
            obj = "chat.completion" if chat else "text_completion"
            return JSONResponse(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": name,
                    "choices": [choice],
                    "usage": usage,
                }
            )
        # streaming: wait for the first event before answering, so admission errors keep their status
        iterator = events.__aiter__()
        try:
            first = await guarded(iterator.__anext__())
        except StopAsyncIteration:
            first = None
        include_usage = bool(options.get("include_usage"))
        return StreamingResponse(
            _sse(iterator, first, rid, created, name, chat, include_usage), media_type="text/event-stream"
        )

    async def chat_completions(request: Request) -> Response:
        return await completion(request, chat=True)

    async def completions(request: Request) -> Response:
        return await completion(request, chat=False)

    # The OpenAI routes are plain Starlette routes: they read and check their own bodies, so
    # FastAPI's per-request machinery (dependency solving, cookie and query parsing) would be
    # pure overhead, about a fifth of a proxied request's CPU. Errors reach the same handlers.
    app.add_route("/v1/models", models, methods=["GET"])
    app.add_route("/v1/embeddings", embeddings, methods=["POST"])
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_route("/v1/completions", completions, methods=["POST"])
    return app


def _truncation(value: Any, limit: int) -> int | None:
    """vLLM's ``truncate_prompt_tokens``: ``None`` keeps inputs whole (an over-long one is a
    400), ``-1`` cuts each input to the model's limit, ``k`` to its last ``k`` tokens."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < -1 or value == 0:
        raise APIError(
            400,
            f"truncate_prompt_tokens must be -1 (the model's limit) or a positive integer, got {value!r}",
            param="truncate_prompt_tokens",
        )
    if value > limit:
        raise APIError(
            400,
            f"truncate_prompt_tokens is {value}, more than the model's limit of {limit} tokens",
            param="truncate_prompt_tokens",
        )
    return limit if value == -1 else value


def _embedding_inputs(value: Any, max_inputs: int) -> list[str]:
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list):
        if not value:
            raise APIError(400, "'input' must not be an empty list", param="input")
        if all(isinstance(v, int) for v in value) or all(isinstance(v, list) for v in value):
            raise APIError(400, "token-id inputs are not supported; send strings", param="input")
        for i, v in enumerate(value):
            if not isinstance(v, str):
                raise APIError(
                    400, f"input[{i}] must be a string, got {type(v).__name__}", param=f"input[{i}]"
                )
        texts = list(value)
    elif value is None:
        raise APIError(400, "'input' is required", param="input")
    else:
        raise APIError(
            400, f"'input' must be a string or a list of strings, got {type(value).__name__}", param="input"
        )
    if len(texts) > max_inputs:
        raise APIError(
            400, f"'input' has {len(texts)} items; at most {max_inputs} are allowed", param="input"
        )
    for i, t in enumerate(texts):
        if not t.strip():
            raise APIError(
                400, f"input[{i}] is empty", param=f"input[{i}]" if isinstance(value, list) else "input"
            )
    return texts


def _encode(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def _number(body: dict[str, Any], field: str, default: float, low: float, high: float) -> float:
    value = body.get(field, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not (low <= value <= high):
        raise APIError(400, f"{field} must be a number between {low} and {high}, got {value!r}", param=field)
    return float(value)


def _generation_request(
    body: dict[str, Any], chat: bool, engine: Any, config: ControlPlaneConfig
) -> GenerationRequest:
    messages: list[dict[str, Any]] | None = None
    if chat:
        raw = body.get("messages")
        if not isinstance(raw, list) or not raw:
            raise APIError(400, "'messages' must be a non-empty list", param="messages")
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or m.get("role") not in (
                "system",
                "user",
                "assistant",
                "tool",
                "developer",
            ):
                raise APIError(
                    400,
                    f"messages[{i}] needs a role of system, user, assistant, tool or developer",
                    param=f"messages[{i}].role",
                )
            content = m.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
                m = {**m, "content": content}
            elif content is not None and not isinstance(content, str):
                raise APIError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
            _check_message_tools(m, i)
            raw[i] = m
        messages = raw
        tools = check_tools(body.get("tools"))
        tool_choice = check_tool_choice(body.get("tool_choice"), tools)
        parallel = body.get("parallel_tool_calls", True)
        if not isinstance(parallel, bool):
            raise APIError(400, "parallel_tool_calls must be a boolean", param="parallel_tool_calls")
        response_format = check_response_format(body.get("response_format"))
        # with tool_choice 'none' the tools are left out of the prompt (as vLLM's
        # --exclude-tools-when-tool-choice-none does): the model is not to call them
        prompt = engine.render_chat(messages, tools if tool_choice != "none" else None)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "'prompt' must be a non-empty string", param="prompt")
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or n != 1):
        raise APIError(
            400, f"n must be 1 (one choice per request; send n requests for n answers), got {n!r}", param="n"
        )
    field = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = body.get(field, 16 if not chat else 256)
    if max_tokens is None:
        max_tokens = 16 if not chat else 256
    if (
        isinstance(max_tokens, bool)
        or not isinstance(max_tokens, int)
        or not (1 <= max_tokens <= config.limits.max_tokens)
    ):
        raise APIError(
            400,
            f"{field} must be an integer between 1 and {config.limits.max_tokens}, got {max_tokens!r}",
            param=field,
        )
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise APIError(400, "stop must be a string or a list of up to 4 strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, "seed must be an integer", param="seed")
    forwarded: dict[str, Any] = {
        k: body[k] for k in ("presence_penalty", "frequency_penalty", "user", "logit_bias") if k in body
    }
    if not chat:
        tools, tool_choice, parallel, response_format = None, "none", True, None
        for key in ("tools", "tool_choice", "response_format"):
            if body.get(key) is not None:
                raise APIError(400, f"{key} is a chat completions field (/v1/chat/completions)", param=key)
    return GenerationRequest(
        id="",
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=stop,
        seed=seed,
        messages=messages,
        extra=forwarded,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        response_format=response_format,
    )


def _check_message_tools(message: dict[str, Any], i: int) -> None:
    """An assistant message's earlier ``tool_calls`` and a ``tool`` message's ``tool_call_id``."""
    if message["role"] == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise APIError(
            400,
            f"messages[{i}] has role 'tool' and needs a tool_call_id",
            param=f"messages[{i}].tool_call_id",
        )
    calls = message.get("tool_calls")
    if calls is None:
        return
    if message["role"] != "assistant" or not isinstance(calls, list):
        raise APIError(
            400,
            f"messages[{i}].tool_calls must be a list on an assistant message",
            param=f"messages[{i}].tool_calls",
        )
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(fn, dict)
            or not isinstance(fn.get("name"), str)
            or not isinstance(fn.get("arguments"), str)
        ):
            raise APIError(
                400,
                f"messages[{i}].tool_calls[{k}] needs function.name and function.arguments (a JSON string)",
                param=f"messages[{i}].tool_calls[{k}]",
            )


def merge_tool_calls(calls: list[dict[str, Any]], deltas: list[dict[str, Any]]) -> None:
    """Fold OpenAI ``delta.tool_calls`` entries into whole ``message.tool_calls`` (in place)."""
    for delta in deltas:
        index = int(delta.get("index", 0))
        while len(calls) <= index:
            calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call, fn = calls[index], delta.get("function") or {}
        if delta.get("id"):
            call["id"] = delta["id"]
        if fn.get("name"):
            call["function"]["name"] = fn["name"]
        call["function"]["arguments"] += fn.get("arguments") or ""


async def _sse(
    iterator: AsyncIterator[Any],
    first: Any,
    rid: str,
    created: int,
    model: str,
    chat: bool,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(
        text: str | None, finish: str | None, role: bool = False, calls: list[dict[str, Any]] | None = None
    ) -> bytes:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = calls
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        payload: dict[str, Any] = {
            "id": rid,
            "object": obj,
            "created": created,
            "model": model,
            "choices": [choice],
        }
        if include_usage:
            payload["usage"] = None
        return f"data: {json.dumps(payload)}\n\n".encode()

    usage: dict[str, int] | None = None
    if chat:
        yield chunk(None, None, role=True)
    try:
        event = first
        while event is not None:
            yield chunk(event.text, event.finish_reason, calls=event.tool_calls)
            if event.finish_reason:
                usage = {
                    "prompt_tokens": event.prompt_tokens,
                    "completion_tokens": event.completion_tokens,
                    "total_tokens": event.prompt_tokens + event.completion_tokens,
                }
            try:
                event = await iterator.__anext__()
            except StopAsyncIteration:
                event = None
    except (ServiceError, UpstreamError, ValueError) as exc:
        status = getattr(exc, "status", 400)
        err = {
            "error": {
                "message": str(exc),
                "type": ERROR_TYPES.get(status, "server_error"),
                "param": None,
                "code": None,
            }
        }
        yield f"data: {json.dumps(err)}\n\n".encode()
    if include_usage and usage is not None:
        payload = {
            "id": rid,
            "object": obj,
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage,
        }
        yield f"data: {json.dumps(payload)}\n\n".encode()
    yield b"data: [DONE]\n\n"
