"""`Embedder`: text -> vector through the control plane's ``/v1/embeddings`` (openai SDK).

A partition is embedded in requests of ``batch_size`` texts, ``concurrency`` of them in
flight at once (threads sharing one SDK client and its connection pool); the vectors come
back in row order as one ``fixed_size_list<float32>[dim]`` column. Vectors travel as
base64 little-endian float32 (``encoding_format="base64"``), so they arrive bit-exact and
without a JSON float round trip.

>>> Embedder({"batch_size": 0})
Traceback (most recent call last):
...
sage_prefect.common.errors.ConfigError: Embedder: config key 'batch_size': Input should be greater than or equal to 1 (got int 0)
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from sage_prefect.common.errors import OperatorError, RecordError
from sage_prefect.common.functions import MapFunction, Record
from sage_prefect.common.records import with_columns
from sage_prefect.common.settings import load_settings
from sage_prefect.tasks.base import Operator
from sage_prefect.tasks.client import EndpointConfig, client

if TYPE_CHECKING:
    from openai import OpenAI

__all__ = ["Embedder", "embed_texts", "vector_array"]

_INPUT_PARAM = re.compile(r"^input\[(\d+)\]$")


class Embedder(Operator, MapFunction):
    """Add an embedding vector of ``input_field`` to every record (``output_field``).

    Config (besides ``base_url``, ``api_key``, ``timeout_s``, ``max_retries``):
    ``model`` (default: settings ``embedding_model``), ``input_field`` (``"text"``),
    ``output_field`` (``"vector"``), ``batch_size`` (texts per request, 128),
    ``concurrency`` (requests in flight per partition, 4).

    ``execute_batch`` embeds a whole partition and returns it with the vector column
    (``fixed_size_list<float32>[dim]``; an existing column of that name is replaced). An
    empty partition gets the column too, with the model's dimension. ``execute(record)``
    embeds one record and returns the vector as a list of floats. A null or non-string text
    raises `RecordError`, a failed request `OperatorError`; both name the operator, the
    field and the row (``exc.row``).
    """

    class Config(EndpointConfig):
        model: str | None = Field(
            None, min_length=1, description="Embedding model at the control plane; default settings"
        )
        input_field: str = Field("text", min_length=1, description="Field holding the text to embed")
        output_field: str = Field("vector", min_length=1, description="Field the vector is written to")
        batch_size: int = Field(128, ge=1, le=2048, description="Texts per /v1/embeddings request")
        concurrency: int = Field(4, ge=1, le=64, description="Requests in flight per partition")

    cfg: Config

    def _runtime_attributes(self) -> tuple[str, ...]:
        return ("_client",)

    def setup(self) -> None:
        """Create the shared openai client and resolve the model name."""
        self._client: OpenAI = client(self.cfg, self.name)
        self.model: str = self.cfg.model or load_settings().embedding_model
        self._dim: int | None = getattr(self, "_dim", None)
        self._ready = True

    # -- the SAGE function interface -----------------------------------------------------------
    def execute(self, data: Record) -> Record:
        """Embed one record; the vector is a list of floats (float32 values)."""
        self.ensure_setup()
        field = self.cfg.input_field
        if field not in data:
            raise RecordError(
                f"{self.name}: record has no field {field!r} (fields: {sorted(data)})",
                operator=self.name,
                field=field,
                row=0,
            )
        texts = _check_texts([data[field]], self.name, field)
        vectors = self.embed(texts)
        return {**data, self.cfg.output_field: vectors[0].tolist()}

    def execute_batch(self, table: pa.Table) -> pa.Table:
        """Embed every row of the partition, keeping row order."""
        self.ensure_setup()
        field = self.cfg.input_field
        if table.num_rows == 0:
            empty = vector_array(np.zeros((0, self.dimension()), dtype=np.float32))
            return with_columns(table, {self.cfg.output_field: empty})
        if field not in table.column_names:
            raise RecordError(
                f"{self.name}: partition has no field {field!r} (fields: {table.column_names})",
                operator=self.name,
                field=field,
            )
        column = table.column(field)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise RecordError(
                f"{self.name}: field {field!r} must hold strings, got {column.type}",
                operator=self.name,
                field=field,
            )
        texts = _check_texts(column.to_pylist(), self.name, field)
        return with_columns(table, {self.cfg.output_field: vector_array(self.embed(texts))})

    # -- helpers other operators and callers use -----------------------------------------------
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` (in order) and return a ``(len(texts), dim)`` float32 array."""
        self.ensure_setup()
        vectors = embed_texts(
            self._client,
            self.model,
            texts,
            batch_size=self.cfg.batch_size,
            concurrency=self.cfg.concurrency,
            operator=self.name,
            field=self.cfg.input_field,
        )
        if len(texts):
            self._dim = int(vectors.shape[1])
        return vectors

    def dimension(self) -> int:
        """The model's vector dimension (learned from the first request; probed once if needed)."""
        self.ensure_setup()
        if self._dim is None:
            self._dim = int(self.embed(["dimension probe"]).shape[1])
        return self._dim


