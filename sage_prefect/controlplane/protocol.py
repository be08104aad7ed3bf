"""The OpenAI wire protocol: request models, response shapes, the one error builder, size limits.

Every request body is validated from the raw JSON by a pydantic model in strict mode (no
``"5"`` for 5, no ``true`` for 1), with OpenAI's field names and limits. Anything the models
reject is a 400 naming the field (``messages[2].content[0].text``). That covers malformed JSON,
lone surrogates, numbers such as ``1e400``, 64-bit overflow and nesting deeper than the JSON
parser's limit. The
per-deployment bounds (characters per string, messages, inputs) come from
`config.LimitsConfig` through the validation context, so nothing past them is rendered or
tokenised.

Responses are plain dicts with the shapes below (`TypedDict`, so no per-request model cost);
the tests read them with the ``openai`` SDK, and ``benchmarks/faults.py`` checks them against
OpenAI's own OpenAPI spec with schemathesis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypedDict, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from starlette.responses import JSONResponse

_M = TypeVar("_M", bound=BaseModel)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    499: "invalid_request_error",
    502: "server_error",
    503: "service_unavailable",
}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
MAX_MODEL_NAME = 256
DEFAULT_MAX_STRING_CHARS = 1_048_576  # OpenAI's own limit on one string (message content, input)


class APIError(Exception):
    """An answer other than 200: the HTTP status and OpenAI's error fields."""

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
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope (also sent as the last event of a stream that fails)."""
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(exc: APIError) -> JSONResponse:
    headers = None
    if exc.retry_after is not None:
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    return JSONResponse(
        error_body(exc.status, exc.message, exc.param, exc.code), status_code=exc.status, headers=headers
    )


# ---- validation helpers -------------------------------------------------------------------


def param_of(loc: Sequence[int | str]) -> str | None:
    """``("messages", 2, "content")`` -> ``"messages[2].content"``."""
    out = ""
    for part in loc:
        if isinstance(part, str) and (part.startswith("<") or "[" in part):
            continue  # a union member's tag or a validator's name, not a field
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def parse(model: type[_M], raw: bytes, limits: Any) -> _M:
    """Validate a request body, or raise the 400 that names the first field that is wrong."""
    try:
        return model.model_validate_json(raw, context={"limits": limits})
    except ValidationError as exc:
        raise api_error_from(exc) from None


def api_error_from(exc: ValidationError) -> APIError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(
            400, f"invalid JSON body: {first['msg'].removeprefix('Invalid JSON: ')}", code="invalid_json"
        )
    if first["type"] == "model_type" and not first["loc"]:
        got = type(first.get("input")).__name__
        return APIError(400, f"the body must be a JSON object, got {_json_type(got)}")
    param = param_of(first["loc"])
    kind, message = first["type"], first["msg"]
    if kind == "missing":
        message = f"'{param}' is required"
    elif kind.endswith("_field"):  # ours, about the field: "<field> <message>"
        message = f"{param} {message}"
    elif kind == "sage_at" and param:  # ours, about something in the field: "<field>: <message>"
        message = f"{param}: {message}"
    elif not kind.startswith("sage"):  # pydantic's own: "<field>: <message>, got <value>"
        message = f"{param}: {message}, got {_short(first.get('input'))}"
    return APIError(400, message, param=param, code=_CODES.get(kind))


_CODES = {
    "string_too_long": "string_above_max_length",
    "sage_too_long_field": "string_above_max_length",
    "sage_too_many": "array_above_max_length",
}


def _json_type(name: str) -> str:
    return {"list": "an array", "str": "a string", "int": "a number", "float": "a number"}.get(name, name)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fail(message: str, kind: str = "sage") -> PydanticCustomError:
    """An error whose message is ours: shown as-is (``kind`` "sage"), after the field's name
    ("sage_field": "input[2] is empty") or after the field and a colon ("sage_at"); the field
    itself (the envelope's ``param``) comes from where it was raised."""
    return PydanticCustomError(kind, message)


def _limit(info: ValidationInfo, name: str, default: int) -> int:
    limits = info.context.get("limits") if info.context else None
    return int(getattr(limits, name, default)) if limits is not None else default


def _bounded_text(value: str, info: ValidationInfo) -> str:
    limit = _limit(info, "max_string_chars", DEFAULT_MAX_STRING_CHARS)
    if len(value) > limit:
        raise fail(f"is {len(value)} characters long; at most {limit} are allowed", "sage_too_long_field")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise fail("is empty", "sage_field")
    return value


Text = Annotated[str, AfterValidator(_bounded_text)]
InputText = Annotated[str, AfterValidator(_bounded_text), AfterValidator(_not_blank)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Body(BaseModel):
    """Fields every endpoint takes. Unknown fields are ignored, as OpenAI's API does."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME)
    user: str | None = Field(None, max_length=256)
    # sage-prefect's scheduling fields (the x-slo-class / x-priority headers win over them)
    slo_class: str | None = Field(None, max_length=64)
    priority: int | None = Field(None, ge=INT32_MIN, le=INT32_MAX)


# ---- embeddings ---------------------------------------------------------------------------


class EmbeddingRequest(_Body):
    input: list[InputText]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    # vLLM's extension: -1 cuts each input to the model's limit, k to its last k tokens
    truncate_prompt_tokens: int | None = Field(None, ge=-1, le=INT32_MAX)

    @field_validator("input", mode="before")
    @classmethod
    def _strings(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            value = [value]
        elif isinstance(value, list):
            if not value:
                raise fail("'input' must not be an empty list")
            if all(isinstance(v, int) and not isinstance(v, bool) for v in value) or all(
                isinstance(v, list) for v in value
            ):
                raise fail("token-id inputs are not supported; send strings")
        elif value is None:
            raise fail("'input' is required")
        else:
            raise fail(
                f"'input' must be a string or a list of strings, got {_json_type(type(value).__name__)}"
            )
        limit = _limit(info, "max_inputs", 2048)
        if len(value) > limit:
            raise fail(f"'input' has {len(value)} items; at most {limit} are allowed", "sage_too_many")
        return value

    @field_validator("truncate_prompt_tokens", mode="before")
    @classmethod
    def _truncation(cls, value: Any) -> Any:
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < -1
            or value == 0
            or value > INT32_MAX
        ):
            raise fail(
                f"truncate_prompt_tokens must be -1 (the model's limit) or a positive integer, got {_short(value)}"
            )
        return value


# ---- chat ---------------------------------------------------------------------------------


class ContentPart(BaseModel):
    """A part of a message's content: ``text`` parts are read; others (images, audio, files)
    only reach upstream engines that accept them."""

    model_config = ConfigDict(strict=True, extra="allow")

    type: str = Field(max_length=64)
    text: Text | None = None
    refusal: Text | None = None

    @model_validator(mode="after")
    def _has_its_field(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise fail("a 'text' part needs a 'text' string", "sage_at")
        if self.type == "refusal" and self.refusal is None:
            raise fail("a 'refusal' part needs a 'refusal' string", "sage_at")
        return self


Content = Annotated[
    Annotated[Text, Tag("<text>")] | Annotated[list[ContentPart], Tag("<parts>")],
    Discriminator(lambda v: "<text>" if isinstance(v, str) else "<parts>"),
]


class FunctionCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    name: str = Field(max_length=256)
    arguments: Text


class ToolCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    id: str = Field("", max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content | None = Field(None, validate_default=True)
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(None, max_length=256, validate_default=True)

    @field_validator("role", mode="before")
    @classmethod
    def _known_role(cls, value: Any) -> Any:
        if value not in ("system", "developer", "user", "assistant", "tool"):
            raise fail(f"needs a role of system, developer, user, assistant or tool, got {_short(value)}")
        return value

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if value is None and role in ("system", "developer", "user"):
            raise fail(f"a {role} message needs content")
        if value is not None and not isinstance(value, str | list):
            raise fail(
                f"content must be a string, a list of content parts or null, got {_json_type(type(value).__name__)}"
            )
        return value

    @field_validator("tool_calls")
    @classmethod
    def _calls_from_the_assistant(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("role") != "assistant":
            raise fail("tool_calls are only allowed on assistant messages")
        return value

    @field_validator("tool_call_id")
    @classmethod
    def _answers_a_call(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.data.get("role") == "tool":
            raise fail("a message with role 'tool' needs a tool_call_id")
        return value

    def as_dict(self) -> dict[str, Any]:
        """The message as an engine or template sees it (unset fields left out)."""
        out = self.model_dump(exclude_none=True)
        out.setdefault("content", None)
        return out


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool | None = None


class _Generation(_Body):
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: Int64 | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list) or len(value) > 4 or not all(isinstance(s, str) for s in value):
            raise fail("stop must be a string or a list of up to 4 strings")
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise fail(f"n must be 1 (one choice per request; send n requests for n answers), got {value}")
        return value

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def forwarded(self) -> dict[str, Any]:
        """OpenAI fields the local engine does not use, passed on to upstream engines."""
        fields = ("presence_penalty", "frequency_penalty", "user", "logit_bias")
        return {k: getattr(self, k) for k in fields if k in self.model_fields_set}


_SHAPES: dict[str, tuple[type | tuple[type, ...], str]] = {
    "tools": (list, "tools must be a list of {'type': 'function', 'function': {...}} objects"),
    "tool_choice": (
        (str, dict),
        "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', ...}",
    ),
    "response_format": (dict, "response_format must be an object with a 'type'"),
}


class ChatCompletionRequest(_Generation):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("messages", mode="before")
    @classmethod
    def _message_list(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, list) or not value:
            raise fail("'messages' must be a non-empty list")
        limit = _limit(info, "max_messages", 2048)
        if len(value) > limit:
            raise fail(f"'messages' has {len(value)} messages; at most {limit} are allowed", "sage_too_many")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise fail("logprobs are not supported by this server")
        return value

    @field_validator("tools", "tool_choice", "response_format", mode="before")
    @classmethod
    def _shape(cls, value: Any, info: ValidationInfo) -> Any:
        """The JSON type of the tool and format fields (`structured.check_*` read the rest)."""
        types, message = _SHAPES[str(info.field_name)]
        if value is not None and not isinstance(value, types):
            raise fail(message)
        return value

    def completion_limit(self) -> tuple[str, int | None]:
        """(the field that sets the completion length, its value)."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens


class CompletionRequest(_Generation):
    prompt: Text | list[Text]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=0, le=20)
    logprobs: int | None = Field(None, ge=0, le=5)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            value = value[0]
        if isinstance(value, list) and value and all(isinstance(v, int | list) for v in value):
            raise fail("token-id prompts are not supported; send a string")
        if isinstance(value, list) and len(value) > 1:
            raise fail("one prompt per request: send a string (or a list of one string)")
        if not isinstance(value, str) or not value:
            raise fail("'prompt' must be a non-empty string")
        return value

    tools: Any = None
    tool_choice: Any = None
    response_format: Any = None

    @field_validator("tools", "tool_choice", "response_format")
    @classmethod
    def _chat_only(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            raise fail(f"{info.field_name} is a chat completions field (/v1/chat/completions)")
        return value

    @field_validator("echo", "suffix", "best_of", "logprobs")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value and not (info.field_name == "best_of" and value == 1):
            raise fail(f"{info.field_name} is not supported by this server")
        return value


# ---- responses (the shapes the serving modules build) --------------------------------------


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class EmbeddingData(TypedDict):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingResponse(TypedDict):
    object: Literal["list"]
    data: list[EmbeddingData]
    model: str
    usage: dict[str, int]


class ChatMessage(TypedDict, total=False):
    role: Literal["assistant"]
    content: str | None
    refusal: None
    tool_calls: list[dict[str, Any]]


class Choice(TypedDict, total=False):
    index: int
    finish_reason: str
    logprobs: None
    message: ChatMessage  # chat completions
    text: str  # text completions


class CompletionResponse(TypedDict):
    id: str
    object: Literal["chat.completion", "text_completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
