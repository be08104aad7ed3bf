"""What every operator of the library shares: a validated config and a Prefect-task form.

An operator is a SAGE function class (``MapFunction``, ``FlatMapFunction``, ...) that
also derives from `Operator` and declares its config as a pydantic model named
``Config``. The config is checked when the operator is constructed, on the machine
where the pipeline is declared: an unknown key, a missing key or a value of the wrong
type raises `ConfigError` naming the operator and the key, long before a worker runs it.

The same instance runs in a pipeline (``stream.map(Embedder, {...})``) or as a plain
Prefect task in hand-written ``@flow`` code (``Embedder({...}).as_task()(rows)``).

>>> class Shout(Operator, MapFunction):
...     class Config(OperatorConfig):
...         suffix: str = "!"
...     def execute(self, data):
...         return {**data, "text": data["text"] + self.cfg.suffix}
>>> Shout({"suffix": "?"}).run([{"text": "hi"}])
[{'text': 'hi?'}]
>>> Shout({"sufix": "?"})
Traceback (most recent call last):
...
sage_prefect.common.errors.ConfigError: Shout: unknown config key 'sufix' (known: suffix)
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, ValidationError

from sage_prefect.common.errors import ConfigError, RecordError
from sage_prefect.common.functions import (
    BaseFunction,
    BatchFunction,
    FilterFunction,
    FlatMapFunction,
    MapFunction,
    SinkFunction,
    SourceFunction,
)
from sage_prefect.common.records import apply_function, records_to_table

if TYPE_CHECKING:
    from prefect import Task

__all__ = ["Operator", "OperatorConfig", "config_error"]


class OperatorConfig(BaseModel):
    """Base of operator configs: unknown keys are errors and values are not coerced
    (``"5"`` is not an int; an int is accepted where a float is expected)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def config_error(operator: str, exc: ValidationError, known: list[str]) -> ConfigError:
    """A `ConfigError` for the first problem pydantic found, naming the operator and the key."""
    first = exc.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        message = f"{operator}: unknown config key {key!r} (known: {', '.join(known) or 'none'})"
    elif first["type"] == "missing":
        message = f"{operator}: config key {key!r} is required"
    else:
        got = first.get("input")
        message = f"{operator}: config key {key!r}: {first['msg']} (got {type(got).__name__} {got!r})"
    return ConfigError(message, operator=operator, field=key)