def embed_texts(
    openai_client: OpenAI,
    model: str,
    texts: Sequence[str],
    *,
    batch_size: int = 128,
    concurrency: int = 4,
    operator: str = "Embedder",
    field: str = "text",
) -> np.ndarray:
    """Embed ``texts`` with ``model`` in requests of ``batch_size``, ``concurrency`` in flight.

    Returns a ``(len(texts), dim)`` float32 array in the order of ``texts``. A failed request
    raises `OperatorError` naming ``operator``, the rows it covered and, when the server
    names one input (``param: input[i]``), that row (``exc.row``).
    """
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    starts = list(range(0, len(texts), batch_size))

    def one(start: int) -> np.ndarray:
        return _request(openai_client, model, list(texts[start : start + batch_size]), start, operator, field)

    if len(starts) == 1 or concurrency == 1:
        parts = [one(s) for s in starts]
    else:
        with ThreadPoolExecutor(
            max_workers=min(concurrency, len(starts)), thread_name_prefix=f"{operator}-embed"
        ) as pool:
            futures = [pool.submit(one, s) for s in starts]
            try:
                parts = [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    dims = {p.shape[1] for p in parts}
    if len(dims) != 1:
        raise OperatorError(
            f"{operator}: model {model!r} returned vectors of different sizes {sorted(dims)}",
            operator=operator,
        )
    return np.concatenate(parts, axis=0)


def _request(
    openai_client: OpenAI, model: str, batch: list[str], start: int, operator: str, field: str
) -> np.ndarray:
    import openai

    rows = f"rows {start}-{start + len(batch) - 1}" if len(batch) > 1 else f"row {start}"
    try:
        response = openai_client.embeddings.create(model=model, input=batch, encoding_format="base64")
    except openai.APIStatusError as exc:
        row, detail = _locate(exc, start)
        where = f"row {row} (field {field!r})" if row is not None else f"{rows} (field {field!r})"
        raise OperatorError(
            f"{operator}: embedding {where} with model {model!r} failed: HTTP {exc.status_code}: {detail}",
            operator=operator,
            field=field,
            row=row if row is not None else start,
            status_code=exc.status_code,
        ) from None
    except openai.APIError as exc:  # connection errors, timeouts
        raise OperatorError(
            f"{operator}: embedding {rows} (field {field!r}) with model {model!r} failed: "
            f"{type(exc).__name__}: {exc}",
            operator=operator,
            field=field,
            row=start,
        ) from None
    data = sorted(response.data, key=lambda d: d.index)
    if len(data) != len(batch) or [d.index for d in data] != list(range(len(batch))):
        raise OperatorError(
            f"{operator}: embedding {rows}: the server returned {len(data)} vectors for {len(batch)} texts",
            operator=operator,
            row=start,
        )
    vectors = [_decode(d.embedding) for d in data]
    try:
        return np.stack(vectors)
    except ValueError:
        raise OperatorError(
            f"{operator}: embedding {rows}: vectors of different sizes in one response",
            operator=operator,
            row=start,
        ) from None


def _decode(embedding: Any) -> np.ndarray:
    if isinstance(embedding, str):  # base64, little-endian float32
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4").astype(np.float32)
    return np.asarray(embedding, dtype=np.float32)


def _locate(exc: Any, start: int) -> tuple[int | None, str]:
    """The partition row a server error names (``param: input[i]``) and the error's message."""
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body) if isinstance(body.get("error", body), dict) else body
    message = str(error.get("message") or exc.message)
    param = error.get("param")
    match = _INPUT_PARAM.match(param) if isinstance(param, str) else None
    if match is None:
        return None, message
    return start + int(match.group(1)), message


def _check_texts(values: list[Any], operator: str, field: str) -> list[str]:
    for i, value in enumerate(values):
        if not isinstance(value, str):
            got = "null" if value is None else f"{type(value).__name__} {value!r:.60}"
            raise RecordError(
                f"{operator}: row {i}: field {field!r} is {got}, expected a string to embed",
                operator=operator,
                field=field,
                row=i,
                record_index=i,
            )
    return values


def vector_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """A ``(n, dim)`` array as Arrow ``fixed_size_list<float32>[dim]``.

    >>> vector_array(np.ones((2, 3), dtype=np.float32)).type
    FixedSizeListType(fixed_size_list<item: float>[3])
    """
    flat = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), int(vectors.shape[1]))
