"""From a logical plan to a Prefect flow whose tasks run on a Dask task runner.

One Prefect task per operator, submitted once per partition with the upstream
partition's future as its input, so Dask runs partition i of stage k+1 as soon as
partition i of stage k is done (no barrier between stages). ``keyby`` is the one
barrier: its buckets gather every upstream partition.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import Flow, Task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.exceptions import UpstreamTaskError
from prefect.futures import PrefectFuture
from prefect.settings import PREFECT_API_URL, temporary_settings

from sage_prefect.common import errors
from sage_prefect.common.errors import OperatorError, PipelineRunError, SageError, WorkerLostError
from sage_prefect.common.records import concat
from sage_prefect.common.settings import SageSettings
from sage_prefect.dask_gpu import (
    annotate,
    dask_error,
    killed_key,
    lost_task,
    resolve_resources,
    worker_resources,
)
from sage_prefect.data import ArrowSerializer
from sage_prefect.kernel import tag_limits
from sage_prefect.kernel.plan import Node, Plan
from sage_prefect.kernel.runtime import (
    PartitionInfo,
    StageRuntime,
    construct,
    release_run,
    run_shuffle,
    run_stage,
)
from sage_prefect.kernel.source import content_key, iter_partitions

logger = logging.getLogger("sage_prefect.kernel")


@dataclass
class RunOptions:
    """Execution options of one pipeline run, fixed when the flow is built."""

    settings: SageSettings
    allow_cpu_fallback: bool
    progress: bool = False


@dataclass
class _Submitted:
    node: Node
    partition: PartitionInfo
    lineage: str
    future: PrefectFuture[Any]


@dataclass
class _RunState:
    plan: Plan
    options: RunOptions
    run_id: str
    tasks: dict[int, Task[..., Any]]
    stages: dict[int, StageRuntime]
    resources: dict[int, dict[str, float] | None]
    client: Any = None  # the task runner's Dask client
    submitted: list[_Submitted] = field(default_factory=list)
    barrier_inputs: dict[int, list[_Submitted]] = field(default_factory=dict)
    rows_in: int = 0
    partitions: int = 0
    submitted_after: float = 0.0


def build_flow(plan: Plan, options: RunOptions, task_runner: Any) -> Flow[[], dict[str, Any]]:
    """The Prefect flow that runs ``plan`` on ``task_runner`` (a `DaskTaskRunner`)."""
    plan.validate()
    tasks = {node.id: _make_task(node, options.settings) for node in plan.nodes if node.op is not None}
    shuffles = {
        node.id: Task(
            run_shuffle,
            name=f"{node.name}.shuffle",
            task_run_name=_escape(node.name) + ".shuffle[{bucket}]",
            tags=["sage", "sage:keyby"],
            cache_policy=NO_CACHE,
            persist_result=False,
        )
        for node in plan.nodes
        if node.op is not None and node.op.kind == "keyby"
    }

    def pipeline() -> dict[str, Any]:
        return _execute(plan, options, tasks, shuffles)

    pipeline.__name__ = pipeline.__qualname__ = plan.name.replace("-", "_")
    return Flow(
        pipeline,
        name=plan.name,
        task_runner=task_runner,
        validate_parameters=False,
        description=f"sage-prefect pipeline {plan.name!r}: " + " -> ".join(n.name for n in plan.nodes),
    )


def _make_task(node: Node, settings: SageSettings) -> Task[..., Any]:
    op = node.op
    assert op is not None
    labels = sorted(op.resources) if op.resources else ["CPU"]
    options: dict[str, Any] = {
        "name": op.name,
        "task_run_name": _escape(op.name) + "[p{partition.index}]",
        "tags": ["sage", f"sage:{op.kind}", *(f"resource:{label}" for label in labels)],
        "retries": op.retries,
        "retry_delay_seconds": op.retry_delay_seconds,
        "timeout_seconds": op.timeout_seconds,
    }
    if op.cache:
        digest = op.digest()
        options.update(
            cache_key_fn=lambda _ctx, params: f"sage-{digest}-{params['partition'].key}",
            persist_result=True,
            result_serializer=ArrowSerializer(),
            result_storage=settings.results_dir,
        )
    else:
        options.update(cache_policy=NO_CACHE, persist_result=False)
    return Task(run_stage, **options)


def _escape(name: str) -> str:
    return name.replace("{", "{{").replace("}", "}}")


@contextmanager
def pinned_api_url() -> Iterator[None]:
    """Make the API this flow talks to explicit in the settings shipped to Dask workers.

    In ephemeral mode each Dask *process* worker would otherwise start its own temporary
    Prefect server on the same SQLite file (``database is locked``); pinning the running
    server's URL makes every worker report to the flow's own API.
    """
    if PREFECT_API_URL.value():
        yield
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        url = str(client.api_url)
    if not url.startswith("http"):
        yield
        return
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


def _execute(
    plan: Plan, options: RunOptions, tasks: dict[int, Task[..., Any]], shuffles: dict[int, Task[..., Any]]
) -> dict[str, Any]:
    ctx = FlowRunContext.get()
    assert ctx is not None and ctx.flow_run is not None
    run_id = str(ctx.flow_run.id)
    client = ctx.task_runner.client  # type: ignore[attr-defined]
    started = time.perf_counter()
    available = worker_resources(client)
    resources = {
        n.id: resolve_resources(n.op.name, n.op.resources, available, options.allow_cpu_fallback)
        for n in plan.nodes
        if n.op is not None
    }
    spill_dir = str(Path(options.settings.stage_dir) / run_id)
    stages = {
        n.id: StageRuntime(
            run_id=run_id,
            node_id=n.id,
            op=n.op,
            spill_dir=spill_dir,
            spill_threshold_bytes=options.settings.spill_threshold_bytes,
            semaphore=_semaphore(run_id, n),
        )
        for n in plan.nodes
        if n.op is not None
    }
    state = _RunState(plan, options, run_id, tasks, stages, resources, client)
    drivers = _driver_instances(plan)
    try:
        for sink in drivers["sink"]:
            if callable(getattr(sink, "prepare", None)):
                sink.prepare()
        with pinned_api_url():
            _prime_tag_limits(client, [*tasks.values(), *shuffles.values()])
            _submit_all(state, shuffles)
            state.submitted_after = time.perf_counter() - started
            _wait(state)
        for sink in drivers["sink"]:
            if callable(getattr(sink, "finish", None)):
                sink.finish()
        return _summarise(state, time.perf_counter() - started)
    finally:
        try:
            client.run(release_run, run_id)
        except Exception:  # pragma: no cover - a worker that died already released its pool
            logger.debug("could not release operator pools on every worker", exc_info=True)
        shutil.rmtree(spill_dir, ignore_errors=True)


def _prime_tag_limits(client: Any, tasks: list[Task[..., Any]]) -> None:
    """On every worker, skip Prefect's per-task tag-limit write while no tag limit exists
    (see `sage_prefect.kernel.tag_limits`)."""
    from prefect.context import TagsContext

    extra = TagsContext.get().current_tags
    tag_sets = sorted({tuple(sorted(set(task.tags) | extra)) for task in tasks})
    try:
        client.run(tag_limits.prime, tag_sets, PREFECT_API_URL.value() or None)
    except Exception:  # pragma: no cover - priming is an optimisation; Prefect checks anyway
        logger.debug("could not prime the tag-limit cache on the workers", exc_info=True)


def _driver_instances(plan: Plan) -> dict[str, list[Any]]:
    """Construct every operator once on the driver: bad configs fail before any task runs,
    and sinks get their driver-side ``prepare()``/``finish()`` hooks."""
    out: dict[str, list[Any]] = {"sink": []}
    for node in plan.nodes:
        if node.op is None:
            continue
        try:
            instance = construct(node.op)
        except SageError:
            raise
        except Exception as exc:
            raise OperatorError(
                f"operator {node.name!r} ({node.op.kind}, stage {node.id}): construction failed: "
                f"{type(exc).__name__}: {exc}",
                operator=node.name,
                stage=node.id,
            ) from exc
        if node.op.kind == "sink":
            out["sink"].append(instance)
    return out


def _semaphore(run_id: str, node: Node) -> Any:
    op = node.op
    if op is None or op.parallelism is None or op.kind == "keyby":
        return None
    from distributed import Semaphore

    return Semaphore(max_leases=op.parallelism, name=f"sage-{run_id}-n{node.id}")


def _submit_all(state: _RunState, shuffles: dict[int, Task[..., Any]]) -> None:
    plan = state.plan
    assert plan.source is not None
    source_node = plan.nodes[0]
    try:
        for index, table in enumerate(iter_partitions(plan.source, state.options.settings.batch_size)):
            key = content_key(table, index)
            state.rows_in += table.num_rows
            state.partitions += 1
            _submit_children(state, source_node, table, PartitionInfo(index, key), key)
        # Barriers in plan order: a later barrier's inputs are complete once earlier ones are submitted.
        for node in plan.nodes:
            if node.op is None or node.op.kind != "keyby":
                continue
            inputs = state.barrier_inputs.pop(node.id, [])
            buckets = node.op.parallelism or max(1, len(inputs))
            lineage = _digest(*sorted(s.lineage for s in inputs))
            futures = [s.future for s in inputs]
            for bucket in range(buckets):
                part = PartitionInfo(bucket, f"k{bucket}of{buckets}-{lineage}")
                with annotate(state.resources[node.id]):
                    future = shuffles[node.id].submit(futures, bucket, buckets)
                state.submitted.append(_Submitted(node, part, part.key, future))
                _submit_children(state, node, future, part, part.key)
    except BaseException:
        for item in state.submitted:
            item.future.wrapped_future.cancel()  # type: ignore[attr-defined]
        raise


def _submit_children(state: _RunState, node: Node, data: Any, part: PartitionInfo, lineage: str) -> None:
    for child_id in node.children:
        child = state.plan.nodes[child_id]
        op = child.op
        assert op is not None
        child_lineage = _digest(lineage, op.digest())
        with annotate(state.resources[child_id]):
            future = state.tasks[child_id].submit(data, state.stages[child_id], part)
        submitted = _Submitted(child, part, child_lineage, future)
        state.submitted.append(submitted)
        if op.kind == "keyby":
            state.barrier_inputs.setdefault(child_id, []).append(submitted)
        else:
            _submit_children(state, child, future, part, child_lineage)


def _terminal(state: _RunState) -> list[_Submitted]:
    return [s for s in state.submitted if not s.node.children]


def _wait(state: _RunState) -> None:
    terminal = _terminal(state)
    futures = [s.future for s in terminal]
    if state.options.progress and futures:
        from prefect.futures import as_completed
        from rich.progress import Progress

        with Progress(transient=True) as progress:
            bar = progress.add_task(f"{state.plan.name}: partitions", total=len(futures))
            for _ in as_completed(futures):
                progress.advance(bar)
    else:
        for future in futures:
            future.wait()
    failure = _first_failure(state)
    if failure is not None:
        raise failure


def _first_failure(state: _RunState) -> BaseException | None:
    """The root cause of a failed run: the first failed task that did not just inherit a failure."""
    inherited: BaseException | None = None
    for item in state.submitted:
        outside = dask_error(item.future.wrapped_future)  # type: ignore[attr-defined]
        if outside is not None:
            return _dask_failure(state, item, outside)
        task_state = item.future.state
        if task_state.is_completed():
            continue
        if not task_state.is_final():
            item.future.wait()
            task_state = item.future.state
            if task_state.is_completed():
                continue
        exc = _exception_of(task_state)
        if isinstance(exc, UpstreamTaskError):
            inherited = inherited or exc
            continue
        where = {"operator": item.node.name, "partition": item.partition.index}
        if not isinstance(exc, SageError):
            detail = f"{type(exc).__name__}: {exc}"
            return OperatorError(f"operator {item.node.name!r}, {item.partition}: {detail}", **where)
        if not exc.message.startswith("operator "):
            kind = OperatorError if type(exc) is PipelineRunError else type(exc)
            return kind(
                f"operator {item.node.name!r}, {item.partition}: {exc.message}", **{**exc.where, **where}
            )
        return type(exc)(exc.message, **{**where, **exc.where})
    return inherited


def _dask_failure(state: _RunState, item: _Submitted, exc: BaseException) -> SageError:
    """The error of a task that Dask failed before Prefect could record an outcome.

    Prefect's task engine runs inside the Dask task and returns the task's final state, so
    a Dask future that *errs* failed outside it: its worker died until the scheduler gave
    up (`distributed.KilledWorker`; the task run is left Running in Prefect), the worker
    could not unpickle the task, or the task was cancelled. Such a future's Prefect state
    never becomes final, so it is read from Dask. Dependents err with their upstream's
    exception; a `KilledWorker` names the task that was lost, which is the one reported.
    Tasks that merely waited on a dying worker count its death too, so more than one task
    can be lost at once: the others are listed (``also_lost``), since Dask cannot tell
    which of them killed the workers.
    """
    lost = lost_task(state.client, exc) if state.client is not None else None
    if lost is None:
        where = state.stages[item.node.id].where
        return OperatorError(
            f"{where}, {item.partition}: Dask failed the task outside Prefect: {type(exc).__name__}: {exc}",
            operator=item.node.name,
            stage=item.node.id,
            partition=item.partition.index,
            partition_key=item.partition.key,
        )
    lost_items = [s for s in state.submitted if _own_killed_key(s) is not None]
    origin = next((s for s in lost_items if _key(s) == lost.key), item)
    where = state.stages[origin.node.id].where
    workers = ", ".join(lost.workers) or "unknown"
    others = [s for s in lost_items if s is not origin]
    also = "".join(
        f"; Dask gave up on {state.stages[s.node.id].where}, {s.partition} with it" for s in others
    )
    return WorkerLostError(
        f"{where}, {origin.partition}: lost {len(lost.workers)} Dask worker(s) while running it "
        f"({workers}); Dask gave up after distributed.scheduler.allowed-failures="
        f"{lost.allowed_failures} (KilledWorker){also}. What kills a worker on every attempt "
        "(running out of memory, a crash in native code, an operator module the workers cannot "
        "import) kills it again on a re-run: see the worker logs",
        operator=origin.node.name,
        stage=origin.node.id,
        partition=origin.partition.index,
        partition_key=origin.partition.key,
        workers=lost.workers,
        allowed_failures=lost.allowed_failures,
        also_lost=[(s.node.name, s.partition.index) for s in others],
    )


def _key(item: _Submitted) -> str:
    return str(item.future.wrapped_future.key)  # type: ignore[attr-defined]


def _own_killed_key(item: _Submitted) -> str | None:
    """The item's key if Dask gave up on *this* task (not on an upstream it depended on)."""
    key = killed_key(dask_error(item.future.wrapped_future))  # type: ignore[attr-defined]
    return key if key == _key(item) else None


