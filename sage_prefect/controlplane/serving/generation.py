"""Running a chat or text completion and answering it: one JSON object, or server-sent events.

Shared by ``chat`` and ``completions``. A non-streaming request whose client disconnects is
cancelled (dropped from the queue, or its sequence freed in the engine); a stream stops when
its client goes away (Starlette cancels the response), with the same effect.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from sage_prefect.controlplane.engines.base import GenerationRequest, LLMEngine, TokenEvent, UpstreamError
from sage_prefect.controlplane.protocol import (
    APIError,
    ChatCompletionRequest,
    Choice,
    CompletionRequest,
    CompletionResponse,
    Usage,
    error_body,
    parse,
)
from sage_prefect.controlplane.service import ServiceError
from sage_prefect.controlplane.serving.common import Gateway, guarded
from sage_prefect.controlplane.structured import InvalidRequest


@dataclass
class Prepared:
    model: str
    request: GenerationRequest
    stream: bool
    include_usage: bool


def finish_request(
    engine: LLMEngine,
    body: ChatCompletionRequest | CompletionRequest,
    request: GenerationRequest,
    length_field: str,
) -> Prepared:
    """Let the engine check and tokenise the request (a request it cannot run is a 400 here,
    before it is queued or batched with anyone's)."""
    try:
        engine.prepare(request)
    except InvalidRequest as exc:
        param = length_field if exc.param == "max_tokens" else exc.param
        raise APIError(400, str(exc), param=param, code=exc.code) from None
    except ValueError as exc:
        raise APIError(400, str(exc)) from None
    options = body.stream_options
    return Prepared(
        model=body.model,
        request=request,
        stream=bool(body.stream),
        include_usage=bool(options is not None and options.include_usage),
    )


def completion_length(gateway: Gateway, field: str, value: int | None, default: int) -> int:
    """The completion's ``max_tokens``: ``default`` when unset, at most ``limits.max_tokens``."""
    limit = gateway.config.limits.max_tokens
    if value is None:
        return min(default, limit)
    if value > limit:
        raise APIError(400, f"{field} must be an integer between 1 and {limit}, got {value}", param=field)
    return value


async def serve(
    gateway: Gateway,
    request: Request,
    schema: type[ChatCompletionRequest] | type[CompletionRequest],
    prepare: Callable[[Gateway, Any], Prepared],
    chat: bool,
) -> Response:
    raw = await gateway.body(request)
    key = gateway.authenticate(request)
    body = await gateway.offload(len(raw), parse, schema, raw, gateway.config.limits)
    who = gateway.classify(request, key, body.slo_class, body.priority)
    gateway.plane.admit(body.model, "llm", who.slo)
    prep = await gateway.offload(len(raw), prepare, gateway, body)
    greq = prep.request
    greq.priority, greq.stream = who.priority, prep.stream
    greq.id = ("chatcmpl-" if chat else "cmpl-") + os.urandom(12).hex()
    plane = gateway.plane
    plane.metrics.requests.labels(prep.model, who.slo, "chat" if chat else "completions").inc()
    created = int(time.time())
    events = plane.generate(prep.model, greq, who.slo)
    if not prep.stream:
        answer = await gateway.unless_disconnected(request, guarded(_collect(events)))
        return JSONResponse(_response(greq.id, created, prep.model, chat, *answer))
    # streaming: wait for the first event before answering, so admission errors keep their status
    iterator = events.__aiter__()
    try:
        first: TokenEvent | None = await guarded(iterator.__anext__())
    except StopAsyncIteration:
        first = None
    return StreamingResponse(
        _sse(iterator, first, greq.id, created, prep.model, chat, prep.include_usage),
        media_type="text/event-stream",
    )


async def _collect(events: AsyncIterator[TokenEvent]) -> tuple[str, str, Usage, list[dict[str, Any]]]:
    text, finish = "", "stop"
    usage: Usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    calls: list[dict[str, Any]] = []
    async for ev in events:
        text += ev.text
        if ev.tool_calls:
            merge_tool_calls(calls, ev.tool_calls)
        if ev.finish_reason:
            finish = ev.finish_reason
            usage = {
                "prompt_tokens": ev.prompt_tokens,
                "completion_tokens": ev.completion_tokens,
                "total_tokens": ev.prompt_tokens + ev.completion_tokens,
            }
    return text, finish, usage, calls


def _response(
    rid: str,
    created: int,
    model: str,
    chat: bool,
    text: str,
    finish: str,
    usage: Usage,
    calls: list[dict[str, Any]],
) -> CompletionResponse:
    choice: Choice = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text or None, "refusal": None}
        if calls:
            choice["message"]["tool_calls"] = calls
        elif not text:
            choice["message"]["content"] = ""
    else:
        choice["text"] = text
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


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
    iterator: AsyncIterator[TokenEvent],
    first: TokenEvent | None,
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

    usage: Usage | None = None
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
        yield f"data: {json.dumps(error_body(status, str(exc)))}\n\n".encode()
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
