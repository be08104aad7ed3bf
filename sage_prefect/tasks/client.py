"""The `openai` clients operators use to reach the control plane (or any OpenAI-compatible server).

Operators never import the control plane: they speak its wire protocol. The base URL
and key come from the operator's config (``base_url``, ``api_key``), else from settings
(``SAGE_CONTROLPLANE_URL``, ``SAGE_CONTROLPLANE_API_KEY``). One client per process and
endpoint is shared by every operator instance (the SDK's client is thread-safe and keeps
a connection pool).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from pydantic import Field

from sage_prefect.common.errors import ConfigError
from sage_prefect.common.settings import load_settings
from sage_prefect.tasks.base import OperatorConfig

if TYPE_CHECKING:
    from openai import AsyncOpenAI, OpenAI

__all__ = ["EndpointConfig", "async_client", "client", "is_context_length_error", "resolve_endpoint"]


class EndpointConfig(OperatorConfig):
    """Config keys of every operator that calls a model."""

    base_url: str | None = Field(
        None, description="OpenAI-compatible base URL; default SAGE_CONTROLPLANE_URL"
    )
    api_key: str | None = Field(None, description="API key; default SAGE_CONTROLPLANE_API_KEY")
    timeout_s: float = Field(600.0, gt=0, description="Per-request timeout in seconds")
    max_retries: int = Field(2, ge=0, le=20, description="SDK retries (429 and 5xx, with backoff)")


_clients: dict[tuple[str, str, float, int, bool], OpenAI | AsyncOpenAI] = {}
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
    ident = (base_url, key, cfg.timeout_s, cfg.max_retries, False)
    with _lock:
        found = _clients.get(ident)
        if found is None:
            found = _clients[ident] = OpenAI(
                base_url=base_url, api_key=key, timeout=cfg.timeout_s, max_retries=cfg.max_retries
            )
    assert isinstance(found, OpenAI)
    return found


def async_client(cfg: EndpointConfig, operator: str) -> AsyncOpenAI:
    """A new `openai.AsyncOpenAI` for this endpoint (async clients belong to one event loop)."""
    from openai import AsyncOpenAI

    base_url, key = resolve_endpoint(cfg, operator)
    return AsyncOpenAI(base_url=base_url, api_key=key, timeout=cfg.timeout_s, max_retries=cfg.max_retries)


def chat_text(
    api: OpenAI, model: str, messages: list[dict[str, str]], max_tokens: int, temperature: float
) -> str:
    """The text of one chat completion (empty when the model returned none)."""
    resp = api.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=temperature,
    )
    return resp.choices[0].message.content or ""


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