_PREFIX = "Task run encountered an exception "


def _exception_of(task_state: Any) -> BaseException:
    """The exception a failed task raised.

    A state that crossed the Dask boundary keeps only its message
    ("Task run encountered an exception RecordError: ..."), so our own error types are
    rebuilt from it by name; anything else becomes a `PipelineRunError` with the message.
    """
    if not task_state.is_final():  # reading an unfinished run's result raises UnfinishedRun
        if task_state.name == "NotReady":
            return UpstreamTaskError(task_state.message or "an upstream task failed")
        return PipelineRunError(f"its task run ended in state {task_state.name or task_state.type.value}")
    exc = task_state.result(raise_on_failure=False)
    if isinstance(exc, SageError | UpstreamTaskError):
        return exc
    message = task_state.message or str(exc)
    if message.startswith(_PREFIX):
        type_name, _, detail = message[len(_PREFIX) :].partition(": ")
        cls = getattr(errors, type_name, None)
        if isinstance(cls, type) and issubclass(cls, SageError):
            return cls(detail)
        if type_name == "UpstreamTaskError":
            return UpstreamTaskError(detail)
        return PipelineRunError(f"{type_name}: {detail}")
    if "UpstreamTaskError" in message or task_state.name == "NotReady":
        return UpstreamTaskError(message)
    return exc if isinstance(exc, BaseException) else PipelineRunError(message)


