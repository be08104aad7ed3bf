"""A replica killed mid-load fails over, and comes back when its server does.

Three real gateways in subprocesses: two upstreams (each serving the tiny random-weight LLM
and all-MiniLM-L6-v2) and a front gateway whose `openai` engine spreads two replicas of each
model over them (`params.base_urls`). Under concurrent chat and embedding load, the first
upstream is killed with SIGKILL; every non-streaming request must still succeed with the
answer the surviving upstream gives, and the killed replica must be taken out, then put back
once a server answers on its address again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from sage_prefect.controlplane.metrics import sample_sum
from sage_prefect.controlplane.server import Background, free_port, start_background

pytestmark = pytest.mark.timeout(400)

LLM = "sage-tiny-random-lm"
EMBED = "all-MiniLM-L6-v2"


def upstream_config(tmp: Path) -> Path:
    path = tmp / "upstream.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {"name": EMBED, "kind": "embedding", "engine": "sentence-transformers"},
                    {"name": LLM, "kind": "llm", "engine": "transformers", "params": {"model": "tiny"}},
                ]
            }
        )
    )
    return path


@pytest.fixture()
def gateways(tmp_path: Path) -> Iterator[tuple[Background, Background, Background, int]]:
    config = upstream_config(tmp_path)
    ports = [free_port(), free_port()]
    with ThreadPoolExecutor(2) as pool:
        ups = list(pool.map(lambda p: start_background(config, port=p, log=tmp_path / f"up-{p}.log"), ports))
    urls = [u.base_url for u in ups]
    front_cfg = tmp_path / "front.yaml"
    front_cfg.write_text(
        yaml.safe_dump(
            {
                "policy": "slo",
                "max_attempts": 3,
                "models": [
                    {
                        "name": "remote-lm",
                        "kind": "llm",
                        "engine": "openai",
                        "replicas": 2,
                        "params": {"base_urls": urls, "model": LLM, "timeout": 60},
                    },
                    {
                        "name": "remote-embed",
                        "kind": "embedding",
                        "engine": "openai",
                        "replicas": 2,
                        "params": {"base_urls": urls, "model": EMBED, "timeout": 60},
                    },
                ],
            }
        )
    )
    front = start_background(front_cfg, log=tmp_path / "front.log")
    try:
        yield ups[0], ups[1], front, ports[0]
    finally:
        for bg in (front, *ups):
            bg.stop()


def test_a_replica_killed_mid_load_fails_over(
    gateways: tuple[Background, Background, Background, int], tmp_path: Path
) -> None:
    import openai

    first, second, front, first_port = gateways
    prompts = [f"Tell me about river number {i}" for i in range(24)]
    texts = [f"a document about harbour {i} and its ships" for i in range(48)]

    async def run() -> tuple[list[str], list[list[float]], list[str]]:
        async with openai.AsyncOpenAI(base_url=front.base_url, api_key="none", max_retries=0) as c:
            done = 0
            killed = asyncio.Event()
            gate = asyncio.Semaphore(8)

            async def chat(prompt: str) -> str:
                nonlocal done
                async with gate:
                    r = await c.chat.completions.create(
                        model="remote-lm",
                        messages=[{"role": "user", "content": prompt}],
                        max_tokens=48,
                        temperature=0,
                    )
                done += 1
                if done == 4 and not killed.is_set():
                    os.kill(first.process.pid, signal.SIGKILL)  # the others are in flight now
                    killed.set()
                return str(r.choices[0].message.content)

            async def embed(text: str) -> list[float]:
                r = await c.embeddings.create(model="remote-embed", input=text)
                return list(r.data[0].embedding)

            async def embed_load() -> list[list[float]]:
                out = []
                for i in range(0, len(texts), 4):  # four at a time for as long as the chats run
                    out += await asyncio.gather(*(embed(t) for t in texts[i : i + 4]))
                return out

            async def stream(prompt: str) -> str:
                await killed.wait()
                s = await c.chat.completions.create(
                    model="remote-lm",
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=8,
                    temperature=0,
                    stream=True,
                )
                return "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])

            chats, vectors, streamed = await asyncio.gather(
                asyncio.gather(*(chat(p) for p in prompts)),
                embed_load(),
                asyncio.gather(*(stream(p) for p in prompts[:2])),
            )
            return list(chats), vectors, list(streamed)

    chats, vectors, streamed = asyncio.run(run())
    assert first.process.wait(10) == -signal.SIGKILL

    # every answer is the one the surviving upstream gives (greedy; same weights)
    survivor = openai.OpenAI(base_url=second.base_url, api_key="none", max_retries=0)
    for prompt, got in zip(prompts, chats, strict=True):
        want = survivor.chat.completions.create(
            model=LLM, messages=[{"role": "user", "content": prompt}], max_tokens=48, temperature=0
        )
        assert got == want.choices[0].message.content
    # streams begun after the kill: routed to the survivor (or retried there before their first token)
    assert all(s and chat.startswith(s) for s, chat in zip(streamed, chats, strict=False))
    direct = survivor.embeddings.create(model=EMBED, input=texts)
    np.testing.assert_allclose(np.array(vectors), np.array([d.embedding for d in direct.data]), atol=1e-5)

    metrics = httpx.get(f"{front.url}/metrics").text
    assert (sample_sum(metrics, "sage_replica_failures_total", replica="remote-lm#0") or 0) >= 1, (
        "the kill happened while requests were in flight on remote-lm#0"
    )
    assert sample_sum(metrics, "sage_replica_up", replica="remote-lm#0") == 0
    health = httpx.get(f"{front.url}/health").json()
    assert health["replicas"]["remote-lm#0"] is False and health["replicas"]["remote-lm#1"] is True
    assert health["replicas"]["remote-embed#1"] is True
    log = front.log.read_text()
    assert "retrying elsewhere" in log and "Traceback" not in log

    # a server on the killed replica's address again: the probe puts the replica back
    with start_background(upstream_config(tmp_path), port=first_port, log=tmp_path / "up-again.log"):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            replicas = httpx.get(f"{front.url}/health").json()["replicas"]
            if replicas["remote-lm#0"] and replicas["remote-embed#0"]:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the replicas did not come back: {replicas}")


def test_a_local_replica_taken_out_is_put_back_when_it_answers_again() -> None:
    """Fault injection on the real engine (its first batch raises, as an out-of-memory error
    would): the only replica is taken out, the request gets 503, and the health probe puts
    the replica back so the next request is served."""
    from sage_prefect.controlplane.config import ModelConfig, load_config
    from sage_prefect.controlplane.engines.sentence_transformers import SentenceTransformerEngine
    from sage_prefect.controlplane.service import ControlPlane, ServiceError

    class FailsOnce(SentenceTransformerEngine):
        failures = 1

        def embed(self, texts: list[str]) -> list[list[float]]:
            if self.failures:
                self.failures -= 1
                raise RuntimeError("injected fault: out of memory")
            return super().embed(texts)

    def factory(model: ModelConfig, index: int) -> FailsOnce:
        return FailsOnce(EMBED, name=model.name)

    config = load_config(models=[{"name": EMBED, "kind": "embedding", "engine": "sentence-transformers"}])

    async def run() -> None:
        plane = ControlPlane(config, engine_factory=factory)
        await plane.start()
        replica = plane.scheduler.replicas[f"{EMBED}#0"]
        try:
            with pytest.raises(ServiceError) as failed:
                await plane.embed(EMBED, ["first"], [1], "interactive", 0)
            assert failed.value.status == 503 and not replica.healthy
            for _ in range(100):
                await asyncio.sleep(0.1)
                if replica.healthy:
                    break
            assert replica.healthy, "the probe did not put the replica back"
            (vector,) = await plane.embed(EMBED, ["second"], [1], "interactive", 0)
            assert len(vector) == 384
        finally:
            await plane.stop()

    asyncio.run(run())
