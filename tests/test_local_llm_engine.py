"""The local transformers LLM engine on the tiny random-weight model: real forward passes on CPU, no mocks."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from sage_prefect.controlplane.engines.base import EngineError, GenerationRequest, TokenEvent  # noqa: E402
from sage_prefect.controlplane.engines.local_llm import (  # noqa: E402
    PREFILL_PADDING_SLACK,
    TransformersLLMEngine,
    _prefill_groups,
)
from sage_prefect.controlplane.engines.tiny_model import (  # noqa: E402
    MARKER,
    MODEL_NAME,
    build_tiny_model,
    default_tiny_model_dir,
)

pytestmark = pytest.mark.timeout(60)

PROMPT = "The river carries a map of the coast before the sun goes down."


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / MODEL_NAME)


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> Iterator[TransformersLLMEngine]:
    eng = TransformersLLMEngine(str(tiny_dir), max_batch_size=8)
    yield eng
    eng.close()


def _request(
    prompt: str = PROMPT, max_tokens: int = 24, *, stop: list[str] | None = None, **sampling: float
) -> GenerationRequest:
    """Greedy unless ``temperature``/``top_p``/``seed`` are given."""
    return GenerationRequest(
        id="r",
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=sampling.get("temperature", 0.0),
        top_p=sampling.get("top_p", 1.0),
        seed=int(sampling["seed"]) if "seed" in sampling else None,
        stop=stop or [],
    )


async def _collect(eng: TransformersLLMEngine, request: GenerationRequest) -> list[TokenEvent]:
    return [event async for event in eng.generate(request)]


def _text(events: list[TokenEvent]) -> str:
    return "".join(e.text for e in events)


def test_build_is_idempotent_and_labelled(tiny_dir: Path, sage_home: Path) -> None:
    info = json.loads((tiny_dir / MARKER).read_text())
    assert info["name"] == MODEL_NAME and info["vocab_size"] == 2048
    assert "random" in (tiny_dir / "README.md").read_text().lower()
    assert json.loads((tiny_dir / "config.json").read_text())["sage_model_name"] == MODEL_NAME
    before = (tiny_dir / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert build_tiny_model(tiny_dir) == tiny_dir
    assert time.perf_counter() - start < 0.5
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == before
    assert default_tiny_model_dir() == sage_home / "models" / MODEL_NAME


def test_streaming_deltas_join_to_the_final_text(engine: TransformersLLMEngine, tiny_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    events = asyncio.run(_collect(engine, _request(max_tokens=24)))
    *deltas, final = events
    assert final.finish_reason in ("length", "stop") and final.text == ""
    assert all(e.finish_reason is None and e.text for e in deltas)
    assert len(deltas) >= 5  # streamed token by token, not in one piece
    assert final.prompt_tokens == engine.count_tokens(PROMPT)
    assert final.completion_tokens >= len(deltas)

    # The joined deltas are the completion transformers' own greedy `generate` decodes.
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()
    assert final.completion_tokens == len(new)
    expected = tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert _text(events) == expected


def test_greedy_is_deterministic_and_seeded_sampling_repeats(engine: TransformersLLMEngine) -> None:
    async def run() -> tuple[str, str, str, str]:
        a = _text(await _collect(engine, _request()))
        b = _text(await _collect(engine, _request()))
        c = _text(await _collect(engine, _request(temperature=0.9, top_p=0.9, seed=1234)))
        d = _text(await _collect(engine, _request(temperature=0.9, top_p=0.9, seed=1234)))
        return a, b, c, d

    a, b, c, d = asyncio.run(run())
    assert a == b and a
    assert c == d and c


def test_max_tokens_finishes_with_length(engine: TransformersLLMEngine) -> None:
    events = asyncio.run(_collect(engine, _request(max_tokens=7)))
    final = events[-1]
    assert final.finish_reason == "length"
    assert final.completion_tokens == 7


def test_stop_string_ends_the_completion_without_the_stop_text(engine: TransformersLLMEngine) -> None:
    full = _text(asyncio.run(_collect(engine, _request(max_tokens=24))))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    events = asyncio.run(_collect(engine, _request(max_tokens=24, stop=[stop])))
    assert events[-1].finish_reason == "stop"
    assert _text(events) == full[: full.index(stop)]
    assert stop not in _text(events)


def test_concurrent_requests_are_batched_and_match_solo_runs(engine: TransformersLLMEngine) -> None:
    prompts = [f"{PROMPT} Request number {i} asks about {'the sea ' * i}." for i in range(8)]

    async def run() -> tuple[list[str], list[list[TokenEvent]]]:
        solo = [_text(await _collect(engine, _request(p, max_tokens=16))) for p in prompts[:3]]
        engine.step_batch_sizes.clear()
        together = await asyncio.gather(*(_collect(engine, _request(p, max_tokens=16)) for p in prompts))
        return solo, together

    solo, together = asyncio.run(run())
    assert max(engine.step_batch_sizes) > 1, engine.step_batch_sizes
    assert all(events[-1].finish_reason in ("length", "stop") for events in together)
    # Batched (left-padded, merged) rows compute the same greedy tokens as the requests alone.
    assert [_text(events) for events in together[:3]] == solo


def test_prefill_passes_group_prompts_of_similar_length() -> None:
    """Padding costs a CPU as much as a token: a long prompt never pads a pass of short ones."""
    from types import SimpleNamespace

    lengths = [30, 160, 25, 33, 28, 150, 40, 31]
    seqs: list[Any] = [SimpleNamespace(prompt_ids=[0] * n) for n in lengths]
    groups = _prefill_groups(seqs)
    assert sorted(len(s.prompt_ids) for g in groups for s in g) == sorted(lengths)  # each exactly once
    for group in groups:
        sizes = [len(s.prompt_ids) for s in group]
        assert max(sizes) * len(sizes) <= PREFILL_PADDING_SLACK * sum(sizes), sizes
    assert [len(s.prompt_ids) for s in groups[-1]] == [150, 160]  # the long two share a pass
    assert len(groups) < len(lengths)  # similar short prompts still share a pass
    assert _prefill_groups([]) == []


def test_requests_join_a_running_batch_mid_stream(engine: TransformersLLMEngine) -> None:
    """Late arrivals (longer and shorter prompts) are prefilled and merged into the running batch."""
    first = _request(f"{PROMPT} {'and the sea ' * 6}", max_tokens=40)
    late = [_request(p, max_tokens=12) for p in ("Hello", f"{PROMPT} " * 3, "Why is the sky blue?")]

    async def run() -> tuple[list[str], list[str], int]:
        solo = [_text(await _collect(engine, r)) for r in (first, *late)]
        engine.step_batch_sizes.clear()
        stream = engine.generate(first)
        head = [await stream.__anext__() for _ in range(5)]  # the first request is decoding now
        joined = asyncio.gather(*(_collect(engine, r) for r in late))
        rest = [event async for event in stream]
        together = [_text(head + rest)] + [_text(events) for events in await joined]
        return solo, together, max(engine.step_batch_sizes)

    solo, together, widest = asyncio.run(run())
    assert widest > 1
    assert together == solo


def test_cancelled_request_frees_its_slot(tiny_dir: Path) -> None:
    eng = TransformersLLMEngine(str(tiny_dir), max_batch_size=1)  # one slot: the next request needs it back

    async def run() -> tuple[str | None, str | None]:
        # 1. The client closes the stream after two tokens.
        stream = eng.generate(_request(max_tokens=1500))
        await stream.__anext__()
        await stream.__anext__()
        await stream.aclose()  # type: ignore[attr-defined]
        first = (await asyncio.wait_for(_collect(eng, _request(max_tokens=8)), 20))[-1].finish_reason
        # 2. The consuming task is cancelled mid-stream.
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in eng.generate(_request(max_tokens=1500)):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 20)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        second = (await asyncio.wait_for(_collect(eng, _request(max_tokens=8)), 20))[-1].finish_reason
        return first, second

    try:
        assert asyncio.run(run()) == ("length", "length")
        assert eng.queue_depth() == 0
        # The abandoned 1500-token requests stopped at once instead of running to the end.
        assert eng.generated_tokens < 100, eng.generated_tokens
        assert max(eng.step_batch_sizes) == 1
    finally:
        eng.close()


def test_too_long_requests_raise_value_error(engine: TransformersLLMEngine) -> None:
    ctx = engine.max_context_tokens
    with pytest.raises(ValueError, match="max_tokens"):
        asyncio.run(_collect(engine, _request(max_tokens=ctx)))
    with pytest.raises(ValueError, match="prompt"):
        asyncio.run(_collect(engine, _request("word " * (ctx + 10), max_tokens=1)))
    # Nothing was queued, and the engine still serves.
    assert asyncio.run(_collect(engine, _request(max_tokens=2)))[-1].finish_reason in ("length", "stop")


def test_chat_template_and_token_counts(engine: TransformersLLMEngine) -> None:
    prompt = engine.render_chat([{"role": "user", "content": "Hello there"}])
    assert prompt == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    assert engine.count_tokens(prompt) > engine.count_tokens("Hello there") > 0


def test_closing_fails_in_flight_requests_with_engine_error(tiny_dir: Path) -> None:
    eng = TransformersLLMEngine(str(tiny_dir), max_batch_size=2)

    async def run() -> None:
        stream = eng.generate(_request(max_tokens=1500))
        await stream.__anext__()
        await eng.aclose()
        with pytest.raises(EngineError):
            async for _ in stream:
                pass
        with pytest.raises(EngineError):
            await _collect(eng, _request(max_tokens=2))

    asyncio.run(run())
    assert not eng._thread.is_alive()
