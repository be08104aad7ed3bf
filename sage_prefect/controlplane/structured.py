"""Tool calling and structured outputs: request checks, prompts, grammars and the tool-call reader.

The gateway checks OpenAI's ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` /
``response_format`` fields here (`check_tools`, `check_tool_choice`, `check_response_format`)
for every engine: a bad field is an `InvalidRequest` (400) naming it. An ``openai`` upstream
(vLLM) gets the fields unchanged; the local ``transformers`` engine serves them itself:

* **Prompt.** Tools are described in a system message in the Hermes / Qwen2.5 convention
  (`tool_prompt`): the model answers a call as
  ``<tool_call>\\n{"name": "<name>", "arguments": <JSON>}\\n</tool_call>``. Earlier assistant
  calls and ``role: "tool"`` results are written back in the same convention
  (`messages_for_template`), so a second turn reads like the first.
* **Grammar.** `output_grammar` builds one llguidance grammar (Lark with embedded JSON schemas)
  per request: ``required`` = one call (or several when ``parallel_tool_calls``) of any tool;
  a named ``tool_choice`` = one call of that function; ``auto`` = either calls or a plain reply;
  ``response_format`` ``json_object`` / ``json_schema`` = JSON that matches. The engine masks
  each constrained row's logits with it at every step (`TokenConstraint`), so the output is
  valid by construction while free and constrained requests share one batch. Each call's
  ``arguments`` match that tool's ``parameters`` schema.
* **Reading.** `ToolCallReader` turns the generated text into OpenAI's message parts as it
  streams: content deltas, and ``tool_calls`` deltas (id, name, then argument fragments).

Why llguidance: it is what vLLM (``guided_decoding_backend=guidance``), SGLang and llama.cpp use
for grammars, it compiles a JSON schema or a Lark grammar lazily in Rust (no per-schema
precompilation: a few ms per request, then ~30 µs per token mask on this CPU for a 49k
vocabulary), has no Python dependencies, and computes a batch of masks in parallel with the
GIL released. xgrammar needs torch-compiled kernels (and triton) and precompiles each schema;
outlines-core builds a full regex index per schema, which is slow for nested schemas.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

TOOL_CALL_OPEN = "<tool_call>\n"
TOOL_CALL_CLOSE = "\n</tool_call>"
_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_CALL_HEAD = re.compile(r'\{"name": "([a-zA-Z0-9_-]{1,64})", "arguments": ')
_ARGS_END = "}" + TOOL_CALL_CLOSE  # the call object's closing brace, then the closing tag


class InvalidRequest(ValueError):
    """A client mistake in one request (answered 400); ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None, *, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


# ---------------------------------------------------------------------------------- request checks


def content_text(content: Any) -> str:
    """OpenAI message content as plain text (a string, or a list of ``{"type": "text"}`` parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    return str(content)


def check_context_length(n: int, max_tokens: int, context: int, model: str) -> None:
    """A prompt of ``n`` tokens plus ``max_tokens`` must fit the model's ``context`` (a 400
    ``context_length_exceeded`` naming ``messages`` or ``max_tokens`` otherwise)."""
    if n >= context:
        raise InvalidRequest(
            f"the prompt is {n} tokens, which leaves no room in the model's context of {context} tokens "
            f"(model {model!r}); shorten the prompt",
            "messages",
            code="context_length_exceeded",
        )
    if n + max_tokens > context:
        raise InvalidRequest(
            f"the prompt ({n} tokens) plus max_tokens ({max_tokens}) is {n + max_tokens} "
            f"tokens, more than the model's context of {context} tokens (model {model!r}); "
            f"set max_tokens to at most {context - n} or shorten the prompt",
            "max_tokens",
            code="context_length_exceeded",
        )


def _check_schema(schema: Any, param: str) -> None:
    import jsonschema

    if not isinstance(schema, dict):
        raise InvalidRequest(f"{param} must be a JSON Schema object, got {type(schema).__name__}", param)
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(
            schema
        )
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise InvalidRequest(
            f"{param} is not a valid JSON Schema: {exc.message}" + (f" (at {where})" if where else ""), param
        ) from None


def check_tools(tools: Any) -> list[dict[str, Any]] | None:
    """OpenAI's ``tools``: a list of ``{"type": "function", "function": {"name", "description",
    "parameters", "strict"}}``; returns them with ``parameters`` defaulted to an empty object."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise InvalidRequest(f"tools must be a list, got {type(tools).__name__}", "tools")
    if not tools:
        return None
    checked: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidRequest(f"{where} must be an object", where)
        if tool.get("type", "function") != "function":
            raise InvalidRequest(
                f"{where}.type must be 'function', got {tool.get('type')!r}", f"{where}.type"
            )
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise InvalidRequest(f"{where}.function must be an object", f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"{where}.function.name is required", f"{where}.function.name")
        if not _NAME_RE.match(name):
            raise InvalidRequest(
                f"{where}.function.name {name!r} must be 1-64 characters of a-z, A-Z, 0-9, _ and -",
                f"{where}.function.name",
            )
        if name in seen:
            raise InvalidRequest(f"{where}.function.name {name!r} is given twice", f"{where}.function.name")
        seen.add(name)
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidRequest(
                f"{where}.function.description must be a string", f"{where}.function.description"
            )
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        _check_schema(params, f"{where}.function.parameters")
        checked.append(
            {
                "type": "function",
                "function": {"name": name, "description": description or "", "parameters": params},
            }
        )
    return checked


