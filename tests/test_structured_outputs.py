"""Tool calling and structured outputs on the real model (SmolLM2-135M-Instruct from the model
store) through the real gateway (the session's control plane, a subprocess), driven by the real
``openai`` SDK (sync, async, streaming) and LangChain."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import jsonschema
import pytest
from conftest import REAL_LLM

pytestmark = pytest.mark.timeout(600)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search_web",
        "description": "Search the web for pages about a query",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "max_results": {"type": "integer"}},
            "required": ["query"],
        },
    },
}
TOOLS = [WEATHER, SEARCH]
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def client(base_url: str) -> Any:
    import openai

    return openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)


def parameters(name: str) -> dict[str, Any]:
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


def check_call(name: str, arguments: str) -> dict[str, Any]:
    """The call names one of the tools and its arguments validate against that tool's schema."""
    assert name in ("get_weather", "search_web"), name
    args = json.loads(arguments)
    jsonschema.validate(args, parameters(name))
    return dict(args)


def test_a_factual_question_is_answered(controlplane: str) -> None:
    answer = client(controlplane).chat.completions.create(
        model=REAL_LLM,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    assert "Paris" in answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"


def test_tool_call_required_through_the_sdk(controlplane: str) -> None:
    response = client(controlplane).chat.completions.create(
        model=REAL_LLM,
        messages=ASK_WEATHER,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=128,
        temperature=0,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and choice.message.refusal is None
    calls = choice.message.tool_calls
    assert calls and all(c.type == "function" and c.id.startswith("call_") for c in calls)
    args = check_call(calls[0].function.name, calls[0].function.arguments)
    assert calls[0].function.name == "get_weather" and "paris" in args["city"].lower()


def test_named_tool_choice_calls_that_function(controlplane: str) -> None:
    response = client(controlplane).chat.completions.create(
        model=REAL_LLM,
        messages=ASK_WEATHER,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "search_web"}},
        max_tokens=64,
        temperature=0,
    )
    calls = response.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["search_web"]
    check_call("search_web", calls[0].function.arguments)


def test_streamed_tool_calls_join_to_the_whole_call(controlplane: str) -> None:
    stream = client(controlplane).chat.completions.create(
        model=REAL_LLM,
        messages=ASK_WEATHER,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=64,
        temperature=0,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert deltas[0].id and deltas[0].function.name == "get_weather" and deltas[0].type == "function"
    assert len(deltas) > 2  # the arguments arrive in pieces
    arguments = "".join(d.function.arguments or "" for d in deltas)
    check_call("get_weather", arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the same request unstreamed gives the same call (greedy)
    whole = client(controlplane).chat.completions.create(
        model=REAL_LLM,
        messages=ASK_WEATHER,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=64,
        temperature=0,
    )
    assert whole.choices[0].message.tool_calls[0].function.arguments == arguments


def test_async_client_and_a_tool_result_on_the_next_turn(controlplane: str) -> None:
    import openai

    async def run() -> tuple[Any, Any]:
        async with openai.AsyncOpenAI(base_url=controlplane, api_key="none", max_retries=0) as c:
            first = await c.chat.completions.create(
                model=REAL_LLM,
                messages=ASK_WEATHER,
                tools=TOOLS,
                tool_choice="required",
                max_tokens=128,
                temperature=0,
            )
            call = first.choices[0].message.tool_calls[0]
            messages = [
                *ASK_WEATHER,
                first.choices[0].message.model_dump(exclude_none=True),
                {
                    "role": "tool",
                    "tool_call_id": call.id,
                    "content": json.dumps({"temperature_c": 18, "sky": "sunny"}),
                },
            ]
            second = await c.chat.completions.create(
                model=REAL_LLM,
                messages=messages,
                tools=TOOLS,
                tool_choice="none",
                max_tokens=48,
                temperature=0,
            )
            return first, second

    first, second = asyncio.run(run())
    assert first.choices[0].finish_reason == "tool_calls"
    answer = second.choices[0].message
    assert second.choices[0].finish_reason in ("stop", "length") and not answer.tool_calls
    assert answer.content  # the model answers in text once it has the tool's result


def test_tool_choice_auto_answers_in_one_of_the_two_forms(controlplane: str) -> None:
    response = client(controlplane).chat.completions.create(
        model=REAL_LLM, messages=ASK_WEATHER, tools=TOOLS, tool_choice="auto", max_tokens=48, temperature=0
    )
    message, finish = response.choices[0].message, response.choices[0].finish_reason
    if message.tool_calls:
        assert finish == "tool_calls" and message.content is None
        for call in message.tool_calls:
            check_call(call.function.name, call.function.arguments)
    else:
        assert message.content and not message.content.startswith("<tool_call>")


SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 16},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "age", "address"],
        "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "status": {"enum": ["pending", "shipped", "delivered"]},
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 2,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "maxLength": 8},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    },
                    "required": ["sku", "qty"],
                    "additionalProperties": False,
                },
            },
            "express": {"type": "boolean"},
        },
        "required": ["status", "items", "express"],
        "additionalProperties": False,
    },
    "review": {
        "type": "object",
        "properties": {
            "rating": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
            "tags": {"type": "array", "items": {"enum": ["fast", "cheap", "broken", "great"]}, "maxItems": 3},
            "summary": {"type": "string", "maxLength": 24},
            "scores": {
                "type": "object",
                "properties": {
                    "price": {"type": "integer", "minimum": 0, "maximum": 10},
                    "quality": {"type": "integer", "minimum": 0, "maximum": 10},
                },
                "required": ["price", "quality"],
                "additionalProperties": False,
            },
        },
        "required": ["rating", "tags", "summary", "scores"],
        "additionalProperties": False,
    },
}
PROMPTS = {
    "person": "Invent a person and give their name, age and address as JSON.",
    "order": "Write a shop order as JSON.",
    "review": "Write a product review as JSON.",
}


