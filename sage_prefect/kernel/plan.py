"""The logical plan: a tree of operator nodes hanging off one source.

The plan is data only (no Prefect, no Dask): `DataStream` calls build it, the YAML
loader builds it, the compiler turns it into a Prefect flow.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sage_prefect.common.errors import PipelineDefinitionError
from sage_prefect.common.functions import (
    FUNCTION_KINDS,
    BaseFunction,
)

OPERATOR_KINDS = tuple(FUNCTION_KINDS)


@dataclass
class SourceSpec:
    """Where the records come from: in-memory data, or a source function class + config."""

    kind: str  # "batch" | "source" | "collection"
    data: Any = None
    function: type[BaseFunction] | None = None
    config: dict[str, Any] | None = None
    name: str = "source"
    allow_empty: bool = False

    def __getstate__(self) -> dict[str, Any]:
        # The source is read on the driver only. Prefect ships the flow (and with it the plan)
        # in the context of every task; leaving the records out keeps each task small.
        return {**self.__dict__, "data": None}


@dataclass
class OperatorSpec:
    """One operator of the pipeline with its execution options."""

    kind: str
    function: Any  # a BaseFunction subclass, an instance, or a plain callable
    config: dict[str, Any] | None = None
    name: str = ""
    resources: dict[str, float] | None = None
    parallelism: int | None = None
    retries: int = 0
    retry_delay_seconds: float | list[float] = 0
    timeout_seconds: float | None = None
    cache: bool = False

    def __post_init__(self) -> None:
        if self.kind not in OPERATOR_KINDS:
            raise PipelineDefinitionError(
                f"unknown operator kind {self.kind!r}; expected one of {OPERATOR_KINDS}"
            )
        self.name = self.name or operator_name(self.function)
        where = f"operator {self.name!r} ({self.kind})"
        _check_function(self.kind, self.function, where)
        if self.config is not None and not isinstance(self.config, dict):
            raise PipelineDefinitionError(
                f"{where}: config must be a dict, got {type(self.config).__name__}", operator=self.name
            )
        if self.resources is not None and (
            not isinstance(self.resources, dict)
            or not all(
                isinstance(k, str) and isinstance(v, int | float) and v > 0 for k, v in self.resources.items()
            )
        ):
            raise PipelineDefinitionError(
                f"{where}: resources must map label names to positive numbers, got {self.resources!r}",
                operator=self.name,
            )
        _check_positive_int(self.parallelism, "parallelism", where, allow_none=True)
        _check_positive_int(self.retries, "retries", where, allow_zero=True)
        if self.timeout_seconds is not None and not (
            isinstance(self.timeout_seconds, int | float) and self.timeout_seconds > 0
        ):
            raise PipelineDefinitionError(
                f"{where}: timeout_seconds must be a positive number, got {self.timeout_seconds!r}",
                operator=self.name,
            )

    def digest(self) -> str:
        """A stable fingerprint of the operator (function identity + config), for cache keys."""
        fn = self.function
        ident = f"{fn.__module__}.{fn.__qualname__}" if isinstance(fn, type) else repr(fn)
        if isinstance(fn, BaseFunction):
            ident = f"{type(fn).__module__}.{type(fn).__qualname__}:{json.dumps(fn.config, sort_keys=True, default=repr)}"
        payload = json.dumps([self.kind, ident, self.config], sort_keys=True, default=repr)
        return hashlib.blake2b(payload.encode(), digest_size=8).hexdigest()


@dataclass
class Node:
    """A node of the plan tree; node 0 is the source."""

    id: int
    parent: int | None
    op: OperatorSpec | None  # None for the source node
    children: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.op.name if self.op is not None else "source"


@dataclass
class Plan:
    """The logical plan of one pipeline: a source and a tree of operators."""

    name: str
    source: SourceSpec | None = None
    nodes: list[Node] = field(default_factory=list)

    def set_source(self, source: SourceSpec) -> int:
        if self.source is not None:
            raise PipelineDefinitionError(
                f"pipeline {self.name!r} already has a source ({self.source.name}); one source per environment"
            )
        self.source = source
        self.nodes.append(Node(0, None, None))
        return 0

    def add(self, parent: int, op: OperatorSpec) -> int:
        parent_node = self.nodes[parent]
        if parent_node.op is not None and parent_node.op.kind == "sink":
            raise PipelineDefinitionError(
                f"operator {op.name!r} follows sink {parent_node.op.name!r}; nothing can come after a sink",
                operator=op.name,
            )
        node = Node(len(self.nodes), parent, op)
        self.nodes.append(node)
        parent_node.children.append(node.id)
        return node.id

    def operators(self) -> list[OperatorSpec]:
        return [n.op for n in self.nodes if n.op is not None]

    def validate(self) -> None:
        if self.source is None:
            raise PipelineDefinitionError(
                f"pipeline {self.name!r} has no source: start it with env.from_batch(...) or env.from_source(...)"
            )
        if len(self.nodes) == 1:
            raise PipelineDefinitionError(f"pipeline {self.name!r} has a source but no operators")


def operator_name(function: Any) -> str:
    if isinstance(function, type):
        return function.__name__
    if isinstance(function, BaseFunction):
        return type(function).__name__
    name = getattr(function, "__name__", None) or type(function).__name__
    return name


def _check_function(kind: str, function: Any, where: str) -> None:
    expected = FUNCTION_KINDS[kind]
    if isinstance(function, type):
        if not issubclass(function, BaseFunction):
            raise PipelineDefinitionError(
                f"{where}: {function.__qualname__} is not a SAGE function; subclass {expected.__name__}",
                operator=operator_name(function),
            )
        if not issubclass(function, expected) and not _has_batch(function):
            raise PipelineDefinitionError(
                f"{where}: {function.__qualname__} is a {function.__mro__[1].__name__}, expected a "
                f"{expected.__name__} for .{kind}()",
                operator=operator_name(function),
            )
        return
    if isinstance(function, BaseFunction):
        if not isinstance(function, expected) and not _has_batch(type(function)):
            raise PipelineDefinitionError(
                f"{where}: {type(function).__qualname__} is not a {expected.__name__}",
                operator=operator_name(function),
            )
        return
    if not callable(function):
        raise PipelineDefinitionError(
            f"{where}: expected a {expected.__name__} subclass or a callable, got {type(function).__name__}",
            operator=operator_name(function),
        )


def _has_batch(cls: type) -> bool:
    return callable(getattr(cls, "execute_batch", None))


def _check_positive_int(
    value: Any, field_name: str, where: str, *, allow_none: bool = False, allow_zero: bool = False
) -> None:
    if value is None and allow_none:
        return
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise PipelineDefinitionError(
            f"{where}: {field_name} must be an integer >= {low}, got {value!r}", field=field_name
        )


CallableOp = Callable[..., Any]
