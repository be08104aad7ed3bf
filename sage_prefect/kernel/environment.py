"""Environments: where a pipeline is declared and how it is run.

``LocalEnvironment`` runs on a Dask cluster it starts itself (GPU-tagged workers for
the GPUs it sees, CPU workers for the rest, all on 127.0.0.1); ``DaskEnvironment``
runs on an existing Dask scheduler. Either way ``submit()`` is one Prefect flow run
and ``to_flow()`` hands out the ``prefect.Flow`` for deployments and composition.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from prefect import Flow
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from sage_prefect.common.errors import PipelineDefinitionError, PipelineRunError, SageError
from sage_prefect.common.functions import SourceFunction
from sage_prefect.common.settings import SageSettings, load_settings
from sage_prefect.kernel.compiler import RunOptions, build_flow, stderr_is_tty
from sage_prefect.kernel.datastream import DataStream
from sage_prefect.kernel.plan import Plan, SourceSpec


@dataclass
class PipelineResult:
    """What one run did: rows in, partitions, rows per sink, collected rows, the flow run id.

    >>> result = PipelineResult(flow_run_id="x", state="Completed", rows_in=3, partitions=1)
    >>> result.rows
    0
    """

    flow_run_id: str
    state: str
    rows_in: int
    partitions: int
    sinks: dict[str, int] = field(default_factory=dict)
    collected: pa.Table | dict[int, pa.Table] | None = None
    tasks: int = 0
    elapsed_seconds: float = 0.0

    @property
    def rows(self) -> int:
        """Rows written by all sinks together."""
        return sum(self.sinks.values())

    def to_pylist(self) -> list[dict[str, Any]]:
        """The rows a ``CollectSink`` gathered, in partition order."""
        if isinstance(self.collected, pa.Table):
            return self.collected.to_pylist()
        if self.collected is None:
            raise PipelineDefinitionError("this pipeline has no CollectSink; nothing was collected")
        raise PipelineDefinitionError(
            "this pipeline has several CollectSinks; read result.collected[node_id]"
        )


class BaseEnvironment:
    """Declares a pipeline (SAGE API) and runs it as a Prefect flow on Dask.

    >>> env = LocalEnvironment("demo", batch_size=2)
    >>> _ = env.from_batch([{"id": 1}, {"id": 2}]).map(lambda r: r).print()
    >>> len(env.plan.nodes)
    3
    """

    def __init__(
        self,
        name: str = "sage-pipeline",
        config: dict[str, Any] | None = None,
        *,
        settings: SageSettings | None = None,
        batch_size: int | None = None,
        allow_cpu_fallback: bool | None = None,
        progress: bool | None = None,
    ) -> None:
        if not isinstance(name, str) or not name.strip():
            raise PipelineDefinitionError(f"environment name must be a non-empty string, got {name!r}")
        self.name = name
        self.config = dict(config or {})
        self.settings = settings or load_settings()
        if batch_size is not None:
            self.settings = self.settings.model_copy(
                update={"batch_size": _positive(batch_size, "batch_size")}
            )
        self._allow_cpu_fallback = allow_cpu_fallback
        self.progress = stderr_is_tty() if progress is None else progress
        self.plan = Plan(name)

    # -- sources ---------------------------------------------------------------------------------
    def from_batch(
        self, source: Any, config: dict[str, Any] | None = None, *, allow_empty: bool = False
    ) -> DataStream:
        """A finite source: a list/iterable of dicts, a pyarrow Table, a pandas DataFrame, or a
        ``BatchFunction``/``SourceFunction`` class with its config dict."""
        if isinstance(source, type):
            return self.from_source(source, config, allow_empty=allow_empty)
        if config is not None:
            raise PipelineDefinitionError("from_batch: a config dict goes with a source function class only")
        name = "from_batch(" + type(source).__name__ + ")"
        return self._source(SourceSpec(kind="batch", data=source, name=name, allow_empty=allow_empty))

    def from_collection(self, collection: Iterable[Any], *, allow_empty: bool = False) -> DataStream:
        """Records from any iterable of dicts."""
        return self._source(
            SourceSpec(kind="collection", data=collection, name="from_collection", allow_empty=allow_empty)
        )

    def from_source(
        self,
        function: type[SourceFunction],
        config: dict[str, Any] | None = None,
        *,
        allow_empty: bool = False,
    ) -> DataStream:
        """Records from a ``SourceFunction``/``BatchFunction`` class: ``execute()`` until it returns None."""
        if not (isinstance(function, type) and issubclass(function, SourceFunction)):
            raise PipelineDefinitionError(
                f"from_source expects a SourceFunction or BatchFunction subclass, got {function!r}"
            )
        spec = SourceSpec(
            kind="source", function=function, config=config, name=function.__name__, allow_empty=allow_empty
        )
        return self._source(spec)

    def _source(self, spec: SourceSpec) -> DataStream:
        return DataStream(self, self.plan.set_source(spec))

    # -- running ---------------------------------------------------------------------------------
    @property
    def allow_cpu_fallback(self) -> bool:
        if self._allow_cpu_fallback is not None:
            return self._allow_cpu_fallback
        if self.settings.allow_cpu_fallback is not None:
            return self.settings.allow_cpu_fallback
        return self._default_cpu_fallback

    _default_cpu_fallback = False

    def _options(self) -> RunOptions:
        return RunOptions(
            settings=self.settings, allow_cpu_fallback=self.allow_cpu_fallback, progress=self.progress
        )

    def _task_runner(self, *, for_submit: bool) -> Any:
        raise NotImplementedError

    def to_flow(self) -> Flow[[], dict[str, Any]]:
        """The pipeline as a ``prefect.Flow``: call it, deploy it, or call it from another ``@flow``."""
        return build_flow(self.plan, self._options(), self._task_runner(for_submit=False))

    def submit(self, autostop: bool = False) -> PipelineResult:
        """Run the pipeline as one Prefect flow run and wait for it.

        Raises the error of the first failed operator (an `OperatorError` naming the
        operator and partition -- a `WorkerLostError`, also naming the lost workers, when
        the Dask workers running a partition kept dying -- or another `SageError`);
        ``autostop`` shuts the environment's cluster down afterwards.
        """
        flow = build_flow(self.plan, self._options(), self._task_runner(for_submit=True))
        try:
            with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
                state = flow(return_state=True)
            flow_run_id = str(state.state_details.flow_run_id)
            try:
                summary = state.result(raise_on_failure=True)
            except SageError as exc:
                exc.flow_run_id = flow_run_id  # type: ignore[attr-defined]
                raise
            except Exception as exc:
                raise PipelineRunError(
                    f"pipeline {self.name!r} (flow run {flow_run_id}) failed: {type(exc).__name__}: {exc}",
                    flow_run_id=flow_run_id,
                ) from exc
            assert isinstance(summary, dict)
            return PipelineResult(
                flow_run_id=flow_run_id,
                state=state.name or state.type.value,
                rows_in=summary["rows_in"],
                partitions=summary["partitions"],
                sinks=summary["sinks"],
                collected=summary["collected"],
                tasks=summary["tasks"],
                elapsed_seconds=summary["elapsed_seconds"],
            )
        finally:
            if autostop:
                self.close()

    def close(self) -> None:
        """Release what the environment started (a local cluster)."""

    def __enter__(self) -> BaseEnvironment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalEnvironment(BaseEnvironment):
    """Runs pipelines on a Dask cluster it starts on this machine (bound to 127.0.0.1).

    GPU-tagged workers, one per detected GPU, and CPU workers for the remaining cores;
    override with ``n_gpu_workers`` / ``n_cpu_workers`` / ``threads_per_worker`` /
    ``processes``. Operators that ask for a label no worker has run on CPU workers
    with a warning (``allow_cpu_fallback`` defaults to on here, for laptops).

    >>> env = LocalEnvironment("demo", n_cpu_workers=1, processes=False)
    >>> env.allow_cpu_fallback
    True
    """

    _default_cpu_fallback = True

    def __init__(
        self,
        name: str = "sage-pipeline",
        config: dict[str, Any] | None = None,
        *,
        n_gpu_workers: int | None = None,
        n_cpu_workers: int | None = None,
        threads_per_worker: int | None = None,
        processes: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, config, **kwargs)
        overrides = {
            key: value
            for key, value in {
                "n_gpu_workers": n_gpu_workers,
                "n_cpu_workers": n_cpu_workers,
                "threads_per_worker": threads_per_worker,
                "processes": processes,
            }.items()
            if value is not None
        }
        if overrides:
            self.settings = SageSettings.model_validate({**self.settings.model_dump(), **overrides})
        self._cluster: Any = None

    def _cluster_kwargs(self) -> dict[str, Any]:
        s = self.settings
        return {
            "n_gpu_workers": s.n_gpu_workers,
            "n_cpu_workers": s.n_cpu_workers,
            "threads_per_worker": s.threads_per_worker,
            "processes": s.processes,
            "host": s.host,
            # Process workers can import what this process can (operators next to a pipeline file,
            # test modules): the same module search path, passed through the environment.
            "env": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        }

    @property
    def cluster(self) -> Any:
        """The environment's Dask cluster, started on first use."""
        if self._cluster is None:
            from sage_prefect.dask_gpu import local_cluster

            self._cluster = local_cluster(**self._cluster_kwargs())
        return self._cluster

    def _task_runner(self, *, for_submit: bool) -> Any:
        from prefect_dask import DaskTaskRunner

        if for_submit or self._cluster is not None:
            return DaskTaskRunner(address=self.cluster.scheduler_address)
        # A flow handed out for deployment starts (and stops) its own cluster per run.
        return DaskTaskRunner(
            cluster_class="sage_prefect.dask_gpu.local_cluster", cluster_kwargs=self._cluster_kwargs()
        )

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None


