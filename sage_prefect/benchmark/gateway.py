"""Control planes for the scheduling benchmarks: one per policy, each in its own subprocess on
127.0.0.1, built from the embedded models so runs on one machine compare like with like.

`benchmark_config` is the gateway configuration the control-plane benchmark uses: the LLM
(default: the tiny random-weight LM on the ``transformers`` engine) and the embedding model
(all-MiniLM-L6-v2, ``embedding_replicas`` replicas) on the same device, with an
``interactive`` class (TTFT/TPOT/e2e objectives, priority -1) and a ``batch`` class (priority 1,
a long e2e objective, a deep queue). `running_gateway` starts it with one torch thread per
engine thread (``OMP_NUM_THREADS``), as ``controlplane/config.py`` recommends on CPU.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from sage_prefect.controlplane.config import ControlPlaneConfig
from sage_prefect.controlplane.server import start_background

__all__ = ["benchmark_config", "running_gateway"]


def benchmark_config(
    policy: str,
    *,
    ttft_ms: float,
    tpot_ms: float,
    e2e_ms: float = 30_000,
    embedding_model: str = "all-MiniLM-L6-v2",
    llm_model: str = "sage-tiny-random-lm",
    llm_params: dict[str, Any] | None = None,
    embedding_replicas: int = 2,
    device: str = "cpu",
    batching: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The control-plane config (as a dict, validated) of a scheduling benchmark run under ``policy``."""
    config = {
        "host": "127.0.0.1",
        "policy": policy,
        "default_class": "interactive",
        "classes": {
            "interactive": {
                "ttft_ms": ttft_ms,
                "tpot_ms": tpot_ms,
                "e2e_ms": e2e_ms,
                "max_queue": 256,
                "priority": -1,
            },
            "batch": {"e2e_ms": 600_000, "max_queue": 4096, "max_queued_tokens": 8_000_000, "priority": 1},
        },
        "models": [
            {
                "name": embedding_model,
                "kind": "embedding",
                "engine": "sentence-transformers",
                "device": device,
                "replicas": embedding_replicas,
            },
            {
                "name": llm_model,
                "kind": "llm",
                "engine": "transformers",
                "device": device,
                "params": llm_params or {"model": "tiny"},
            },
        ],
    }
    if batching:
        config["batching"] = batching
    ControlPlaneConfig(**config)  # fail here, naming the field, rather than in the subprocess
    return config


@contextmanager
def running_gateway(
    config: dict[str, Any], *, torch_threads: int = 1, log_dir: Path | None = None
) -> Iterator[str]:
    """A control plane from ``config`` in a subprocess on 127.0.0.1; yields its ``.../v1`` URL,
    stops it on exit. Its log goes to ``log_dir`` (default: a temporary directory)."""
    with tempfile.TemporaryDirectory(prefix="sage-bench-gateway-") as tmp:
        path = Path(tmp) / "controlplane.yaml"
        path.write_text(yaml.safe_dump({**config, "host": "127.0.0.1"}, sort_keys=False))
        env = {
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            "OMP_NUM_THREADS": str(torch_threads),
            "MKL_NUM_THREADS": str(torch_threads),
            "TOKENIZERS_PARALLELISM": "false",
        }
        log = (log_dir or Path(tmp)) / f"gateway-{config.get('policy', 'default')}-{os.getpid()}.log"
        with start_background(path, log=log, env=env) as bg:
            yield bg.base_url
