"""One client's bad request, huge request or disconnect never reaches another client.

The real gateway (a uvicorn subprocess) on the real embedding model and the tiny random-weight
LLM (real forward passes, meaningless text: the tests check isolation, not wording):

* requests that used to be 500s are 400s naming the field;
* a request whose seed torch refuses (it reaches the engine only when a caller skips the
  gateway's checks) fails alone inside a running batch: the other streams finish whole and
  the replica stays up;
* huge requests are refused or processed without stalling the event loop: ``/health``
  answers within 100 ms meanwhile;
* a client that disconnects while its embeddings are queued has them dropped
  (``sage_cancelled_requests{stage="queued"}``), and they are never computed.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from sage_prefect.controlplane.engines.base import GenerationRequest, RequestFailed
from sage_prefect.controlplane.metrics import sample_sum
from sage_prefect.controlplane.server import Background, start_background

pytestmark = pytest.mark.timeout(300)

LLM = "sage-tiny-random-lm"
EMBED = "all-MiniLM-L6-v2"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Background]:
    tmp = tmp_path_factory.mktemp("faults")
    config = {
        "policy": "hybrid",
        "classes": {
            "interactive": {"ttft_ms": 30000, "e2e_ms": 60000, "max_queue": 512},
            "batch": {"e2e_ms": 600000, "max_queue": 512},
        },
        # one input per batch: a queue forms behind a running batch, so a test can disconnect
        # clients whose inputs are still waiting
        "batching": {"max_batch_size": 1, "max_wait_ms": 0},
        "models": [
            {"name": EMBED, "kind": "embedding", "engine": "sentence-transformers"},
            {
                "name": LLM,
                "kind": "llm",
                "engine": "transformers",
                "params": {"model": "tiny", "max_batch_size": 8},
            },
        ],
    }
    path = tmp / "cp.yaml"
    path.write_text(yaml.safe_dump(config))
    with start_background(path, log=tmp / "cp.log") as bg:
        yield bg


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": LLM, "messages": HELLO, "max_tokens": 4, **fields}


FORMER_500S: list[tuple[str, bytes | dict[str, Any], str | None, str]] = [
    (
        "chat/completions",
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
        "messages[0].content[0].text",
        "valid string",
    ),
    (
        "chat/completions",
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": None}]}]),
        "messages[0].content[0]",
        "needs a 'text' string",
    ),
    (
        "chat/completions",
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": {}}]}]),
        "messages[0].content[0].text",
        "valid string",
    ),
    (
        "chat/completions",
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": []}]}]),
        "messages[0].content[0].text",
        "valid string",
    ),
    (
        "chat/completions",
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": True}]}]),
        "messages[0].content[0].text",
        "valid string",
    ),
    (
        "chat/completions",
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        "messages[0].content[0].type",
        "reads text only",
    ),
    (
        "chat/completions",
        b'{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}' % LLM.encode(),
        None,
        "invalid JSON",
    ),
    ("embeddings", b'{"model": "%s", "input": "\\ud800"}' % EMBED.encode(), None, "invalid JSON"),
    ("embeddings", b'{"model": "\\ud800", "input": "x"}', None, "invalid JSON"),
    (
        "chat/completions",
        b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "priority": 1e400}' % LLM.encode(),
        "priority",
        "valid integer",
    ),
    (
        "embeddings",
        b'{"model": "%s", "input": "x", "priority": -1e400}' % EMBED.encode(),
        "priority",
        "valid integer",
    ),
    (
        "embeddings",
        b'{"model": "%s", "input": ' % EMBED.encode() + b"[" * 100_000 + b"]" * 100_000 + b"}",
        None,
        "recursion limit",
    ),
    ("chat/completions", chat(seed=2**64, temperature=1.0), "seed", "less than or equal to"),
    ("chat/completions", chat(seed=10**30, temperature=1.0), "seed", "less than or equal to"),
    ("chat/completions", chat(seed=-(2**63) - 1, temperature=1.0), "seed", "greater than or equal to"),
    ("completions", {"model": LLM, "prompt": "x", "seed": 2**64}, "seed", "less than or equal to"),
]


@pytest.mark.parametrize(("endpoint", "body", "param", "message"), FORMER_500S)
def test_former_500s_are_400s_naming_the_field(
    server: Background, endpoint: str, body: bytes | dict[str, Any], param: str | None, message: str
) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        f"{server.base_url}/{endpoint}", content=raw, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_a_poison_seed_in_a_running_batch_fails_alone() -> None:
    """Straight on the engine (the gateway refuses such a seed already): six streams run, a
    request whose seed torch cannot take joins the batch, and fails alone."""
    from sage_prefect.controlplane.engines.local_llm import TransformersLLMEngine

    engine = TransformersLLMEngine("tiny", max_batch_size=8)

    def request(i: int, **fields: Any) -> GenerationRequest:
        return GenerationRequest(id=f"r{i}", prompt=f"question {i}", max_tokens=24, temperature=0.0, **fields)

    async def stream(req: GenerationRequest) -> str:
        return "".join([ev.text async for ev in engine.generate(req)])

    async def run() -> tuple[list[str], BaseException | None, list[str]]:
        alone = [await stream(request(i)) for i in range(6)]
        tasks = [asyncio.create_task(stream(request(i))) for i in range(6)]
        while sum(engine.step_batch_sizes.values()) < 3:  # noqa: ASYNC110 - until the streams decode
            await asyncio.sleep(0.005)
        poison = request(99, seed=2**64)
        poison.temperature = 1.0
        poison.prompt_ids = engine.tokenize(poison.prompt)  # as if prepared: skips the check
        error: BaseException | None = None
        try:
            await stream(poison)
        except RequestFailed as exc:
            error = exc
        return alone, error, await asyncio.gather(*tasks)

    try:
        alone, error, together = asyncio.run(run())
        assert isinstance(error, RequestFailed) and "cannot seed" in str(error)
        assert together == alone  # greedy: every stream whole, token for token
        assert engine._error is None and engine._thread.is_alive()
    finally:
        engine.close()


def test_a_refused_seed_among_live_streams_leaves_them_whole(server: Background) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0)

    async def stream(i: int) -> str:
        chunks = await client.chat.completions.create(
            model=LLM,
            messages=[{"role": "user", "content": f"question {i}"}],
            max_tokens=32,
            temperature=0,
            stream=True,
        )
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    async def run() -> tuple[list[str], list[str], int]:
        alone = [await stream(i) for i in range(6)]
        tasks = [asyncio.create_task(stream(i)) for i in range(6)]
        await asyncio.sleep(0.05)
        async with httpx.AsyncClient() as http:
            bad = await http.post(
                f"{server.base_url}/chat/completions", json=chat(seed=2**64, temperature=1.0, stream=True)
            )
        return alone, await asyncio.gather(*tasks), bad.status_code

    alone, together, status = asyncio.run(run())
    assert status == 400
    assert together == alone
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


class HealthPoller:
    """Polls ``/health`` from its own thread; ``worst`` is the slowest answer while it ran."""

    def __init__(self, url: str) -> None:
        self.url, self.times, self._stop = url, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client() as http:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                assert http.get(self.url, timeout=30).status_code == 200
                self.times.append(time.perf_counter() - t0)
                time.sleep(0.01)

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        time.sleep(0.1)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


BIG = 3_900_000
HUGE_REQUESTS = [
    ("completions", {"model": LLM, "prompt": "word " * (BIG // 5), "max_tokens": 4}, 400),
    ("completions", {"model": LLM, "prompt": "word " * 190_000, "max_tokens": 4}, 400),  # < 1 MB, > context
    ("embeddings", {"model": EMBED, "input": "word " * (BIG // 5)}, 400),
    ("embeddings", {"model": EMBED, "input": ["word " * 400] * 1000}, 400),  # 2 MB over many inputs
    ("chat/completions", chat(messages=[{"role": "user", "content": "hi"}] * 50_000), 400),
    ("chat/completions", chat(messages=[{"role": "user", "content": "hi " * 300}] * 2000), 400),  # > context
    ("embeddings", {"model": EMBED, "input": "word " * 200_000, "truncate_prompt_tokens": -1}, 200),
]


@pytest.mark.parametrize(("endpoint", "body", "status"), HUGE_REQUESTS)
def test_huge_requests_never_stall_the_server(
    server: Background, endpoint: str, body: dict[str, Any], status: int
) -> None:
    raw = json.dumps(body).encode()
    with HealthPoller(f"{server.url}/health") as poller:
        t0 = time.perf_counter()
        response = httpx.post(
            f"{server.base_url}/{endpoint}",
            content=raw,
            headers={"content-type": "application/json"},
            timeout=120,
        )
        took = time.perf_counter() - t0
        time.sleep(0.05)
    assert response.status_code == status, response.text[:500]
    if status == 400:
        assert response.json()["error"]["param"], response.text[:500]
    assert len(poller.times) >= 3
    assert max(poller.times) < 0.1, (sorted(poller.times)[-5:], took)


def _abandon(url: str, body: bytes) -> None:
    """Send a request and close the connection without waiting for the answer."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    with socket.create_connection((host, int(port))) as sock:
        head = (
            f"POST /v1/embeddings HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        time.sleep(0.05)


def test_a_disconnected_clients_queued_embeddings_are_dropped(server: Background) -> None:
    metrics = f"{server.url}/metrics"

    def counted() -> tuple[float, float]:
        text = httpx.get(metrics).text
        queued = sample_sum(text, "sage_cancelled_requests_total", model=EMBED, stage="queued") or 0.0
        inputs = sample_sum(text, "sage_embedding_batch_size_sum", model=EMBED) or 0.0
        return queued, inputs

    before_queued, before_inputs = counted()
    busy = [f"passage {i} " + "lorem ipsum dolor " * 40 for i in range(48)]

    async def run() -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            # 48 one-input batches keep the single replica busy for a while ...
            keep = [
                asyncio.create_task(
                    http.post(f"{server.base_url}/embeddings", json={"model": EMBED, "input": t})
                )
                for t in busy
            ]
            await asyncio.sleep(0.2)
            # ... while 20 clients send a request and go away at once
            gone = json.dumps({"model": EMBED, "input": "abandoned request"}).encode()
            await asyncio.gather(*(asyncio.to_thread(_abandon, server.base_url, gone) for _ in range(20)))
            answers = await asyncio.gather(*keep)
            assert [a.status_code for a in answers] == [200] * len(busy), [a.text for a in answers][:3]

    asyncio.run(run())
    time.sleep(0.3)
    queued, inputs = counted()
    dropped = queued - before_queued
    assert dropped >= 15, dropped  # the few that found the replica free were computed
    assert inputs - before_inputs == len(busy) + (20 - dropped)  # dropped work was never computed