class Operator(BaseFunction):
    """Mixin for library operators: ``Config`` validation, lazy ``setup()``, ``run()``, ``as_task()``.

    ``self.config`` stays the plain dict SAGE functions carry (it travels in plans and YAML);
    ``self.cfg`` is the validated ``Config`` instance the operator reads.
    """

    Config: ClassVar[type[OperatorConfig]] = OperatorConfig
    cfg: Any
    """The validated ``Config`` instance (typed ``Any`` here: each operator has its own model)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # The kernel calls setup() itself; mark the instance ready whichever way setup() ran,
        # so ensure_setup() never loads a model a second time.
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("setup")
        if own is not None and not getattr(own, "_marks_ready", False):

            @functools.wraps(own)
            def setup(self: Operator) -> None:
                own(self)
                self._ready = True

            setup._marks_ready = True  # type: ignore[attr-defined]
            cls.setup = setup  # type: ignore[method-assign]

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        try:
            self.cfg = self.Config.model_validate(self.config)
        except ValidationError as exc:
            raise config_error(self.name, exc, sorted(self.Config.model_fields)) from None
        self._ready = False
        self._setup_lock = threading.Lock()

    # Operators are shipped to Dask workers by pickling: the lock is rebuilt there, and a
    # set-up operator travels without its loaded resources (setup() runs again on arrival).
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_setup_lock", None)
        for key in self._runtime_attributes():
            state.pop(key, None)
        state["_ready"] = False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup_lock = threading.Lock()

    def _runtime_attributes(self) -> tuple[str, ...]:
        """Attributes ``setup()`` creates (clients, models, connections) that must not be pickled."""
        return ()

    def ensure_setup(self) -> None:
        """Call ``setup()`` once (thread-safe); the kernel calls ``setup()`` itself before first use."""
        if self._ready:
            return
        with self._setup_lock:
            if not self._ready:
                self.setup()
                self._ready = True

    def setup(self) -> None:
        self._ready = True

    # -- running outside a pipeline --------------------------------------------------------------
    def run(self, data: Any = None, partition_key: str | None = None) -> Any:
        """Run the operator on ``data`` outside a pipeline and return what a pipeline stage would.

        ``data`` is a ``pyarrow.Table``, a list of dict records or one record (map/filter/
        flatmap/sink); the result has the same shape (a Table for a Table, a list for a list).
        Sources take no data and return every record they produce as a list. A sink returns
        the rows written; ``partition_key`` (default: a hash of the rows) makes a repeated write
        of the same partition replace it instead of adding it again.
        """
        self.ensure_setup()
        where = f"operator {self.name!r}"
        if isinstance(self, SourceFunction):
            return _drain(self, where)
        single = isinstance(data, dict)
        as_table = isinstance(data, pa.Table | pa.RecordBatch)
        if single:
            table = records_to_table([data], where)
        elif as_table:
            table = data if isinstance(data, pa.Table) else pa.Table.from_batches([data])
        elif isinstance(data, list | tuple):
            table = records_to_table(list(data), where)
        else:
            raise RecordError(
                f"{where}: run() takes a pyarrow.Table, a list of dict records or one record, "
                f"got {type(data).__name__}"
            )
        if isinstance(self, SinkFunction):
            return self._run_sink(table, partition_key)
        out = apply_function(_kind(self), self, table, where)
        if as_table:
            return out
        rows = out.to_pylist()
        if single and isinstance(self, MapFunction):
            return rows[0]
        return rows

    def _run_sink(self, table: pa.Table, partition_key: str | None) -> int:
        writer: Callable[[pa.Table, str], Any] | None = getattr(self, "write_partition", None)
        if writer is not None:
            rows = writer(table, partition_key or content_key(table))
            finish = getattr(self, "finish", None)
            if callable(finish):
                finish()
            return int(rows) if rows is not None else table.num_rows
        for record in table.to_pylist():
            self.execute(record)  # type: ignore[attr-defined]
        return table.num_rows

    def as_task(self, **task_options: Any) -> Task[..., Any]:
        """This operator as a Prefect task: ``task(data)`` returns ``self.run(data)``.

        ``task_options`` go to ``prefect.task`` (``retries``, ``timeout_seconds``, ``tags``,
        ...). Results are not cached unless a ``cache_policy`` is given.

        >>> from sage_prefect.tasks import CharacterChunker
        >>> CharacterChunker({"size": 40}).as_task().name
        'CharacterChunker'
        """
        from prefect import task
        from prefect.cache_policies import NO_CACHE

        operator = self

        def run(data: Any = None, partition_key: str | None = None) -> Any:
            return operator.run(data, partition_key)

        run.__name__ = run.__qualname__ = self.name
        run.__doc__ = type(self).__doc__
        options: dict[str, Any] = {"name": self.name, "cache_policy": NO_CACHE}
        options.update(task_options)
        return task(run, **options)

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.config.items() if "key" not in k}
        return f"{self.name}({shown!r})"


def content_key(table: pa.Table) -> str:
    """A partition key derived from a table's content: the same rows give the same key anywhere."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return "rows-" + hashlib.blake2b(sink.getvalue().to_pybytes(), digest_size=12).hexdigest()


def _kind(op: BaseFunction) -> str:
    if isinstance(op, FilterFunction):
        return "filter"
    if isinstance(op, FlatMapFunction):
        return "flatmap"
    if isinstance(op, MapFunction):
        return "map"
    raise RecordError(f"operator {op.name!r}: {type(op).__name__} is not a map, filter, flatmap or sink")


def _drain(source: SourceFunction, where: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    while True:
        produced = source.execute()
        if produced is None:
            return rows
        if isinstance(produced, pa.Table):
            rows.extend(produced.to_pylist())
        elif isinstance(produced, list):
            rows.extend(produced)
        elif isinstance(produced, dict):
            rows.append(produced)
        else:
            kind = "batch source" if isinstance(source, BatchFunction) else "source"
            raise RecordError(f"{where}: {kind} returned {type(produced).__name__}, expected records")
