"""L1 common: settings, the error tree, SAGE function base classes, Arrow record helpers."""

from sage_prefect.common.errors import (
    ConfigError,
    EmptySourceError,
    OperatorError,
    PipelineDefinitionError,
    PipelineRunError,
    RecordError,
    ResourceUnavailableError,
    SageError,
    UnknownOperatorError,
    WorkerLostError,
)
from sage_prefect.common.functions import (
    BaseFunction,
    BatchFunction,
    FilterFunction,
    FlatMapFunction,
    KeyByFunction,
    MapFunction,
    SinkFunction,
    SourceFunction,
)
from sage_prefect.common.settings import SageSettings, load_settings

__all__ = [
    "BaseFunction",
    "BatchFunction",
    "ConfigError",
    "EmptySourceError",
    "FilterFunction",
    "FlatMapFunction",
    "KeyByFunction",
    "MapFunction",
    "OperatorError",
    "PipelineDefinitionError",
    "PipelineRunError",
    "RecordError",
    "ResourceUnavailableError",
    "SageError",
    "SageSettings",
    "SinkFunction",
    "SourceFunction",
    "UnknownOperatorError",
    "WorkerLostError",
    "load_settings",
]