def sampled_json(base_url: str, requests: list[tuple[str, int, bool]], concurrency: int) -> list[str]:
    """One sampled answer per (schema name, seed, constrained), ``concurrency`` at a time
    (temperature 1: the model alone drifts)."""
    import openai

    def fmt(name: str) -> dict[str, Any]:
        return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0) as c:
            limit = asyncio.Semaphore(concurrency)

            async def one(name: str, seed: int, constrained: bool) -> str:
                async with limit:
                    r = await c.chat.completions.create(
                        model=REAL_LLM,
                        messages=[{"role": "user", "content": PROMPTS[name]}],
                        max_tokens=160,
                        temperature=1.0,
                        seed=seed,
                        **({"response_format": fmt(name)} if constrained else {}),
                    )
                    if constrained:  # the grammar ends the answer: it never runs into max_tokens
                        assert r.choices[0].finish_reason == "stop", r.choices[0]
                    return str(r.choices[0].message.content)

            return list(await asyncio.gather(*(one(*request) for request in requests)))

    return asyncio.run(run())


@pytest.fixture(scope="module")
def sampled_answers(controlplane: str) -> dict[tuple[str, bool], list[str]]:
    """50 seeded sampled requests per schema with the constraint and 8 of "order" without, all
    158 sent together (the control plane's SmolLM2 takes 48 at a time: three different grammars
    and unconstrained rows share every decode step). Keyed by (schema name, constrained)."""
    requests = [("order", seed, False) for seed in range(8)]  # first: the longest answers
    requests += [(name, seed, True) for seed in range(50) for name in sorted(SCHEMAS)]
    answers = sampled_json(controlplane, requests, concurrency=48)
    by_key: dict[tuple[str, bool], list[str]] = {}
    for (name, _, constrained), answer in zip(requests, answers, strict=True):
        by_key.setdefault((name, constrained), []).append(answer)
    return by_key


def validates(text: str, name: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMAS[name])
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_output_validates_on_50_sampled_requests(
    sampled_answers: dict[tuple[str, bool], list[str]], name: str
) -> None:
    answers = sampled_answers[name, True]
    assert len(answers) == 50
    invalid = [a for a in answers if not validates(a, name)]
    assert not invalid, invalid[:3]
    assert len(set(answers)) > 10  # really sampled, not one answer fifty times


