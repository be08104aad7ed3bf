"""Operators of the README demo pipeline (``examples/demo.yaml``).

Real work on synthetic documents: upper-casing, a hashed bag-of-words vector (feature
hashing; a stand-in for an embedding model so the demo runs with no model weights),
a filter, and a LanceDB sink. ``HashEmbed`` is declared as a GPU step in the demo to
show placement: on a machine without GPUs it runs on CPU workers (``allow_cpu_fallback``).
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

from sage_prefect.common.functions import BatchFunction, MapFunction

WORDS = [
    "pipeline",
    "dataflow",
    "prefect",
    "dask",
    "arrow",
    "lance",
    "vector",
    "embedding",
    "retrieval",
    "agent",
    "tool",
    "planner",
    "gateway",
    "scheduler",
    "batch",
    "latency",
    "token",
    "model",
    "worker",
    "cluster",
    "partition",
    "stream",
    "sink",
    "source",
]
TOKEN = re.compile(r"\w+")


class SyntheticDocs(BatchFunction):
    """``count`` synthetic documents (``id``, ``text``), handed over ``chunk`` at a time.

    >>> src = SyntheticDocs({"count": 3, "chunk": 2}); src.setup()
    >>> [len(src.execute()), len(src.execute()), src.execute()]
    [2, 1, None]
    """

    def setup(self) -> None:
        self.count = int(self.config.get("count", 10_000))
        self.chunk = int(self.config.get("chunk", 1_000))
        self.next_id = 0

    def execute(self) -> list[dict[str, Any]] | None:  # type: ignore[override]
        if self.next_id >= self.count:
            return None
        end = min(self.count, self.next_id + self.chunk)
        docs = [{"id": i, "text": _text(i)} for i in range(self.next_id, end)]
        self.next_id = end
        return docs


def _text(i: int) -> str:
    n = len(WORDS)
    return f"doc {i}: " + " ".join(WORDS[(i * 7 + k * 3) % n] for k in range(12 + i % 9))


class Upper(MapFunction):
    """Upper-case the ``text`` field.

    >>> Upper().execute({"text": "a b"})
    {'text': 'A B'}
    """

    def execute(self, data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "text": data["text"].upper()}


class HashEmbed(MapFunction):
    """A ``dim``-dimensional, L2-normalised hashed bag-of-words vector of ``text``.

    >>> v = HashEmbed({"dim": 8}).execute({"text": "a b a"})["vector"]
    >>> len(v), round(sum(x * x for x in v), 6)
    (8, 1.0)
    """

    def execute(self, data: dict[str, Any]) -> dict[str, Any]:
        dim = int(self.config.get("dim", 64))
        vector = [0.0] * dim
        for token in TOKEN.findall(data["text"].lower()):
            h = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
            vector[h % dim] += 1.0 if (h >> 63) == 0 else -1.0
        norm = math.sqrt(sum(x * x for x in vector)) or 1.0
        return {**data, "vector": [x / norm for x in vector]}


def even_id(record: dict[str, Any]) -> bool:
    """Keep records with an even ``id``."""
    return int(record["id"]) % 2 == 0
