"""The error tree: every error sage-prefect raises on purpose derives from `SageError`.

Leaves also inherit the matching builtin (as Prefect does), so ``except ValueError``
in user code keeps working. Each error carries the place it is about (file, line,
field, operator, partition) both in its message and as attributes, and pickles
cleanly so it survives the trip from a Dask worker back to the flow.
"""

from __future__ import annotations

from typing import Any


class SageError(Exception):
    """Root of all sage-prefect errors.

    >>> try:
    ...     raise ConfigError("bad batch_size", field="batch_size")
    ... except SageError as exc:
    ...     exc.field
    'batch_size'
    """

    def __init__(self, message: str, **where: Any) -> None:
        super().__init__(message)
        self.message = message
        self.where = where
        for key, value in where.items():
            setattr(self, key, value)

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle as cls(*args); keyword context would be lost otherwise.
        return (_rebuild, (type(self), self.message, self.where))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[SageError], message: str, where: dict[str, Any]) -> SageError:
    return cls(message, **where)


class ConfigError(SageError, ValueError):
    """Invalid settings, pipeline spec or operator config (names the file/line/field)."""


class PipelineDefinitionError(SageError, ValueError):
    """A pipeline that cannot be built: no source, a stage after a sink, a bad argument."""


class UnknownOperatorError(SageError, LookupError):
    """An operator import path (``package.module.Name``) that does not resolve."""


class RecordError(SageError, TypeError):
    """A record that is not a dict, or a value Arrow cannot carry (names operator and partition)."""


class EmptySourceError(SageError, ValueError):
    """A source that produced no records at all."""


class OperatorError(SageError, RuntimeError):
    """An operator raised while processing a partition (names operator, stage and partition)."""


class ResourceUnavailableError(SageError, RuntimeError):
    """No worker in the cluster carries a resource label an operator asked for."""


class PipelineRunError(SageError, RuntimeError):
    """The Prefect flow run of a pipeline ended in a failed state."""


class WorkerLostError(OperatorError):
    """The Dask workers running a partition died until Dask gave up on it (`distributed.KilledWorker`).

    Names the operator, stage and partition, and carries the addresses of the lost workers
    (``workers``, oldest first) and the scheduler's ``allowed_failures``; ``also_lost`` lists
    ``(operator, partition)`` of other tasks Dask gave up on with it (tasks that only waited on
    a dying worker count its death too, so the culprit may be one of them). An `OperatorError`,
    so code that handles "a partition failed" handles this too; a worker that dies on every
    attempt (out of memory, a crash in native code) usually dies again on a re-run.

    >>> exc = WorkerLostError("operator 'embed' ...", operator="embed", partition=2, workers=["tcp://10.0.0.5:4321"])
    >>> exc.partition, exc.workers
    (2, ['tcp://10.0.0.5:4321'])
    """