def test_without_the_constraint_the_same_requests_do_not_validate(
    sampled_answers: dict[tuple[str, bool], list[str]],
) -> None:
    """The check above can fail: the same model, sampled the same way, rarely writes valid JSON alone."""
    answers = sampled_answers["order", False]
    assert len(answers) == 8
    assert sum(validates(a, "order") for a in answers) <= 2, answers


def test_json_object_mode(controlplane: str) -> None:
    response = client(controlplane).chat.completions.create(
        model=REAL_LLM,
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        response_format={"type": "json_object"},
        max_tokens=48,
        temperature=0,
    )
    assert isinstance(json.loads(response.choices[0].message.content), dict)


def test_langchain_bind_tools_and_structured_output(controlplane: str) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    chat = langchain_openai.ChatOpenAI(
        model=REAL_LLM, base_url=controlplane, api_key="none", temperature=0, max_tokens=64, max_retries=0
    )
    reply = chat.bind_tools(TOOLS, tool_choice="get_weather").invoke("What is the weather in Rome?")
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "get_weather"
    assert isinstance(reply.tool_calls[0]["args"].get("city"), str)

    class City(BaseModel):
        """A city and its country."""

        name: str = Field(description="The city's name", max_length=30)
        country: str = Field(description="The country it is in", max_length=30)

    city = chat.with_structured_output(City).invoke("Name the capital of Italy.")
    assert isinstance(city, City) and city.name


BAD_FIELDS = [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}]},
        "tools[0].function.parameters",
    ),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "objekt"}},
            }
        },
        "response_format.json_schema.schema",
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}},
        "response_format.json_schema.name",
    ),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": [{"role": "tool", "content": "18 C"}]}, "messages[0].tool_call_id"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_FIELDS)
def test_bad_tool_and_format_fields_get_400_naming_the_field(
    controlplane: str, fields: dict[str, Any], param: str
) -> None:
    body = {"model": REAL_LLM, "messages": ASK_WEATHER, "max_tokens": 8, **fields}
    response = httpx.post(f"{controlplane}/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


def test_an_openai_upstream_forwards_tools_and_formats(controlplane: str, tmp_path: Any) -> None:
    """A gateway whose model is an ``openai`` upstream (here the session's gateway; in production
    a ``vllm serve``) forwards tools / tool_choice / response_format unchanged and relays the calls."""
    import yaml

    from sage_prefect.controlplane.server import start_background

    config = {
        "models": [
            {
                "name": "front",
                "kind": "llm",
                "engine": "openai",
                "params": {"base_url": controlplane, "model": REAL_LLM},
            }
        ]
    }
    (tmp_path / "front.yaml").write_text(yaml.safe_dump(config))
    with start_background(tmp_path / "front.yaml", log=tmp_path / "front.log") as front:
        c = client(front.base_url)
        kwargs: dict[str, Any] = {
            "messages": ASK_WEATHER,
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "max_tokens": 64,
            "temperature": 0,
        }
        direct = client(controlplane).chat.completions.create(model=REAL_LLM, **kwargs)
        via = c.chat.completions.create(model="front", **kwargs)
        assert via.choices[0].finish_reason == "tool_calls"
        call, expected = via.choices[0].message.tool_calls[0], direct.choices[0].message.tool_calls[0]
        assert (call.function.name, call.function.arguments) == (
            expected.function.name,
            expected.function.arguments,
        )

        streamed = [
            ch for ch in c.chat.completions.create(model="front", stream=True, **kwargs) if ch.choices
        ]
        deltas = [tc for ch in streamed for tc in (ch.choices[0].delta.tool_calls or [])]
        assert deltas[0].function.name == "get_weather"
        assert "".join(d.function.arguments or "" for d in deltas) == expected.function.arguments
        assert streamed[-1].choices[0].finish_reason == "tool_calls"

        fmt = {"type": "json_schema", "json_schema": {"name": "order", "schema": SCHEMAS["order"]}}
        answer = c.chat.completions.create(
            model="front",
            messages=[{"role": "user", "content": PROMPTS["order"]}],
            response_format=fmt,
            max_tokens=160,
            temperature=0,
        )
        assert validates(answer.choices[0].message.content, "order")
        bad = httpx.post(
            f"{front.base_url}/chat/completions",
            json={
                "model": "front",
                "messages": ASK_WEATHER,
                "tools": TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice"
