"""What every endpoint shares: the body, the caller (key, SLO class, priority), work off the
event loop, and cancellation when the client goes away."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request

from sage_prefect.controlplane.auth import KeyRing, RateLimiter
from sage_prefect.controlplane.config import ControlPlaneConfig, KeyConfig
from sage_prefect.controlplane.engines.base import UpstreamError
from sage_prefect.controlplane.protocol import INT32_MAX, INT32_MIN, APIError
from sage_prefect.controlplane.service import ControlPlane, ServiceError

T = TypeVar("T")

# Bodies up to this size are parsed, rendered and tokenised on the event loop (a thread hop costs
# more than the work); larger ones in the gateway's own threads, which the tokenizers and the
# JSON parser leave the GIL to, so the loop keeps answering while a 4 MB body is read.
INLINE_BYTES = 16 * 1024
PREP_THREADS = max(2, min(4, os.cpu_count() or 2))


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its queued work was dropped."""


@dataclass
class Caller:
    key: str | None
    slo: str
    priority: int


class Gateway:
    """The state the endpoints share: config, control plane, keys, rate limits, threads."""

    def __init__(self, config: ControlPlaneConfig, plane: ControlPlane) -> None:
        self.config = config
        self.plane = plane
        self.keys = KeyRing.load(config.api_keys_env, config.api_keys_file)
        self.limiter = RateLimiter()
        self._prep = concurrent.futures.ThreadPoolExecutor(PREP_THREADS, thread_name_prefix="gateway-prep")

    def close(self) -> None:
        self._prep.shutdown(wait=False, cancel_futures=True)

    async def body(self, request: Request) -> bytes:
        """The raw body, refused with 413 past ``limits.max_body_bytes`` (before reading it all
        when the client declares its length)."""
        declared = request.headers.get("content-length")
        limit = self.config.limits.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def authenticate(self, request: Request) -> str | None:
        """The key's name (None without keys configured); 401 for a missing or unknown key."""
        if not self.keys.enabled:
            return None
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        name = self.keys.identify(token) if token else None
        if name is None:
            raise APIError(
                401, "missing or invalid API key (send 'Authorization: Bearer <key>')", code="invalid_api_key"
            )
        return name

    def classify(self, request: Request, key: str | None, slo: str | None, priority: int | None) -> Caller:
        """The caller's SLO class and priority (headers over body fields over the key's and the
        class's defaults), after the key's rate limit."""
        key_cfg: KeyConfig | None = self.config.keys.get(key or "")
        if key_cfg is not None and key_cfg.rate_limit_rps is not None:
            wait = self.limiter.acquire(
                key or "", key_cfg.rate_limit_rps, key_cfg.burst or max(1, int(key_cfg.rate_limit_rps))
            )
            if wait > 0:
                raise APIError(
                    429,
                    f"rate limit of {key_cfg.rate_limit_rps} requests/s for key {key!r} exceeded",
                    code="rate_limit_exceeded",
                    retry_after=wait,
                )
        cls = request.headers.get("x-slo-class") or slo
        if cls is None:
            cls = (
                key_cfg.default_class if key_cfg and key_cfg.default_class else None
            ) or self.config.default_class
        if cls not in self.config.classes:
            raise APIError(
                400,
                f"unknown SLO class {cls[:64]!r}; configured: {', '.join(sorted(self.config.classes))}",
                param="slo_class",
            )
        header = request.headers.get("x-priority")
        if header is not None:
            try:
                priority = int(header)
            except ValueError:
                raise APIError(
                    400, f"priority must be an integer, got {header[:32]!r}", param="priority"
                ) from None
            if not INT32_MIN <= priority <= INT32_MAX:
                raise APIError(
                    400,
                    f"priority must be between {INT32_MIN} and {INT32_MAX}, got {priority}",
                    param="priority",
                )
        if priority is None:
            priority = (
                key_cfg.priority
                if key_cfg and key_cfg.priority is not None
                else self.config.classes[cls].priority
            )
        return Caller(key, cls, priority)

    async def offload(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` inline for a small request (``size`` bytes), else in the gateway's threads."""
        if size <= INLINE_BYTES:
            return fn(*args)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prep, functools.partial(fn, *args))

    async def unless_disconnected(self, request: Request, work: Awaitable[T]) -> T:
        """Await ``work``; if the client disconnects first, cancel it (a queued request leaves
        the queue: `ControlPlane` counts it in ``sage_cancelled_requests``) and raise `ClientGone`."""
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            watch.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise ClientGone()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read: the next ASGI message is the end)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def guarded(work: Awaitable[T]) -> T:
    """Engine errors as the client's answer: an upstream's 4xx, a request the engine refused."""
    try:
        return await work
    except UpstreamError as exc:
        raise APIError(exc.status, str(exc)) from None
    except ServiceError:
        raise
    except ValueError as exc:
        raise APIError(
            400, str(exc), param=getattr(exc, "param", None), code=getattr(exc, "code", None)
        ) from None
