"""SAGE function base classes: the user-facing contract of an operator.

An operator is a class with ``execute(...)``; its config arrives as one dict. Heavy
things (models, clients) belong in ``setup()``, which the kernel calls once per
operator instance on the worker that runs it, not in ``__init__`` (the instance is
built where the pipeline is declared and shipped to workers).

An operator may also implement ``execute_batch(table) -> table`` on a whole
partition (a ``pyarrow.Table``); the kernel prefers it to the per-record path.

>>> class Upper(MapFunction):
...     def execute(self, data):
...         return {**data, "text": data["text"].upper()}
>>> Upper().execute({"text": "a"})
{'text': 'A'}
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

Record = dict[str, Any]


class BaseFunction:
    """Base of every SAGE function: holds the config dict and a ``setup()`` hook.

    >>> class Tag(MapFunction):
    ...     def execute(self, data):
    ...         return {**data, "tag": self.config["tag"]}
    >>> Tag({"tag": "x"}).execute({"id": 1})
    {'id': 1, 'tag': 'x'}
    """

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.config: dict[str, Any] = dict(config or {})
        self.config.update(kwargs)

    def setup(self) -> None:
        """Load heavy resources; called once per instance on the worker before first use."""

    @property
    def name(self) -> str:
        return type(self).__name__


class MapFunction(BaseFunction):
    """One record in, one record out.

    >>> class AddOne(MapFunction):
    ...     def execute(self, data):
    ...         return {**data, "x": data["x"] + 1}
    """

    def execute(self, data: Record) -> Record:
        raise NotImplementedError(f"{type(self).__name__}.execute(data) is not implemented")


class FilterFunction(BaseFunction):
    """Keep a record when ``execute`` returns true.

    >>> class Even(FilterFunction):
    ...     def execute(self, data):
    ...         return data["id"] % 2 == 0
    """

    def execute(self, data: Record) -> bool:
        raise NotImplementedError(f"{type(self).__name__}.execute(data) is not implemented")


class FlatMapFunction(BaseFunction):
    """One record in, any number out (an iterable of records).

    >>> class Words(FlatMapFunction):
    ...     def execute(self, data):
    ...         return [{"word": w} for w in data["text"].split()]
    """

    def execute(self, data: Record) -> Iterable[Record]:
        raise NotImplementedError(f"{type(self).__name__}.execute(data) is not implemented")


class KeyByFunction(BaseFunction):
    """Return the key of a record; downstream stages see all records of a key together.

    >>> class ByUser(KeyByFunction):
    ...     def execute(self, data):
    ...         return data["user"]
    """

    def execute(self, data: Record) -> Hashable:
        raise NotImplementedError(f"{type(self).__name__}.execute(data) is not implemented")


class SinkFunction(BaseFunction):
    """Consume records. Built-in sinks write whole partitions idempotently.

    A user sink implements ``execute(data)`` per record, or ``write_partition(table,
    partition_key)`` to receive a whole partition with a key that is stable across
    retries and re-runs (use it to make writes idempotent).

    >>> class Printer(SinkFunction):
    ...     def execute(self, data):
    ...         print(data)
    """

    def execute(self, data: Record) -> None:
        raise NotImplementedError(f"{type(self).__name__}.execute(data) is not implemented")

    def finish(self) -> None:
        """Called on the driver once every partition has been written."""


class SourceFunction(BaseFunction):
    """Produce records one ``execute()`` call at a time; return ``None`` to end.

    >>> class Count(SourceFunction):
    ...     def setup(self):
    ...         self.i = 0
    ...     def execute(self):
    ...         self.i += 1
    ...         return {"i": self.i} if self.i <= 3 else None
    """

    def execute(self) -> Record | None:
        raise NotImplementedError(f"{type(self).__name__}.execute() is not implemented")


class BatchFunction(SourceFunction):
    """A finite source (SAGE's batch source): ``execute()`` until it returns ``None``.

    A batch source may return a list of records or a ``pyarrow.Table`` per call
    instead of a single record, to hand over many rows at once.
    """

    def execute(self) -> Record | list[Record] | pa.Table | None:  # type: ignore[override]
        raise NotImplementedError(f"{type(self).__name__}.execute() is not implemented")


FUNCTION_KINDS: dict[str, type[BaseFunction]] = {
    "map": MapFunction,
    "filter": FilterFunction,
    "flatmap": FlatMapFunction,
    "keyby": KeyByFunction,
    "sink": SinkFunction,
}
