"""`DataStream`: SAGE's fluent pipeline API (``map / filter / flatmap / keyby / sink / print``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sage_prefect.kernel.plan import OperatorSpec

if TYPE_CHECKING:
    from sage_prefect.kernel.environment import BaseEnvironment


class DataStream:
    """A stream of records at one point of a pipeline; each call adds an operator after it.

    Operators are SAGE function classes (with their config as a dict) or plain
    callables. Execution options apply to that operator only:

    - ``resources``: Dask resource labels its tasks need, e.g. ``{"GPU": 1}``;
    - ``parallelism``: at most this many of its partitions run at once (for ``keyby``:
      the number of key buckets);
    - ``retries``, ``retry_delay_seconds``, ``timeout_seconds``: Prefect task options;
    - ``cache``: reuse the persisted result of a partition the operator already
      processed with the same config and the same upstream lineage.

    >>> from sage_prefect import LocalEnvironment
    >>> env = LocalEnvironment("doc")
    >>> stream = env.from_batch([{"x": 1}]).map(lambda r: {**r, "y": 2}).filter(lambda r: r["y"] > 1)
    >>> [n.name for n in env.plan.nodes]
    ['source', '<lambda>', '<lambda>']
    """

    def __init__(self, env: BaseEnvironment, node_id: int) -> None:
        self.env = env
        self.node_id = node_id

    def _add(
        self,
        kind: str,
        function: Any,
        config: dict[str, Any] | None,
        *,
        name: str | None = None,
        resources: dict[str, float] | None = None,
        parallelism: int | None = None,
        retries: int = 0,
        retry_delay_seconds: float | list[float] = 0,
        timeout_seconds: float | None = None,
        cache: bool = False,
    ) -> DataStream:
        op = OperatorSpec(
            kind=kind,
            function=function,
            config=config,
            name=name or "",
            resources=resources,
            parallelism=parallelism,
            retries=retries,
            retry_delay_seconds=retry_delay_seconds,
            timeout_seconds=timeout_seconds,
            cache=cache,
        )
        return DataStream(self.env, self.env.plan.add(self.node_id, op))

    def map(self, function: Any, config: dict[str, Any] | None = None, **options: Any) -> DataStream:
        """One record in, one out (``MapFunction`` or a callable)."""
        return self._add("map", function, config, **options)

    def filter(self, function: Any, config: dict[str, Any] | None = None, **options: Any) -> DataStream:
        """Keep records for which the function returns true (``FilterFunction`` or a callable)."""
        return self._add("filter", function, config, **options)

    def flatmap(self, function: Any, config: dict[str, Any] | None = None, **options: Any) -> DataStream:
        """One record in, a list of records out (``FlatMapFunction`` or a callable)."""
        return self._add("flatmap", function, config, **options)

    def keyby(self, function: Any, config: dict[str, Any] | None = None, **options: Any) -> DataStream:
        """Regroup records so that all records with the same key reach the same partition downstream."""
        return self._add("keyby", function, config, **options)

    def sink(self, function: Any, config: dict[str, Any] | None = None, **options: Any) -> DataStream:
        """Write records out (``SinkFunction``, a built-in sink, or a callable taking one record)."""
        return self._add("sink", function, config, **options)

    def print(self, prefix: str = "") -> DataStream:
        """Print every record (a ``PrintSink``)."""
        from sage_prefect.data import PrintSink

        return self._add("sink", PrintSink, {"prefix": prefix} if prefix else None)
