"""``POST /v1/embeddings``: validate, count (and cut) tokens off the event loop, queue the inputs
for a coalesced batch, answer OpenAI's embedding list (floats, or base64 little-endian float32)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from sage_prefect.controlplane.engines.base import EmbeddingEngine
from sage_prefect.controlplane.protocol import APIError, EmbeddingRequest, parse
from sage_prefect.controlplane.serving.common import Gateway, guarded

# the last characters of an input kept for truncation, per token kept, before tokenising it
# (doubled until they hold enough tokens): a 1 MB input cut to 256 tokens tokenises ~4 kB
TAIL_CHARS_PER_TOKEN = 16


@dataclass
class Prepared:
    body: EmbeddingRequest
    texts: list[str]
    tokens: list[int]


def prepare(gateway: Gateway, body: EmbeddingRequest) -> Prepared:
    """Check against the model and count (and cut) tokens: off the loop for large bodies."""
    engine = gateway.plane.embedding_engine(body.model)
    if body.dimensions is not None and engine.dimensions and body.dimensions != engine.dimensions:
        raise APIError(
            400,
            f"dimensions must be {engine.dimensions} for {body.model} (it cannot shorten its vectors), "
            f"got {body.dimensions}",
            param="dimensions",
        )
    keep = _keep(body.truncate_prompt_tokens, engine.max_input_tokens)
    texts = list(body.input)
    if keep is not None:
        texts = [_tail(engine, t, keep) for t in texts]
    tokens = engine.count_tokens(texts)
    # only the inputs over ``keep`` are cut, and counted again
    if keep is not None and (over := [i for i, n in enumerate(tokens) if n > keep]):
        try:
            cut = engine.truncate([texts[i] for i in over], keep)
        except NotImplementedError as exc:
            raise APIError(400, f"{exc} (model {body.model})", param="truncate_prompt_tokens") from None
        for i, text, n in zip(over, cut, engine.count_tokens(cut), strict=True):
            texts[i], tokens[i] = text, n
    for i, n in enumerate(tokens):
        if n > engine.max_input_tokens:
            raise APIError(
                400,
                f"input[{i}] has {n} tokens; the maximum for {body.model} is {engine.max_input_tokens}",
                param=f"input[{i}]",
                code="context_length_exceeded",
            )
    return Prepared(body, texts, tokens)


def _keep(value: int | None, limit: int) -> int | None:
    """vLLM's ``truncate_prompt_tokens``: ``None`` keeps inputs whole (an over-long one is a
    400), ``-1`` cuts each input to the model's limit, ``k`` to its last ``k`` tokens."""
    if value is None:
        return None
    if value > limit:
        raise APIError(
            400,
            f"truncate_prompt_tokens is {value}, more than the model's limit of {limit} tokens",
            param="truncate_prompt_tokens",
        )
    return limit if value == -1 else value


def _tail(engine: EmbeddingEngine, text: str, keep: int) -> str:
    """The end of ``text`` that still holds its last ``keep`` tokens, so a long input is not
    tokenised whole only to be cut. The window starts at a whitespace, where tokenizers split
    words, so its tokens are the text's own; it doubles until it holds more than ``keep``."""
    window = keep * TAIL_CHARS_PER_TOKEN
    while window < len(text):
        start = len(text) - window
        space = next((i for i in range(start, min(len(text), start + 256)) if text[i].isspace()), None)
        if space is not None:
            tail = text[space:]
            if engine.count_tokens([tail])[0] > keep + 1:
                return tail
        window *= 2
    return text


def encode(vectors: list[list[float]], fmt: str) -> list[list[float]] | list[str]:
    if fmt == "float":
        return vectors
    array = np.asarray(vectors, dtype="<f4")
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in array]


def render(model: str, vectors: list[list[float]], fmt: str, tokens: list[int]) -> bytes:
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(encode(vectors, fmt))]
    usage = {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}
    body = {"object": "list", "data": data, "model": model, "usage": usage}
    return json.dumps(body, separators=(",", ":")).encode()


async def create_embedding(gateway: Gateway, request: Request) -> Response:
    raw = await gateway.body(request)
    key = gateway.authenticate(request)
    body = await gateway.offload(len(raw), parse, EmbeddingRequest, raw, gateway.config.limits)
    who = gateway.classify(request, key, body.slo_class, body.priority)
    plane = gateway.plane
    plane.admit(body.model, "embedding", who.slo)
    prep = await gateway.offload(len(raw), prepare, gateway, body)
    plane.metrics.requests.labels(body.model, who.slo, "embeddings").inc()
    vectors = await gateway.unless_disconnected(
        request, guarded(plane.embed(body.model, prep.texts, prep.tokens, who.slo, who.priority))
    )
    size = sum(len(v) for v in vectors) * 8
    content = await gateway.offload(size, render, body.model, vectors, body.encoding_format, prep.tokens)
    return Response(content, media_type="application/json")
