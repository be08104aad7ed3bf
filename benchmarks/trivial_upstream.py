"""A trivial OpenAI-compatible upstream for gateway benchmarks: fixed, well-formed answers, no model.

Serves ``POST /v1/chat/completions`` and ``POST /v1/completions`` (plain JSON, or SSE when the
body says ``"stream": true``, with a usage chunk when ``stream_options.include_usage`` is set),
``POST /v1/embeddings`` (one fixed vector per input) and ``GET /v1/models``, ``GET /health``.
Anything else is a 404 in OpenAI's error envelope (so a gateway's ``/metrics`` probe falls back
to ``/v1/models``).

Two implementations of the same answers:

* ``raw`` (default): HTTP/1.1 keep-alive on a bare ``asyncio.Protocol`` (uvloop when
  installed); the cost of an answer is a JSON parse of the body and one ``transport.write``.
  It stands for an upstream that is never the bottleneck (a GPU server's front end does more
  work per request, but in its own process on its own cores).
* ``asgi``: the same answers as a bare ASGI app under uvicorn (httptools and uvloop when
  installed), i.e. a typical Python server front end.

Run:  .venv/bin/python benchmarks/trivial_upstream.py --port 9000 [--impl raw|asgi]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

TEXT = "Hello! This is a fixed answer from the trivial upstream."
COMPLETION_TOKENS = 12
DIMENSIONS = 64
_VECTOR = json.dumps([round(((i * 37) % 101) / 101 - 0.5, 4) for i in range(DIMENSIONS)])


def _prompt_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if isinstance(messages, list):
        chars = sum(len(str(m.get("content") or "")) for m in messages if isinstance(m, dict))
    else:
        chars = len(str(body.get("prompt") or ""))
    return max(1, chars // 4)


def _error(status: int, message: str) -> tuple[int, str, bytes]:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return status, "application/json", json.dumps(body).encode()


def answer(method: str, path: str, raw: bytes) -> tuple[int, str, bytes]:
    """(status, content type, body) for one request."""
    path = path.split("?", 1)[0]
    if method == "GET":
        if path == "/v1/models":
            data = [{"id": "up", "object": "model", "created": 0, "owned_by": "trivial"}]
            return 200, "application/json", json.dumps({"object": "list", "data": data}).encode()
        if path == "/health":
            return 200, "application/json", b'{"status":"ok"}'
        return _error(404, f"no route {method} {path}")
    if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        return _error(404, f"no route {method} {path}")
    try:
        body = json.loads(raw)
    except ValueError:
        return _error(400, "invalid JSON body")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return _error(400, "'model' is required")
    model = body["model"]
    if path == "/v1/embeddings":
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        tokens = sum(max(1, len(str(t)) // 4) for t in items)
        data = ",".join(
            f'{{"object":"embedding","index":{i},"embedding":{_VECTOR}}}' for i in range(len(items))
        )
        text = (
            f'{{"object":"list","data":[{data}],"model":{json.dumps(model)},'
            f'"usage":{{"prompt_tokens":{tokens},"total_tokens":{tokens}}}}}'
        )
        return 200, "application/json", text.encode()
    chat = path == "/v1/chat/completions"
    prompt_tokens = _prompt_tokens(body)
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or COMPLETION_TOKENS
    completion_tokens = min(COMPLETION_TOKENS, int(max_tokens))
    finish = "stop" if completion_tokens == COMPLETION_TOKENS else "length"
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    rid = ("chatcmpl-" if chat else "cmpl-") + f"{time.monotonic_ns():x}"
    created = int(time.time())
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish_reason: str | None, role: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish_reason}
            payload = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
            return f"data: {json.dumps(payload)}\n\n"

        parts = [chunk(None, None, role=True)] if chat else []
        parts += [chunk(TEXT, None), chunk(None, finish)]
        if include_usage:
            payload = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            parts.append(f"data: {json.dumps(payload)}\n\n")
        parts.append("data: [DONE]\n\n")
        return 200, "text/event-stream", "".join(parts).encode()
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": TEXT},
            "finish_reason": finish,
            "logprobs": None,
        }
    else:
        choice = {"index": 0, "text": TEXT, "finish_reason": finish, "logprobs": None}
    result = {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage,
    }
    return 200, "application/json", json.dumps(result).encode()


# ---- raw asyncio HTTP/1.1 -------------------------------------------------------------

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found"}


class _HTTP(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and pipelining; bodies by Content-Length only (what clients send)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport  # uvloop's transports are not asyncio.Transport subclasses
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            length, close = 0, False
            for line in head[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection" and value.strip().lower() == "close":
                    close = True
                elif name == "transfer-encoding":
                    self._reply(400, "application/json", b'{"error":"chunked bodies unsupported"}', True)
                    return
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            method, path = (head[0].split(" ") + ["", ""])[:2]
            status, ctype, payload = answer(method, path, body)
            self._reply(status, ctype, payload, close)
            if close:
                return

    def _reply(self, status: int, ctype: str, payload: bytes, close: bool) -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\ncontent-type: {ctype}\r\n"
            f"content-length: {len(payload)}\r\n" + ("connection: close\r\n" if close else "") + "\r\n"
        )
        self.transport.write(head.encode() + payload)
        if close:
            self.transport.close()


async def serve_raw(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_HTTP, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


# ---- ASGI under uvicorn ----------------------------------------------------------------


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    status, ctype, payload = answer(scope["method"], scope["path"], body)
    headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def _uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--impl", choices=("raw", "asgi"), default="raw")
    args = parser.parse_args(argv)
    if args.impl == "raw":
        _uvloop()
        asyncio.run(serve_raw(args.host, args.port))
        return
    import importlib.util

    import uvicorn

    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    uvicorn.run(
        asgi_app, host=args.host, port=args.port, http=http, loop=loop, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