def check_tool_choice(choice: Any, tools: list[dict[str, Any]] | None) -> str | dict[str, Any]:
    """``none`` | ``auto`` | ``required`` | ``{"type": "function", "function": {"name"}}``
    (default: ``auto`` with tools, ``none`` without)."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidRequest(
                f"tool_choice must be 'none', 'auto', 'required' or a function, got {choice!r}", "tool_choice"
            )
        if choice == "required" and not tools:
            raise InvalidRequest("tool_choice 'required' needs tools", "tool_choice")
        return choice
    if (
        not isinstance(choice, dict)
        or choice.get("type") != "function"
        or not isinstance(choice.get("function"), dict)
    ):
        raise InvalidRequest(
            'tool_choice must be a string or {"type": "function", "function": {"name": ...}}', "tool_choice"
        )
    name = choice["function"].get("name")
    names = [t["function"]["name"] for t in tools or ()]
    if name not in names:
        known = ", ".join(names) or "none were given"
        raise InvalidRequest(
            f"tool_choice names function {name!r}, which is not among the tools ({known})", "tool_choice"
        )
    return {"type": "function", "function": {"name": name}}


def check_response_format(value: Any) -> dict[str, Any] | None:
    """``{"type": "text"}`` (None), ``{"type": "json_object"}``, or
    ``{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}``."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest("response_format must be an object", "response_format")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise InvalidRequest(
            f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
            "response_format.type",
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidRequest("response_format.json_schema must be an object", "response_format.json_schema")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidRequest(
            "response_format.json_schema.name is required: 1-64 characters of a-z, A-Z, 0-9, _ and -",
            "response_format.json_schema.name",
        )
    schema = spec.get("schema", {"type": "object"})
    _check_schema(schema, "response_format.json_schema.schema")
    return {"type": "json_schema", "json_schema": {**spec, "schema": schema}}


# ---------------------------------------------------------------------------------- prompts


def tool_prompt(tools: list[dict[str, Any]]) -> str:
    """The system text that describes the tools and the call format (Hermes / Qwen2.5 style)."""
    lines = [json.dumps(t["function"], ensure_ascii=False) for t in tools]
    return (
        "You can call functions. The functions are:\n<tools>\n"
        + "\n".join(lines)
        + "\n</tools>\nTo call a function, answer with\n"
        '<tool_call>\n{"name": "<function name>", "arguments": {<arguments as JSON>}}\n</tool_call>\n'
        "Otherwise answer normally."
    )


def _call_text(call: dict[str, Any]) -> str:
    fn = call.get("function") or {}
    args = fn.get("arguments") or "{}"
    try:
        args = json.dumps(json.loads(args), ensure_ascii=False)
    except (TypeError, ValueError):
        args = str(args)
    return f'{TOOL_CALL_OPEN}{{"name": "{fn.get("name", "")}", "arguments": {args}}}{TOOL_CALL_CLOSE}'


def messages_for_template(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """Messages a plain chat template can render: the tool description merged into the system
    message, assistant calls and tool results written as text in the same convention."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(_call_text(c) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": f"{content}\n{calls}" if content else calls})
        elif role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        elif role == "developer":
            out.append({"role": "system", "content": content})
        else:
            out.append({"role": role, "content": content})
    if tools:
        text = tool_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{text}"}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


# ---------------------------------------------------------------------------------- grammars


# JSON as json.dumps writes it: one space after ':' and ',', no newlines (fewer tokens than the
# pretty-printed JSON small models drift into, and a call's text stays on one line)
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a Lark string literal: JSON escaping is valid there


def _json_rule(schema: dict[str, Any]) -> str:
    return f"%json {json.dumps({**schema, 'x-guidance': _JSON_OPTIONS})}"


def closed_objects(schema: Any) -> Any:
    """A copy of a tool's parameter schema whose objects take no keys beyond their
    ``properties`` unless they say otherwise (as OpenAI's strict mode requires): without it a
    small model fills calls with invented arguments."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        k: closed_objects(v) if k not in ("enum", "const", "default", "examples") else v
        for k, v in schema.items()
    }
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def output_grammar(
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any],
    parallel_tool_calls: bool,
    response_format: dict[str, Any] | None,
) -> str | None:
    """The llguidance grammar (Lark) a request's output must match, or None for free text."""
    from llguidance import LLMatcher

    content: str | None = None  # the rule a plain reply must match (None: any text)
    rules: list[str] = []
    if response_format is not None:
        schema = (
            {"type": "object"}
            if response_format["type"] == "json_object"
            else response_format["json_schema"]["schema"]
        )
        rules.append(f"reply: {_json_rule(schema)}")
        content = "reply"
    calling = bool(tools) and tool_choice != "none"
    if not calling:
        return LLMatcher.grammar_from_lark(f"start: {content}\n" + "\n".join(rules)) if content else None
    assert tools is not None
    chosen = tools
    if isinstance(tool_choice, dict):
        chosen = [t for t in tools if t["function"]["name"] == tool_choice["function"]["name"]]
    bodies = []
    for i, tool in enumerate(chosen):
        fn = tool["function"]
        head = f'{{"name": "{fn["name"]}", "arguments": '
        rules.append(f'fn_{i}: {_lark_string(head)} args_{i} "}}"')
        rules.append(f"args_{i}: {_json_rule(closed_objects(fn['parameters']))}")
        bodies.append(f"fn_{i}")
    rules.append(
        f"call: {_lark_string(TOOL_CALL_OPEN)} ({' | '.join(bodies)}) {_lark_string(TOOL_CALL_CLOSE)}"
    )
    several = parallel_tool_calls and not isinstance(tool_choice, dict)
    # parallel calls: at most one more than there are tools (a small model otherwise repeats its
    # call until max_tokens)
    more = len(chosen)
    rules.append(f'calls: call ("\\n" call){{0,{more}}}' if several else "calls: call")
    if tool_choice == "auto":
        if content is None:
            # any reply that does not start a call; the model may still write "<" later on
            rules.append(r"TEXT: /[^<](.|\n)*/")
            content = "TEXT"
        start = f"start: calls | {content}"
    else:
        start = "start: calls"
    return LLMatcher.grammar_from_lark(start + "\n" + "\n".join(rules))


