"""sage-prefect: SAGE-style LLM/AI dataflow pipelines as Prefect flows on a Dask GPU/CPU cluster.

>>> from sage_prefect import LocalEnvironment, MapFunction
"""

import importlib
from typing import TYPE_CHECKING, Any

from sage_prefect.common import (
    BaseFunction,
    BatchFunction,
    ConfigError,
    EmptySourceError,
    FilterFunction,
    FlatMapFunction,
    KeyByFunction,
    MapFunction,
    OperatorError,
    PipelineDefinitionError,
    PipelineRunError,
    RecordError,
    ResourceUnavailableError,
    SageError,
    SageSettings,
    SinkFunction,
    SourceFunction,
    UnknownOperatorError,
    WorkerLostError,
)

if TYPE_CHECKING:
    from sage_prefect.data import CollectSink, JSONLSink, LanceSink, ParquetSink, PrintSink
    from sage_prefect.kernel import DaskEnvironment, DataStream, LocalEnvironment, PipelineResult

__version__ = "0.1.0"

# The kernel (Prefect) and the data layer (LanceDB) load on first use, not with the package: a
# control-plane process or a placed replica's engine server imports neither, and starts ~3 s sooner.
_LAZY = {
    "CollectSink": "sage_prefect.data",
    "JSONLSink": "sage_prefect.data",
    "LanceSink": "sage_prefect.data",
    "ParquetSink": "sage_prefect.data",
    "PrintSink": "sage_prefect.data",
    "DaskEnvironment": "sage_prefect.kernel",
    "DataStream": "sage_prefect.kernel",
    "LocalEnvironment": "sage_prefect.kernel",
    "PipelineResult": "sage_prefect.kernel",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sage_prefect' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "BaseFunction",
    "BatchFunction",
    "CollectSink",
    "ConfigError",
    "DaskEnvironment",
    "DataStream",
    "EmptySourceError",
    "FilterFunction",
    "FlatMapFunction",
    "JSONLSink",
    "KeyByFunction",
    "LanceSink",
    "LocalEnvironment",
    "MapFunction",
    "OperatorError",
    "ParquetSink",
    "PipelineDefinitionError",
    "PipelineResult",
    "PipelineRunError",
    "PrintSink",
    "RecordError",
    "ResourceUnavailableError",
    "SageError",
    "SageSettings",
    "SinkFunction",
    "SourceFunction",
    "UnknownOperatorError",
    "WorkerLostError",
]
