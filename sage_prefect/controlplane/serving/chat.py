"""``POST /v1/chat/completions``: messages, tools and response formats become one
`GenerationRequest` (rendered with the model's chat template and tokenised off the event loop)."""

from __future__ import annotations

from typing import Any

from sage_prefect.controlplane.engines.base import GenerationRequest, LLMEngine
from sage_prefect.controlplane.protocol import APIError, ChatCompletionRequest
from sage_prefect.controlplane.serving.common import Gateway
from sage_prefect.controlplane.serving.generation import Prepared, completion_length, finish_request
from sage_prefect.controlplane.structured import (
    InvalidRequest,
    check_response_format,
    check_tool_choice,
    check_tools,
)

TEXT_PARTS = ("text", "refusal")


def prepare(gateway: Gateway, body: ChatCompletionRequest) -> Prepared:
    engine = gateway.plane.llm_engine(body.model)
    messages = [m.as_dict() for m in body.messages]
    if not engine.accepts_media:
        _text_only(messages, engine)
    try:
        tools = check_tools(body.tools)
        tool_choice = check_tool_choice(body.tool_choice, tools)
        response_format = check_response_format(body.response_format)
        # with tool_choice 'none' the tools are left out of the prompt (as vLLM's
        # --exclude-tools-when-tool-choice-none does): the model is not to call them
        prompt = engine.render_chat(messages, tools if tool_choice != "none" else None)
    except InvalidRequest as exc:
        raise APIError(400, str(exc), param=exc.param, code=exc.code) from None
    field, max_tokens = body.completion_limit()
    request = GenerationRequest(
        id="",
        prompt=prompt,
        max_tokens=completion_length(gateway, field, max_tokens, 256),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=body.stops(),
        seed=body.seed,
        messages=messages,
        extra=body.forwarded(),
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        response_format=response_format,
    )
    return finish_request(engine, body, request, field)


def _text_only(messages: list[dict[str, Any]], engine: LLMEngine) -> None:
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            for k, part in enumerate(content):
                if part.get("type") not in TEXT_PARTS:
                    raise APIError(
                        400,
                        f"messages[{i}].content[{k}] is a {part.get('type')!r} part; model {engine.name!r} "
                        "reads text only",
                        param=f"messages[{i}].content[{k}].type",
                    )
