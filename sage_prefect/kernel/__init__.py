"""L3 kernel: environments, DataStream (the SAGE API), the logical plan and its compiler to Prefect."""

from sage_prefect.kernel.datastream import DataStream
from sage_prefect.kernel.environment import (
    BaseEnvironment,
    DaskEnvironment,
    LocalEnvironment,
    PipelineResult,
    environment_from_settings,
)
from sage_prefect.kernel.plan import OperatorSpec, Plan, SourceSpec

__all__ = [
    "BaseEnvironment",
    "DaskEnvironment",
    "DataStream",
    "LocalEnvironment",
    "OperatorSpec",
    "PipelineResult",
    "Plan",
    "SourceSpec",
    "environment_from_settings",
]
