"""A Prefect result serializer that stores Arrow data as Arrow IPC, never as a pickle.

Format of a serialized blob: an ASCII tag, a colon, the payload.

=====================  ==========================================================
tag                    payload
=====================  ==========================================================
``arrow``              base64 Arrow IPC stream of a ``pyarrow.Table``
``arrow-batch``        base64 Arrow IPC stream of one ``pyarrow.RecordBatch``
``arrow-raw``          raw Arrow IPC stream of a table (``binary=True``)
``arrow-batch-raw``    raw Arrow IPC stream of a record batch (``binary=True``)
``handle``             JSON object of a `StageHandle`
``json``               JSON of a plain value (dict with str keys, list, str, int, float,
                       bool, None), where nested stage handles are
                       ``{"__sage_stage_handle__": {...}}``
=====================  ==========================================================

Base64 is the default because Prefect embeds the serialized result in a JSON result
record unless result metadata is stored separately (a cache policy with
``key_storage``); there raw bytes are fine and ``binary=True`` saves a third.
Anything else raises `TypeError` naming the type: no silent pickle fallback.

>>> import pyarrow as pa
>>> s = ArrowSerializer()
>>> blob = s.dumps(pa.table({"x": [1, 2]}))
>>> blob[:6]
b'arrow:'
>>> s.loads(blob).column("x").to_pylist()
[1, 2]
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Literal

import pyarrow as pa
from prefect.serializers import Serializer

from sage_prefect.data.handles import StageHandle

__all__ = ["ArrowSerializer"]

_HANDLE_KEY = "__sage_stage_handle__"
_TABLE_TAGS = {b"arrow": (False, False), b"arrow-batch": (True, False)}
_RAW_TAGS = {b"arrow-raw": (False, True), b"arrow-batch-raw": (True, True)}


class ArrowSerializer(Serializer):
    """Prefect result serializer: Arrow tables/batches as Arrow IPC, handles and plain values as JSON.

    Registered with Prefect under the type ``"arrow"``, so ``result_serializer="arrow"``
    and persisted result records naming it resolve to this class (once this module is
    imported).

    >>> from prefect import task
    >>> @task(persist_result=True, result_serializer=ArrowSerializer())
    ... def stage(table):
    ...     return table
    """

    type: Literal["arrow"] = "arrow"
    binary: bool = False
    """Write raw IPC bytes instead of base64; only where result metadata is stored separately."""
    compression: Literal["lz4", "zstd"] | None = None
    """Arrow IPC buffer compression (readers detect it; ``None`` writes uncompressed buffers)."""

    def dumps(self, obj: Any) -> bytes:
        """Encode ``obj``; `TypeError` for a type this serializer does not carry."""
        if isinstance(obj, pa.Table | pa.RecordBatch):
            is_batch = isinstance(obj, pa.RecordBatch)
            ipc = self._ipc(obj)
            if self.binary:
                return (b"arrow-batch-raw:" if is_batch else b"arrow-raw:") + ipc
            return (b"arrow-batch:" if is_batch else b"arrow:") + base64.b64encode(ipc)
        if isinstance(obj, StageHandle):
            return b"handle:" + json.dumps(obj.to_dict(), sort_keys=True).encode()
        plain = _to_json(obj, "result")
        return b"json:" + json.dumps(plain, allow_nan=True).encode()

    def loads(self, blob: bytes) -> Any:
        """Decode a blob written by `dumps` (either encoding, whatever ``binary`` is now)."""
        if isinstance(blob, str):
            blob = blob.encode()
        tag, sep, payload = bytes(blob).partition(b":")
        if not sep:
            raise ValueError(f"not an ArrowSerializer blob (no tag): {bytes(blob[:16])!r}")
        if tag in _TABLE_TAGS or tag in _RAW_TAGS:
            is_batch, raw = _TABLE_TAGS.get(tag) or _RAW_TAGS[tag]
            if not raw:
                try:
                    payload = base64.b64decode(payload, validate=True)
                except binascii.Error as exc:
                    raise ValueError(f"corrupt base64 in an ArrowSerializer {tag.decode()!r} blob") from exc
            table = pa.ipc.open_stream(pa.py_buffer(payload)).read_all()
            if is_batch:
                return table.combine_chunks().to_batches()[0] if table.num_rows else _empty_batch(table)
            return table
        if tag == b"handle":
            return StageHandle.from_dict(json.loads(payload))
        if tag == b"json":
            return json.loads(payload, object_hook=_decode_handles)
        raise ValueError(f"unknown ArrowSerializer tag {tag[:32]!r}")

    def _ipc(self, obj: pa.Table | pa.RecordBatch) -> bytes:
        options = pa.ipc.IpcWriteOptions(compression=self.compression)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, obj.schema, options=options) as writer:
            writer.write(obj)
        return bytes(sink.getvalue().to_pybytes())


def _empty_batch(table: pa.Table) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([], schema=table.schema)


def _to_json(obj: Any, path: str) -> Any:
    """Check ``obj`` is plain JSON (stage handles allowed inside); return it with handles encoded."""
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, StageHandle):
        return {_HANDLE_KEY: obj.to_dict()}
    if isinstance(obj, list):
        return [_to_json(item, f"{path}[{i}]") for i, item in enumerate(obj)]
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"ArrowSerializer cannot store {path}: dict key {key!r} is "
                    f"{type(key).__name__}: only str keys round-trip through JSON (it never pickles)"
                )
            if key == _HANDLE_KEY:
                raise TypeError(
                    f"ArrowSerializer cannot store {path}: the key {_HANDLE_KEY!r} is reserved "
                    "(it never pickles)"
                )
            out[key] = _to_json(value, f"{path}[{key!r}]")
        return out
    raise TypeError(
        f"ArrowSerializer cannot store {path} of type {type(obj).__module__}.{type(obj).__qualname__}: "
        "it stores pyarrow Tables/RecordBatches (Arrow IPC), StageHandles and plain JSON values "
        "(dict with str keys, list, str, int, float, bool, None); it never pickles. Return one of "
        "those, or use another result_serializer for this task."
    )


def _decode_handles(obj: dict[str, Any]) -> Any:
    if set(obj) == {_HANDLE_KEY} and isinstance(obj[_HANDLE_KEY], dict):
        return StageHandle.from_dict(obj[_HANDLE_KEY])
    return obj
