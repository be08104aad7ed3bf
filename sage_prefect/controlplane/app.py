"""The OpenAI-compatible gateway: plain routes over `serving` and `service.ControlPlane`.

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

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from sage_prefect.controlplane.config import ControlPlaneConfig
from sage_prefect.controlplane.protocol import APIError, error_response
from sage_prefect.controlplane.service import ControlPlane, ServiceError
from sage_prefect.controlplane.serving import chat, completions, embeddings, generation
from sage_prefect.controlplane.serving.common import ClientGone, Gateway

CLIENT_CLOSED = 499  # nginx's status for a request whose client went away (nobody reads it)


def create_app(config: ControlPlaneConfig, plane: ControlPlane | None = None) -> FastAPI:
    plane = plane or ControlPlane(config)
    gateway = Gateway(config, plane)
    if not config.loopback and not gateway.keys.enabled:
        raise ServiceError(
            500,
            f"refusing to bind {config.host} without API keys: set {config.api_keys_env} or api_keys_file",
        )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not plane.started:
            await plane.start()
        # the start-up heap (Prefect, pydantic, models: ~170k objects) never becomes garbage;
        # out of the collector's reach, a full collection no longer stalls requests for ~50 ms
        gc.freeze()
        yield
        await plane.stop()
        gateway.close()

    app = FastAPI(title="sage-prefect control plane", lifespan=lifespan)
    app.state.plane = plane

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(APIError(exc.status, exc.message, code=exc.code, retry_after=exc.retry_after))

    @app.exception_handler(ClientGone)
    async def _client_gone(_: Request, exc: ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:  # a bug, not the client's fault
        return error_response(APIError(500, f"internal error: {type(exc).__name__}"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        replicas = {r.id: r.healthy for r in plane.scheduler.replicas.values()}
        return {"status": "ok" if all(replicas.values()) else "degraded", "replicas": replicas}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(plane.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(request: Request) -> JSONResponse:
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
        return await generation.serve(gateway, request, chat.prepare, chat=True)

    async def text_completions(request: Request) -> Response:
        return await generation.serve(gateway, request, completions.prepare, chat=False)

    # The OpenAI routes are plain Starlette routes: they read and check their own bodies, so
    # FastAPI's per-request machinery (dependency solving, cookie and query parsing) would be
    # pure overhead, about a fifth of a proxied request's CPU. Errors reach the same handlers.
    app.add_route("/v1/models", models, methods=["GET"])
    app.add_route("/v1/embeddings", create_embedding, methods=["POST"])
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_route("/v1/completions", text_completions, methods=["POST"])
    return app
