"""What runs on a Dask worker: one operator applied to one partition.

Operator instances are pooled per worker process and per plan node, so ``setup()``
(model loading) runs once per instance, not once per partition; a pool hands an
instance to one thread at a time.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from sage_prefect.common.errors import OperatorError, SageError
from sage_prefect.common.functions import BaseFunction
from sage_prefect.common.records import aligned, apply_function, check_record, concat
from sage_prefect.data import StageHandle, maybe_spill, resolve
from sage_prefect.kernel import tag_limits
from sage_prefect.kernel.plan import OperatorSpec

KEY_COLUMN = "_sage_key_hash"


@dataclass(frozen=True)
class PartitionInfo:
    """Identity of one partition: its position in its stream and a key stable across re-runs."""

    index: int
    key: str

    def __str__(self) -> str:
        return f"partition {self.index} ({self.key})"


@dataclass(frozen=True)
class StageRuntime:
    """Everything a worker needs to run one plan node: shipped with each task."""

    run_id: str
    node_id: int
    op: OperatorSpec
    spill_dir: str
    spill_threshold_bytes: int
    semaphore: Any = None  # distributed.Semaphore bounding the operator's parallelism

    @property
    def where(self) -> str:
        return f"operator {self.op.name!r} ({self.op.kind}, stage {self.node_id})"


class _CallableFunction(BaseFunction):
    """Adapter that lets a plain callable (or lambda) stand in for a SAGE function."""

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def execute(self, *args: Any) -> Any:
        return self.fn(*args)


_pools: dict[tuple[str, int], list[BaseFunction]] = defaultdict(list)
_pools_lock = threading.Lock()


def construct(op: OperatorSpec) -> BaseFunction:
    """Build the operator instance without ``setup()``: validates its config, loads nothing heavy."""
    fn = op.function
    if isinstance(fn, type):
        return fn(op.config) if op.config is not None else fn()
    if isinstance(fn, BaseFunction):
        return copy.deepcopy(fn)
    return _CallableFunction(fn)


def instantiate(op: OperatorSpec) -> BaseFunction:
    instance = construct(op)
    instance.setup()
    return instance


@contextmanager
def checkout(stage: StageRuntime) -> Iterator[BaseFunction]:
    """Borrow a set-up operator instance from this process's pool (creating one if none is free)."""
    key = (stage.run_id, stage.node_id)
    with _pools_lock:
        pool = _pools[key]
        instance = pool.pop() if pool else None
    if instance is None:
        instance = instantiate(stage.op)
    try:
        yield instance
    finally:
        with _pools_lock:
            _pools[key].append(instance)


def release_run(run_id: str) -> None:
    """Drop the pooled instances of a finished run (called on every worker at the end of a run)."""
    with _pools_lock:
        for key in [k for k in _pools if k[0] == run_id]:
            del _pools[key]


def apply(kind: str, fn: Any, table: pa.Table, where: str) -> pa.Table:
    """Apply one operator to a partition; prefers a vectorised ``execute_batch``."""
    if kind == "keyby" and not callable(getattr(fn, "execute_batch", None)):
        hashes = [stable_hash(fn.execute(r)) for r in table.to_pylist()]
        return table.append_column(KEY_COLUMN, pa.array(hashes, type=pa.uint64()))
    return apply_function(kind, fn, table, where)


def stable_hash(key: Any) -> int:
    """A hash of a key that is the same in every process (Python's ``hash`` of str is not)."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little")


def write_sink(fn: Any, table: pa.Table, partition: PartitionInfo, where: str) -> Any:
    """Hand a partition to a sink: whole-partition writers get the stable key, others each record."""
    writer = getattr(fn, "write_partition", None)
    if callable(writer):
        rows = writer(table, partition.key)
        if getattr(fn, "collects", False):
            return {"rows": table.num_rows, "table": table}
        return {"rows": int(rows) if rows is not None else table.num_rows}
    for i, record in enumerate(table.to_pylist()):
        fn.execute(check_record(record, where, i))
    return {"rows": table.num_rows}


def run_stage(data: pa.Table | StageHandle, stage: StageRuntime, partition: PartitionInfo) -> Any:
    """The body of every operator task: resolve input, apply the operator, spill large output."""
    where = f"{stage.where}, {partition}"
    table = aligned(resolve(data))
    sem = stage.semaphore
    if sem is not None:
        sem.acquire()
    try:
        with checkout(stage) as fn:
            try:
                if stage.op.kind == "sink":
                    return write_sink(fn, table, partition, where)
                out = apply(stage.op.kind, fn, table, where)
            except SageError as exc:
                if "operator" in exc.where:
                    raise
                raise type(exc)(
                    exc.message if exc.message.startswith(stage.where) else f"{where}: {exc.message}",
                    **{**exc.where, "operator": stage.op.name, "partition": partition.index},
                ) from None
            except Exception as exc:
                raise OperatorError(
                    f"{where} ({table.num_rows} rows) failed: {type(exc).__name__}: {exc}",
                    operator=stage.op.name,
                    stage=stage.node_id,
                    partition=partition.index,
                    partition_key=partition.key,
                ) from exc
    finally:
        if sem is not None:
            sem.release()
    _refresh_tag_limits()
    if stage.op.cache:
        return out  # cached results are persisted as Arrow IPC; spilled data would not outlive the run
    return maybe_spill(out, stage.spill_threshold_bytes, stage.spill_dir, f"n{stage.node_id}-{partition.key}")


def _refresh_tag_limits() -> None:
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    if ctx is not None:
        tag_limits.refresh(ctx.task_run.tags)


def run_shuffle(inputs: list[pa.Table | StageHandle], bucket: int, buckets: int) -> pa.Table:
    """Gather the rows of one key bucket from every upstream partition (the keyby barrier)."""
    parts = []
    for item in inputs:
        table = aligned(resolve(item))
        if table.num_rows == 0 or KEY_COLUMN not in table.column_names:
            continue
        keys = table[KEY_COLUMN].to_numpy()
        mask = pa.array(keys % buckets == bucket)
        parts.append(table.filter(mask).drop_columns([KEY_COLUMN]))
    return concat(parts) if parts else pa.table({})
