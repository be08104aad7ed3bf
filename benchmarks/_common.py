"""Pieces every benchmark script shares: the commit it ran on, and the chat prompts of the LLM
benchmarks (`llm_batching.py`, `interference.py`). Light on purpose: no project imports."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

TOPICS = (
    "the history of the river",
    "how a scheduler picks the next task",
    "why the sky is blue",
    "sorting a list in Python",
    "the weather station on the mountain",
    "a short poem about autumn",
    "continuous batching",
    "the night train to the coast",
)


def git_commit() -> str:
    """The short commit of the checkout the benchmark ran from ("unknown" outside git)."""
    try:
        cmd = ["git", "rev-parse", "--short", "HEAD"]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def chat_messages(i: int) -> list[dict[str, Any]]:
    """The ``i``-th chat request of the LLM benchmarks."""
    return [
        {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
        {"role": "user", "content": f"Question {i}: tell me about {TOPICS[i % len(TOPICS)]}."},
    ]
