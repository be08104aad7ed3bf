"""The sentence-transformers engine on its own (no gateway): thread safety and forward passes."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from sage_prefect.controlplane.engines.sentence_transformers import CPU_PASS_SIZE, SentenceTransformerEngine

TEXTS = [f"text {i}: " + " ".join(["word"] * (3 + (i * 7) % 50)) for i in range(64)]


@pytest.fixture(scope="module")
def engine() -> SentenceTransformerEngine:
    return SentenceTransformerEngine(device="cpu")


def test_counting_tokens_while_a_batch_encodes_leaves_the_batch_alone(
    engine: SentenceTransformerEngine,
) -> None:
    # The gateway counts tokens on its event loop while a worker thread encodes: counting once
    # reconfigured the shared tokenizer mid-encode ("Unable to create tensor").
    stop = threading.Event()
    counts: list[list[int]] = []

    def count() -> None:
        while not stop.is_set():
            counts.append(engine.count_tokens([TEXTS[5]]))

    thread = threading.Thread(target=count)
    thread.start()
    try:
        for _ in range(10):
            assert len(engine.embed(TEXTS)) == len(TEXTS)
    finally:
        stop.set()
        thread.join()
    assert counts and all(c == counts[0] for c in counts)


def test_token_counts_match_the_model_tokenizer(engine: SentenceTransformerEngine) -> None:
    texts = [*TEXTS[:5], "héllo wörld, 日本語", "x " * 600]
    expected = [len(ids) for ids in engine.model.tokenizer(texts, truncation=False)["input_ids"]]
    assert engine.count_tokens(texts) == expected


def test_passes_on_cpu_are_small_and_do_not_change_the_vectors(engine: SentenceTransformerEngine) -> None:
    assert engine.batch_size == CPU_PASS_SIZE
    one_pass = engine.model.encode(TEXTS, batch_size=len(TEXTS), convert_to_numpy=True)
    np.testing.assert_allclose(np.asarray(engine.embed(TEXTS)), one_pass, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        SentenceTransformerEngine(device="cpu", batch_size=0)
