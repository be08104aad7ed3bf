"""API keys (hashed, compared in constant time) and per-key rate limits.

Keys come from an environment variable (``SAGE_CONTROLPLANE_API_KEYS="name1:key1,key2"``)
and/or a file (one ``name key`` or ``key`` per line, ``#`` comments). Only SHA-256 digests
are kept in memory. A key without a name is named ``key<N>``; names select per-key defaults
and limits in the config's ``keys`` section.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sage_prefect.common.errors import ConfigError


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass
class KeyRing:
    digests: dict[bytes, str]  # digest -> key name

    @classmethod
    def load(cls, env_var: str, file: Path | None) -> KeyRing:
        entries: list[tuple[str | None, str]] = []
        for item in os.environ.get(env_var, "").split(","):
            item = item.strip()
            if item:
                name, sep, key = item.partition(":")
                entries.append((name, key) if sep else (None, item))
        if file is not None:
            try:
                lines = Path(file).read_text().splitlines()
            except OSError as exc:
                raise ConfigError(
                    f"{file}: cannot read the API key file: {exc.strerror}", file=str(file)
                ) from None
            for number, line in enumerate(lines, 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) > 2:
                    raise ConfigError(
                        f"{file}:{number}: expected 'name key' or 'key'", file=str(file), line=number
                    )
                entries.append((parts[0], parts[1]) if len(parts) == 2 else (None, parts[0]))
        digests: dict[bytes, str] = {}
        for i, (label, key) in enumerate(entries):
            digests[_digest(key)] = label or f"key{i}"
        return cls(digests)

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def identify(self, presented: str) -> str | None:
        """The key's name, or None. Compares against every stored digest in constant time."""
        candidate = _digest(presented)
        found: str | None = None
        for digest, name in self.digests.items():
            if hmac.compare_digest(candidate, digest):
                found = name
        return found


class RateLimiter:
    """A token bucket per key: ``rate`` requests per second, bursts up to ``burst``."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)

    def acquire(self, key: str, rate: float, burst: int) -> float:
        """0 when the request may go, else the seconds until it could."""
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (float(burst), now))
        tokens = min(float(burst), tokens + (now - last) * rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / rate
