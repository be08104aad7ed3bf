"""Chat, completions and streaming through the real gateway (a subprocess) on the local
transformers engine, driven by the real ``openai`` SDK (sync, async, streaming) and by
LangChain's ``ChatOpenAI`` / ``OpenAIEmbeddings``.

The LLM is the tiny random-weight model (real forward passes, meaningless text): the tests
check the protocol and that the gateway returns exactly what the engine generates.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from sage_prefect.controlplane.engines.base import GenerationRequest
from sage_prefect.controlplane.server import Background, start_background

pytestmark = pytest.mark.timeout(300)

LLM = "sage-tiny-random-lm"
EMBED = "all-MiniLM-L6-v2"
MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Which river carries the map of the coast?"},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Background]:
    tmp = tmp_path_factory.mktemp("gw")
    config = {
        "policy": "hybrid",
        "classes": {
            "interactive": {"ttft_ms": 5000, "tpot_ms": 1000, "e2e_ms": 60000, "max_queue": 64},
            "batch": {"e2e_ms": 600000, "max_queue": 64},
        },
        "models": [
            {"name": EMBED, "kind": "embedding", "engine": "sentence-transformers"},
            {"name": LLM, "kind": "llm", "engine": "transformers", "params": {"model": "tiny"}},
        ],
    }
    path = tmp / "cp.yaml"
    path.write_text(yaml.safe_dump(config))
    with start_background(path, log=tmp / "cp.log") as bg:
        yield bg


@pytest.fixture(scope="module")
def engine(server: Background) -> Iterator[object]:
    """The same model loaded in-process (the server built it under $SAGE_HOME/models)."""
    from sage_prefect.controlplane.engines.local_llm import TransformersLLMEngine

    eng = TransformersLLMEngine("tiny", max_batch_size=4)
    yield eng
    eng.close()


def direct_text(engine: object, prompt: str, max_tokens: int) -> tuple[str, str, int, int]:
    """Greedy text, finish reason and token counts straight from the engine."""

    async def run() -> tuple[str, str, int, int]:
        request = GenerationRequest(id="d", prompt=prompt, max_tokens=max_tokens, temperature=0.0)
        text, finish, usage = "", "", (0, 0)
        async for event in engine.generate(request):  # type: ignore[attr-defined]
            text += event.text
            if event.finish_reason:
                finish, usage = event.finish_reason, (event.prompt_tokens, event.completion_tokens)
        return text, finish, *usage

    return asyncio.run(run())


def sync_client(bg: Background) -> object:
    import openai

    return openai.OpenAI(base_url=bg.base_url, api_key="none", max_retries=0)


def test_chat_completion_is_what_the_engine_generates(server: Background, engine: object) -> None:
    response = sync_client(server).chat.completions.create(  # type: ignore[attr-defined]
        model=LLM, messages=MESSAGES, max_tokens=12, temperature=0
    )
    prompt = engine.render_chat(MESSAGES)  # type: ignore[attr-defined]
    text, finish, prompt_tokens, completion_tokens = direct_text(engine, prompt, 12)
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.model == LLM and choice.message.role == "assistant"
    assert choice.message.content == text and choice.finish_reason == finish
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.completion_tokens == completion_tokens
    assert response.usage.total_tokens == prompt_tokens + completion_tokens
    assert 1 <= completion_tokens <= 12


def test_completions_and_seeded_sampling(server: Background, engine: object) -> None:
    client = sync_client(server)
    prompt = "Once upon a time the lake"
    response = client.completions.create(model=LLM, prompt=prompt, max_tokens=10, temperature=0)  # type: ignore[attr-defined]
    text, finish, _, completion_tokens = direct_text(engine, prompt, 10)
    assert response.object == "text_completion" and response.choices[0].text == text
    assert response.choices[0].finish_reason == finish
    assert response.usage.completion_tokens == completion_tokens

    def sampled(seed: int) -> str:
        r = client.completions.create(  # type: ignore[attr-defined]
            model=LLM, prompt=prompt, max_tokens=16, temperature=1.0, seed=seed
        )
        return str(r.choices[0].text)

    assert sampled(7) == sampled(7)
    assert len({sampled(s) for s in (1, 2, 3)}) > 1  # seeds matter: sampling is really on


def test_streaming_chat_with_usage(server: Background, engine: object) -> None:
    stream = sync_client(server).chat.completions.create(  # type: ignore[attr-defined]
        model=LLM,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text, finish, prompt_tokens, completion_tokens = direct_text(
        engine,
        engine.render_chat(MESSAGES),  # type: ignore[attr-defined]
        12,
    )
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content) == text
    assert len([c for c in content if c.choices[0].delta.content]) > 1  # tokens arrive one by one
    assert content[-1].choices[0].finish_reason == finish
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_completions_without_usage(server: Background) -> None:
    stream = sync_client(server).completions.create(  # type: ignore[attr-defined]
        model=LLM, prompt="The bridge", max_tokens=6, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    whole = sync_client(server).completions.create(  # type: ignore[attr-defined]
        model=LLM, prompt="The bridge", max_tokens=6, temperature=0
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def test_async_client_concurrent_chats_are_batched(server: Background) -> None:
    import openai

    async def run() -> tuple[list[str], list[str]]:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0) as c:
            plain = await asyncio.gather(
                *(
                    c.chat.completions.create(
                        model=LLM,
                        messages=[{"role": "user", "content": f"question {i}"}],
                        max_tokens=16,
                        temperature=0,
                        extra_headers={"X-SLO-Class": "batch"} if i % 2 else None,
                    )
                    for i in range(12)
                )
            )
            streamed = []
            for i in range(2):
                stream = await c.chat.completions.create(
                    model=LLM,
                    messages=[{"role": "user", "content": f"question {i}"}],
                    max_tokens=16,
                    temperature=0,
                    stream=True,
                )
                streamed.append(
                    "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
                )
            return [str(r.choices[0].message.content) for r in plain], streamed

    plain, streamed = asyncio.run(run())
    assert len(plain) == 12 and all(plain)
    assert streamed == plain[:2]  # greedy: the same answer alone or inside a batch
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'sage_time_to_first_token_seconds_count{model="sage-tiny-random-lm",slo_class="batch"}' in metrics
    assert 'sage_time_per_output_token_seconds_bucket{le="0.005",model="sage-tiny-random-lm"' in metrics


BAD_CHAT = [
    ({"model": LLM}, "messages", "'messages' is required"),
    ({"model": LLM, "messages": []}, "messages", "non-empty list"),
    ({"model": LLM, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "role of"),
    ({"model": LLM, "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string"),
    ({"model": LLM, "messages": MESSAGES, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"model": LLM, "messages": MESSAGES, "max_tokens": "ten"}, "max_tokens", "integer"),
    ({"model": LLM, "messages": MESSAGES, "temperature": 3}, "temperature", "less than or equal to 2"),
    ({"model": LLM, "messages": MESSAGES, "top_p": -1}, "top_p", "greater than or equal to 0"),
    ({"model": LLM, "messages": MESSAGES, "n": 3}, "n", "n must be 1"),
    ({"model": LLM, "messages": MESSAGES, "stream": "yes"}, "stream", "boolean"),
    ({"model": LLM, "messages": MESSAGES, "stop": [1]}, "stop", "list of up to 4"),
    ({"model": LLM, "messages": MESSAGES, "seed": 1.5}, "seed", "integer"),
    ({"model": LLM, "messages": MESSAGES, "max_tokens": 5_000_000}, "max_tokens", "between 1"),
]


@pytest.mark.parametrize(("body", "param", "message"), BAD_CHAT)
def test_bad_chat_requests_get_400_naming_the_field(
    server: Background, body: dict[str, object], param: str, message: str
) -> None:
    response = httpx.post(f"{server.base_url}/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_wrong_endpoint_for_a_model_and_an_over_long_prompt(server: Background) -> None:
    import openai

    client = sync_client(server)
    with pytest.raises(openai.NotFoundError, match="does not serve this endpoint"):
        client.embeddings.create(model=LLM, input="x")  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=LLM, prompt="word " * 5000, max_tokens=4)  # type: ignore[attr-defined]
    assert "context" in str(info.value) or "tokens" in str(info.value)
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_langchain_chat_and_embeddings_work_unchanged(server: Background) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    from sage_prefect.controlplane.engines.sentence_transformers import SentenceTransformerEngine

    chat = langchain_openai.ChatOpenAI(
        model=LLM, base_url=server.base_url, api_key="none", temperature=0, max_tokens=8, max_retries=0
    )
    answer = chat.invoke("Name a river.")
    assert isinstance(answer.content, str) and answer.content
    assert answer.usage_metadata["output_tokens"] >= 1
    streamed = "".join(str(chunk.content) for chunk in chat.stream("Name a river."))
    assert streamed == answer.content

    # check_embedding_ctx_length=False: send the texts as they are (no tiktoken, which needs a download)
    embeddings = langchain_openai.OpenAIEmbeddings(
        model=EMBED, base_url=server.base_url, api_key="none", check_embedding_ctx_length=False
    )
    texts = ["LanceDB stores vectors", "Prefect runs flows"]
    got = embeddings.embed_documents(texts)
    direct = SentenceTransformerEngine(EMBED).embed(texts)
    np.testing.assert_allclose(np.array(got), np.array(direct), atol=1e-5)
    np.testing.assert_allclose(embeddings.embed_query(texts[0]), direct[0], atol=1e-5)


def test_server_log_is_clean(server: Background) -> None:
    log = Path(server.log).read_text()
    assert "Traceback" not in log and "Internal Server Error" not in log, log[-3000:]
