"""The OpenAI-compatible gateway: plain routes over `serving` and `service.ControlPlane`.

A bare Starlette application (FastAPI's own base): every route reads and checks its own body
(`protocol`), so FastAPI's per-request layers (dependency solving, its exit-stack and
telemetry middleware, which looks up OpenTelemetry on every request once Prefect has
installed it) would be pure overhead: about a third of the event loop's time per request
under overload, when refusals must be cheapest.

Every error is OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``
(`protocol.error_response`) with the right status: 400 for a client mistake (naming the
field), 401 without a valid key, 404 for an unknown model, 413 for an oversize body, 429 with
``Retry-After`` from admission control or rate limits, 503 when no replica can serve. A client
mistake is never a 500.
"""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sage_prefect.controlplane.config import ControlPlaneConfig
from sage_prefect.controlplane.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    error_response,
)
from sage_prefect.controlplane.service import ControlPlane, ServiceError
from sage_prefect.controlplane.serving import chat, completions, embeddings, generation
from sage_prefect.controlplane.serving.common import ClientGone, Gateway

CLIENT_CLOSED = 499  # nginx's status for a request whose client went away (nobody reads it)


def create_app(config: ControlPlaneConfig, plane: ControlPlane | None = None) -> Starlette:
    plane = plane or ControlPlane(config)
    gateway = Gateway(config, plane)
    if not config.loopback and not gateway.keys.enabled:
        raise ServiceError(
            500,
            f"refusing to bind {config.host} without API keys: set {config.api_keys_env} or api_keys_file",
        )

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        if not plane.started:
            await plane.start()
        # the start-up heap (Prefect, pydantic, models: ~170k objects) never becomes garbage;
        # out of the collector's reach, a full collection no longer stalls requests for ~50 ms
        gc.freeze()
        yield
        await plane.stop()
        gateway.close()

    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return error_response(exc)

    async def service_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        return error_response(APIError(exc.status, exc.message, code=exc.code, retry_after=exc.retry_after))

    async def client_gone(_: Request, exc: Exception) -> Response:
        return Response(status_code=CLIENT_CLOSED)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(APIError(exc.status_code, str(exc.detail)))

    async def unexpected(_: Request, exc: Exception) -> Response:  # a bug, not the client's fault
        return error_response(APIError(500, f"internal error: {type(exc).__name__}"))

    async def health(_: Request) -> Response:
        replicas = {r.id: r.healthy for r in plane.scheduler.replicas.values()}
        doc: dict[str, Any] = {"status": "ok" if all(replicas.values()) else "degraded", "replicas": replicas}
        if plane.supervisor is not None:  # placed models: where each replica runs, and scaling
            doc["cluster"] = plane.supervisor.address
            doc["placed"] = plane.supervisor.snapshot()
            doc["scaling"] = {m: plane.scheduler.scaling_state(m) for m in plane.scheduler.scaled_models()}
        return JSONResponse(doc)

    async def metrics(_: Request) -> Response:
        return Response(plane.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(request: Request) -> Response:
        gateway.classify(request, gateway.authenticate(request), None, None)  # the key's rate limit
        created = int(time.time())
        data = [
            {"id": m.name, "object": "model", "created": created, "owned_by": "sage-prefect", "kind": m.kind}
            for m in config.models
        ]
        return JSONResponse({"object": "list", "data": data})

    async def create_embedding(request: Request) -> Response:
        return await embeddings.create_embedding(gateway, request)

    async def chat_completions(request: Request) -> Response:
        return await generation.serve(gateway, request, ChatCompletionRequest, chat.prepare, chat=True)

    async def text_completions(request: Request) -> Response:
        return await generation.serve(gateway, request, CompletionRequest, completions.prepare, chat=False)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/embeddings", create_embedding, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", text_completions, methods=["POST"]),
    ]
    handlers = {
        APIError: api_error,
        ServiceError: service_error,
        ClientGone: client_gone,
        StarletteHTTPException: http_error,
        Exception: unexpected,
    }
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.plane = plane
    return app
