"""L2 data: Arrow batches between stages, Lance stage handles, the Arrow result serializer, sinks.

Importing this package is cheap: ``lancedb`` is imported inside the functions that use
it, and ``prefect`` only when `ArrowSerializer` is first accessed.

>>> from sage_prefect.data import StageHandle, maybe_spill, resolve, LanceSink
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sage_prefect.data.handles import (
    StageDataMissingError,
    StageHandle,
    drop_stage_data,
    load,
    maybe_spill,
    resolve,
    spill,
)
from sage_prefect.data.sinks import (
    PARTITION_COLUMN,
    ROW_COLUMN,
    CollectSink,
    JSONLSink,
    LanceSink,
    ParquetSink,
    PartitionSink,
    PrintSink,
    SinkError,
    SinkOption,
    partition_file_name,
    replace_table,
)

if TYPE_CHECKING:
    from sage_prefect.data.serializer import ArrowSerializer

__all__ = [
    "PARTITION_COLUMN",
    "ROW_COLUMN",
    "ArrowSerializer",
    "CollectSink",
    "JSONLSink",
    "LanceSink",
    "ParquetSink",
    "PartitionSink",
    "PrintSink",
    "SinkError",
    "SinkOption",
    "StageDataMissingError",
    "StageHandle",
    "drop_stage_data",
    "load",
    "maybe_spill",
    "partition_file_name",
    "replace_table",
    "resolve",
    "spill",
]


def __getattr__(name: str) -> Any:
    # ArrowSerializer subclasses a Prefect class: import prefect (~2 s) only when asked for.
    if name == "ArrowSerializer":
        from sage_prefect.data.serializer import ArrowSerializer

        return ArrowSerializer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
