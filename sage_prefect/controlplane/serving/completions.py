"""``POST /v1/completions``: one text prompt becomes a `GenerationRequest`."""

from __future__ import annotations

from sage_prefect.controlplane.engines.base import GenerationRequest
from sage_prefect.controlplane.protocol import CompletionRequest
from sage_prefect.controlplane.serving.common import Gateway
from sage_prefect.controlplane.serving.generation import Prepared, completion_length, finish_request


def prepare(gateway: Gateway, body: CompletionRequest) -> Prepared:
    engine = gateway.plane.llm_engine(body.model)
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    request = GenerationRequest(
        id="",
        prompt=prompt,
        max_tokens=completion_length(gateway, "max_tokens", body.max_tokens, 16),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=body.stops(),
        seed=body.seed,
        extra=body.forwarded(),
    )
    return finish_request(engine, body, request, "max_tokens")