class DaskEnvironment(BaseEnvironment):
    """Runs pipelines on an existing Dask scheduler (the scale-out path).

    Start one with ``sage-prefect cluster up``, dask-jobqueue, dask-kubernetes or
    Coiled; GPU workers must carry the ``GPU`` resource label. An operator asking for
    a label no worker carries fails the run at once unless ``allow_cpu_fallback=True``.

    >>> env = DaskEnvironment("scale-out", address="tcp://127.0.0.1:8786")
    >>> env.allow_cpu_fallback
    False
    """

    def __init__(
        self,
        name: str = "sage-pipeline",
        config: dict[str, Any] | None = None,
        *,
        address: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, config, **kwargs)
        address = address or self.settings.dask_address
        if not address:
            raise PipelineDefinitionError(
                "DaskEnvironment needs a scheduler address: address='tcp://host:8786' or SAGE_DASK_ADDRESS"
            )
        self.address = address

    def _task_runner(self, *, for_submit: bool) -> Any:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=self.address)


def _positive(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PipelineDefinitionError(f"{name} must be a positive integer, got {value!r}", field=name)
    return value


def environment_from_settings(
    name: str, settings: SageSettings | None = None, **kwargs: Any
) -> BaseEnvironment:
    """A `DaskEnvironment` on ``SAGE_DASK_ADDRESS`` when it is set, else a `LocalEnvironment`.

    What flows and deployments use, so a job variable decides where a run computes.

    >>> environment_from_settings("doc", SageSettings(dask_address=None)).__class__.__name__
    'LocalEnvironment'
    """
    settings = settings or load_settings()
    if settings.dask_address:
        return DaskEnvironment(name, settings=settings, address=settings.dask_address, **kwargs)
    return LocalEnvironment(name, settings=settings, **kwargs)