def _summarise(state: _RunState, elapsed: float) -> dict[str, Any]:
    sink_nodes = [n for n in state.plan.nodes if n.op is not None and n.op.kind == "sink"]
    names = [n.name for n in sink_nodes]
    labels = {n.id: n.name if names.count(n.name) == 1 else f"{n.name}#{n.id}" for n in sink_nodes}
    sinks = dict.fromkeys(labels.values(), 0)
    collected: dict[int, list[tuple[int, pa.Table]]] = {}
    leaf_rows = 0
    for item in _terminal(state):
        value = item.future.result()
        if item.node.id in labels:
            sinks[labels[item.node.id]] += int(value["rows"])
            if "table" in value:
                collected.setdefault(item.node.id, []).append((item.partition.index, value["table"]))
        else:
            leaf_rows += value.num_rows if isinstance(value, pa.Table) else int(getattr(value, "num_rows", 0))
    tables = {
        node_id: concat([t for _, t in sorted(parts, key=lambda p: p[0])])
        for node_id, parts in collected.items()
    }
    return {
        "flow_run_id": state.run_id,
        "rows_in": state.rows_in,
        "partitions": state.partitions,
        "tasks": len(state.submitted),
        "sinks": sinks,
        "leaf_rows": leaf_rows,
        "collected": next(iter(tables.values())) if len(tables) == 1 else tables or None,
        "elapsed_seconds": elapsed,
        "submit_seconds": state.submitted_after,
    }


def _digest(*parts: str) -> str:
    return hashlib.blake2b("|".join(parts).encode(), digest_size=8).hexdigest()


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
