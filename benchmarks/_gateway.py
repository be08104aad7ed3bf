"""Shared pieces of the control-plane benchmarks (`embeddings.py`, `interference.py`).

Realistic varied texts (deterministic from a seed), a gateway in a subprocess started from a
config dict, and reading the gateway's Prometheus metrics. Not a benchmark itself.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from sage_prefect.controlplane.metrics import sample_sum
from sage_prefect.controlplane.server import Background, start_background

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
LLM_MODEL = "sage-tiny-random-lm"


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_ADJECTIVES = _words(
    "quiet old new small large bright dark early late careful simple complex local remote "
    "fast slow green northern southern modern ancient busy empty heavy light open hidden "
    "useful strange common rare warm cold narrow wide"
)
_NOUNS = _words(
    "river city engineer scheduler garden library station report harbour village teacher "
    "server cluster dataset model pipeline bridge market forest student storm letter "
    "machine window kitchen museum committee budget painting railway island experiment "
    "question answer recipe mountain festival customer database network policy contract"
)
_VERBS = _words(
    "describes follows crosses reaches builds repairs measures explains opens closes "
    "carries improves ignores watches replaces visits supports delays shares protects "
    "collects compares predicts records"
)
_PREPOSITIONS = _words("near behind across under beside beyond through around after before during")
_CONNECTORS = ("and then", "while", "because", "although", "so", "but", "after which", "whereas")
_OPENERS = ("Yesterday", "In the morning", "Every year", "According to the report", "Meanwhile", "Often")


def make_texts(n: int, seed: int = 0, min_words: int = 8, max_words: int = 60) -> list[str]:
    """``n`` English-like sentences of ``min_words``..``max_words`` words (uniform), built from
    clauses over a fixed vocabulary with a seeded RNG: varied lengths and wording, same every run."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        target = rng.randint(min_words, max_words)
        words: list[str] = []
        if rng.random() < 0.3:
            words += rng.choice(_OPENERS).split()
        clauses = 0
        while len(words) < target:
            if clauses:
                words += rng.choice(_CONNECTORS).split()
            clauses += 1
            words += ["the", rng.choice(_ADJECTIVES), rng.choice(_NOUNS), rng.choice(_VERBS)]
            words += [rng.choice(_PREPOSITIONS), "the", rng.choice(_NOUNS)]
        words = words[:target]
        words[0] = words[0].capitalize()
        texts.append(" ".join(words) + ".")
    return texts


@contextmanager
def gateway(
    config: dict[str, Any], *, torch_threads: int, log_dir: Path | None = None
) -> Iterator[Background]:
    """A control plane in a subprocess on 127.0.0.1 from ``config``; stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="sage-bench-") as tmp:
        path = Path(tmp) / "controlplane.yaml"
        path.write_text(yaml.safe_dump({"host": "127.0.0.1", **config}, sort_keys=False))
        env = {
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": str(torch_threads),
            "MKL_NUM_THREADS": str(torch_threads),
            "TOKENIZERS_PARALLELISM": "false",
        }
        log = (log_dir or Path(tmp)) / f"gateway-{os.getpid()}-{id(config)}.log"
        bg = start_background(path, log=log, env=env)
        try:
            yield bg
        finally:
            bg.stop()


def metric_sums(url: str, name: str) -> tuple[float, float]:
    """(sum, count) of a Prometheus histogram, summed over its label sets."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sample_sum(text, f"{name}_sum") or 0.0, sample_sum(text, f"{name}_count") or 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q) - 1))]
