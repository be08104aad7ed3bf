"""sage-prefect: SAGE-style LLM/AI dataflow pipelines as Prefect flows on a Dask GPU/CPU cluster.

>>> from sage_prefect import LocalEnvironment, MapFunction
"""

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
from sage_prefect.data import CollectSink, JSONLSink, LanceSink, ParquetSink, PrintSink
from sage_prefect.kernel import DaskEnvironment, DataStream, LocalEnvironment, PipelineResult

__version__ = "0.1.0"

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