# ---------------------------------------------------------------------------------- reading calls


@dataclass
class _Call:
    index: int
    id: str
    name: str
    arguments: str = ""


class ToolCallReader:
    r"""Splits generated text into content and OpenAI ``tool_calls`` deltas, as it streams.

    ``feed(text)`` returns ``(content_delta, tool_call_deltas)`` for the new text; ``finish()``
    flushes what was held back. Text that starts with ``<tool_call>`` is read as calls, anything
    else is content. The grammar guarantees the call format, so the reader only follows it.

    >>> reader = ToolCallReader()
    >>> reader.feed('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>')[1][1]
    {'index': 0, 'function': {'arguments': '{"x": 1}'}}
    """

    def __init__(self) -> None:
        self.buffer = ""
        self.mode: str | None = None  # None (undecided), "content", "calls"
        self.calls: list[_Call] = []
        self._pos = 0  # how much of ``buffer`` has been read into calls
        self._open: _Call | None = None  # the call whose arguments are being read

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self.buffer += text
        if self.mode is None:
            if self.buffer.startswith(TOOL_CALL_OPEN):
                self.mode = "calls"
            elif TOOL_CALL_OPEN.startswith(self.buffer):
                return "", []  # may still become a call
            else:
                self.mode = "content"
        if self.mode == "content":
            out, self.buffer = self.buffer, ""
            return out, []
        return "", self._read_calls(final=False)

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        if self.mode == "calls":
            return "", self._read_calls(final=True)
        out, self.buffer = self.buffer, ""
        return out, []

    def _read_calls(self, final: bool) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        while True:
            rest = self.buffer[self._pos :]
            if self._open is None:
                body = rest.lstrip("\n")
                if not body.startswith(TOOL_CALL_OPEN):
                    return deltas
                head = _CALL_HEAD.match(body, len(TOOL_CALL_OPEN))
                if head is None:
                    return deltas
                self._pos += len(rest) - len(body) + head.end()
                self._open = _Call(len(self.calls), "call_" + secrets.token_hex(12), head.group(1))
                self.calls.append(self._open)
                deltas.append(
                    {
                        "index": self._open.index,
                        "id": self._open.id,
                        "type": "function",
                        "function": {"name": self._open.name, "arguments": ""},
                    }
                )
                continue
            end = rest.find(_ARGS_END)
            if end != -1:
                piece = rest[:end]
                self._pos += end + len(_ARGS_END)
            else:
                # hold back a tail that may be the start of the closing "}\n</tool_call>"
                keep = 0 if final else _held_back(rest)
                piece = rest[: len(rest) - keep]
                self._pos += len(piece)
            if piece:
                self._open.arguments += piece
                deltas.append({"index": self._open.index, "function": {"arguments": piece}})
            if end == -1:
                return deltas
            self._open = None


def _held_back(text: str) -> int:
    """Length of the longest suffix of ``text`` that starts the closing of a call."""
    return next(
        (k for k in range(min(len(_ARGS_END), len(text)), 0, -1) if _ARGS_END.startswith(text[-k:])), 0
    )


# ---------------------------------------------------------------------------------- constraint


class TokenConstraint:
    """One request's grammar matcher over the engine's tokenizer (llguidance)."""

    def __init__(self, tokenizer: Any, grammar: str, param: str = "response_format") -> None:
        from llguidance import LLMatcher

        error = LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise InvalidRequest(f"{param}: the requested output format cannot be compiled: {error}", param)
        self.matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise InvalidRequest(
                f"{param}: the requested output format cannot be compiled: {self.matcher.get_error()}", param
            )

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"constrained decoding went off its grammar: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        return bool(self.matcher.is_stopped())
