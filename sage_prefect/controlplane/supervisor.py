"""Replicas of placed models (those with ``resources``) on a Dask cluster: the gateway's side.

The `Supervisor` connects the gateway to the cluster named in ``cluster:`` (or starts a
labelled local one) and runs each replica as one Dask task, `replicas.run_replica`, submitted
with the model's resource labels. Dask places it; the task starts the replica's server on
its worker and holds the labels while the server lives (see `replicas` for why a
long-running task: not an actor, not a nanny plugin). The supervisor

* checks first that some worker carries the model's labels and memory, and fails at once
  naming the model and what is missing (``cluster.wait_for_workers_s`` waits for one to join
  instead: an adaptive cluster adds workers for pending tasks);
* narrows each submission to the workers whose labels are free now. Dask's scheduler places
  a task by a worker's *total* resources, so a second GPU replica could otherwise be sent to
  the worker whose GPU the first one holds and wait there forever; the restriction is loose,
  so when no listed worker is left (or none is free) Dask still places it on any worker with
  the labels, where it waits for them, visible to ``cluster.adapt`` as pending work;
* learns each replica's address from the ``ready`` event the task publishes, and tells the
  control plane (`ReplicaListener`), which routes to it through the ``openai`` upstream
  engines;
* restarts: a worker that dies takes its task with it and Dask runs the task again on another
  worker with the labels (the new run publishes ``starting`` then ``ready`` at its new
  address); a server that exits, never answers, or whose task Dask gave up on
  (``KilledWorker``) is submitted again after a backoff (doubling, at most 30 s); a replica
  that fails to start three times in a row without ever serving is given up
  (`ReplicaListener.replica_start_failed`);
* stops a replica by releasing its task (the task stops its server and returns).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sage_prefect.common import ResourceUnavailableError
from sage_prefect.controlplane.config import ControlPlaneConfig, ModelConfig
from sage_prefect.controlplane.replicas import PYTHON, TOPIC, ReplicaSpec, run_replica

logger = logging.getLogger("sage_prefect.controlplane")

#: Start failures in a row (without ever serving) before a replica is given up.
MAX_START_FAILURES = 3
MAX_BACKOFF_S = 30.0


class ReplicaListener(Protocol):
    """What the supervisor tells the control plane (all calls on the gateway's event loop)."""

    def replica_ready(self, info: ReplicaInfo) -> None: ...
    def replica_down(self, info: ReplicaInfo, reason: str) -> None: ...
    def replica_start_failed(self, info: ReplicaInfo, reason: str) -> None: ...
    def replica_removed(self, info: ReplicaInfo) -> None: ...


@dataclass
class ReplicaInfo:
    """One supervised replica, as ``/health`` shows it."""

    id: str
    model: ModelConfig
    api_key: str | None
    state: str = "pending"  # pending | starting | ready | restarting | stopping | stopped | failed
    worker: str | None = None
    worker_name: str | None = None
    url: str | None = None
    log: str | None = None
    restarts: int = 0
    last_error: str | None = None
    since: float = field(default_factory=time.time)
    key: str | None = None
    served: bool = False  # has been ready at least once
    run_served: bool = False  # the current Dask task has been ready
    stopping: bool = False
    future: Any = None
    task: asyncio.Task[None] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def public(self) -> dict[str, Any]:
        return {
            "model": self.model.name,
            "state": self.state,
            "worker": self.worker,
            "worker_name": self.worker_name,
            "url": self.url,
            "restarts": self.restarts,
            "log": self.log,
            "last_error": self.last_error,
            "since": self.since,
        }


def replica_spec(
    config: ControlPlaneConfig, model: ModelConfig, replica: str, api_key: str | None
) -> ReplicaSpec:
    """How a worker runs one replica of ``model``: its ``command``, or the project's own engine
    server (``python -m sage_prefect.controlplane.server``) with a one-model config."""
    env = dict(model.env)
    cpus = (model.resources or {}).get("CPU")
    if cpus and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, int(cpus)))  # torch's threads = the cores it holds
    if model.engine == "command":
        assert model.command is not None
        return ReplicaSpec(
            replica=replica,
            model=model.name,
            command=list(model.command),
            ready_path=model.ready_path,
            ready_timeout_s=model.ready_timeout_s,
            env=env,
            api_key=api_key,
            resources=dict(model.resources or {}),
        )
    # The engine server is this project's gateway serving one model, with no admission control
    # of its own (the outer gateway schedules) and a key made for this replica.
    assert api_key is not None
    env["SAGE_CONTROLPLANE_API_KEYS"] = api_key
    inner_model = model.model_dump(
        mode="json", include={"name", "kind", "engine", "device", "slots", "params"}
    )
    inner = {
        "policy": "fifo",
        "default_class": "replica",
        "classes": {
            "replica": {"max_queue": 1_000_000, "max_queued_tokens": 10**12, "reject_when_late": False}
        },
        "batching": config.batching.model_dump(mode="json"),
        "limits": config.limits.model_dump(mode="json"),
        "models": [{**inner_model, "replicas": 1}],
        "max_attempts": 1,
    }
    command = [PYTHON, "-m", "sage_prefect.controlplane.server", "--config", "{config}"]
    return ReplicaSpec(
        replica=replica,
        model=model.name,
        command=command,
        ready_path=model.ready_path,
        ready_timeout_s=model.ready_timeout_s,
        env=env,
        api_key=api_key,
        config=inner,
        resources=dict(model.resources or {}),
    )


def _describe_workers(workers: Mapping[str, Mapping[str, Any]]) -> str:
    if not workers:
        return "the cluster has no workers"
    parts = []
    for info in sorted(workers.values(), key=lambda w: str(w.get("name"))):
        labels = ", ".join(f"{k}={v:g}" for k, v in sorted((info.get("resources") or {}).items()))
        limit = info.get("memory_limit") or 0
        memory = f"memory {limit / 1e9:.1f} GB" if limit else "no memory limit"
        parts.append(f"{info.get('name')} ({labels or 'no labels'}; {memory})")
    return "workers: " + "; ".join(parts)


def fits(model: ModelConfig, info: Mapping[str, Any]) -> bool:
    """Whether a worker (the scheduler's ``identity`` entry) carries ``model``'s labels and memory."""
    labels = info.get("resources") or {}
    if any(float(labels.get(k, 0.0)) < v for k, v in (model.resources or {}).items()):
        return False
    limit = info.get("memory_limit") or 0  # 0 or None: no limit
    return not (model.memory_gb and limit and limit < model.memory_gb * 1e9)


def unsatisfiable(model: ModelConfig, workers: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Why no worker can host ``model`` (None when one can)."""
    if any(fits(model, info) for info in workers.values()):
        return None
    wanted = model.resources or {}
    asked = ", ".join(f"{k}={v:g}" for k, v in wanted.items())
    missing = [
        k
        for k, v in wanted.items()
        if not any(float((i.get("resources") or {}).get(k, 0.0)) >= v for i in workers.values())
    ]
    labelled = [i for i in workers.values() if fits(model.model_copy(update={"memory_gb": None}), i)]
    if missing:
        problem = "no worker carries " + ", ".join(f"{k}>={wanted[k]:g}" for k in missing)
    elif labelled:  # the labels are there together: the memory is not
        problem = f"no worker with those labels has {model.memory_gb:g} GB of memory (memory_gb)"
    else:
        problem = "no single worker carries all of them together"
    return f"model {model.name!r} asks for resources {{{asked}}}, but {problem}; {_describe_workers(workers)}"


def _available_resources(dask_worker: Any) -> dict[str, float]:
    """Run on each worker (``client.run``): the labels no running task holds now."""
    return dict(dask_worker.state.available_resources)


class Supervisor:
    """Placed replicas of one gateway: see the module docstring."""

    def __init__(self, config: ControlPlaneConfig, listener: ReplicaListener) -> None:
        assert config.cluster is not None
        self.config = config
        self.cluster_config = config.cluster
        self.listener = listener
        self.replicas: dict[str, ReplicaInfo] = {}
        self.client: Any = None
        self.cluster: Any = None  # the local cluster, when this gateway started one
        self.address: str | None = None  # the Dask scheduler's
        self._numbers: dict[str, int] = {}

    # ---- connection ------------------------------------------------------------------

    async def start(self, models: list[ModelConfig]) -> None:
        """Connect (or start the local cluster) and check every placed model can be hosted."""
        from distributed import Client

        cfg = self.cluster_config
        if cfg.local:
            from sage_prefect.dask_gpu import WorkerSpec, local_cluster

            extra = [WorkerSpec(**w) for w in cfg.workers]
            self.cluster = await asyncio.to_thread(
                local_cluster,
                n_gpu_workers=cfg.n_gpu_workers,
                n_cpu_workers=cfg.n_cpu_workers,
                threads_per_worker=cfg.threads_per_worker,
                host=cfg.host,
                extra_workers=extra,
            )
            address = self.cluster.scheduler_address
        else:
            address = cfg.address
        self.address = str(address)
        self.client = await Client(address, asynchronous=True, name="sage-controlplane")
        self.client.subscribe_topic(TOPIC, self._on_event)
        self.client.subscribe_topic("all", self._on_scheduler_event)
        try:
            await self._check(models)
        except BaseException:
            await self.close()
            raise

    async def _workers(self) -> dict[str, dict[str, Any]]:
        identity = await self.client.scheduler.identity(n_workers=-1)
        return dict(identity.get("workers", {}))

    async def _check(self, models: list[ModelConfig]) -> None:
        deadline = time.monotonic() + self.cluster_config.wait_for_workers_s
        while True:
            workers = await self._workers()
            problems = [p for m in models if (p := unsatisfiable(m, workers))]
            if not problems:
                return
            if time.monotonic() >= deadline:
                model = next(m for m in models if unsatisfiable(m, workers))
                labels = tuple(model.resources or {})
                raise ResourceUnavailableError(
                    "; ".join(problems),
                    operator=model.name,
                    label=labels[0] if labels else None,
                    labels=labels,
                )
            await asyncio.sleep(1.0)

    async def close(self) -> None:
        """Stop every replica (their tasks are released) and disconnect."""
        infos = list(self.replicas.values())
        for info in infos:
            info.stopping = True
        futures = [i.future for i in infos if i.future is not None]
        if self.client is not None and futures:
            try:
                await self.client.cancel(futures)
            except Exception:  # pragma: no cover - the scheduler may be gone already
                logger.debug("cancelling replica tasks failed", exc_info=True)
        for info in infos:
            if info.task is not None:
                info.task.cancel()
        # the tasks stop their servers (SIGTERM, then SIGKILL after 10 s) and say so
        stopping = [i for i in infos if i.state in ("ready", "starting", "restarting")]
        deadline = time.monotonic() + 12
        while stopping and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            stopping = [i for i in stopping if i.state != "stopped"]
        if self.client is not None:
            await self.client.close()
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.close)

    # ---- replicas --------------------------------------------------------------------

    def add(self, model: ModelConfig) -> ReplicaInfo:
        """Start one more replica of ``model`` (returns at once; `ReplicaInfo.ready` is set when it
        serves, and the listener hears of it)."""
        number = self._numbers.get(model.name, 0)
        self._numbers[model.name] = number + 1
        replica = f"{model.name}#{number}"
        api_key = (
            str(model.params.get("api_key"))
            if model.engine == "command" and model.params.get("api_key")
            else None
        )
        if model.engine != "command":
            api_key = "sk-replica-" + secrets.token_urlsafe(24)
        info = ReplicaInfo(replica, model, api_key)
        self.replicas[replica] = info
        info.task = asyncio.create_task(self._lifecycle(info), name=f"replica {replica}")
        return info

    async def stop(self, replica: str) -> None:
        """Stop a replica for good (scale-down): release its task; its server is stopped."""
        info = self.replicas.get(replica)
        if info is None:
            return
        info.stopping = True
        info.state = "stopping"
        if info.future is not None:
            try:
                await self.client.cancel([info.future])
            except Exception:  # the scheduler is gone: the task is released with it
                logger.warning("cancelling replica %s's task failed", replica, exc_info=True)
        if info.task is not None:
            info.task.cancel()
        self.replicas.pop(replica, None)
        self.listener.replica_removed(info)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {rid: info.public() for rid, info in self.replicas.items()}

    async def _candidates(self, model: ModelConfig) -> list[str]:
        """Workers that carry the model's labels and memory with the labels free now."""
        workers = await self._workers()
        fitting = [addr for addr, info in workers.items() if fits(model, info)]
        if not fitting:
            return []
        try:
            available = await self.client.run(_available_resources, workers=fitting, on_error="return")
        except Exception:  # a worker went away meanwhile: let Dask choose among all
            logger.debug("reading free resources failed", exc_info=True)
            return []
        placed_gb: dict[str, float] = {}
        for info in self.replicas.values():
            if info.worker and info.state in ("starting", "ready") and info.model.memory_gb:
                placed_gb[info.worker] = placed_gb.get(info.worker, 0.0) + info.model.memory_gb
        free: list[str] = []
        for addr in fitting:
            labels = available.get(addr)
            if not isinstance(labels, dict):
                continue
            if any(float(labels.get(k, 0.0)) < v for k, v in (model.resources or {}).items()):
                continue
            limit = workers[addr].get("memory_limit") or 0
            if model.memory_gb and limit and placed_gb.get(addr, 0.0) + model.memory_gb > limit / 1e9:
                continue
            free.append(addr)
        return free

    async def _lifecycle(self, info: ReplicaInfo) -> None:
        model = self.config.models[[m.name for m in self.config.models].index(info.model.name)]
        spec = replica_spec(self.config, model, info.id, info.api_key)
        failures = 0
        while not info.stopping:
            info.key = f"sage-replica-{uuid.uuid4().hex[:12]}-{info.id}"
            info.state = "pending" if not info.served else "restarting"
            info.run_served = False
            try:
                workers = await self._candidates(model)
                info.future = self.client.submit(
                    run_replica,
                    spec,
                    key=info.key,
                    resources=dict(model.resources or {}),
                    workers=workers or None,
                    allow_other_workers=bool(workers),
                    pure=False,
                )
                error = await self._run(info, model)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the scheduler went away meanwhile: try again after a backoff
                error = exc
            if info.stopping:
                break
            if error is None and info.state == "pending":  # never placed: given up (see `_run`)
                reason = (
                    f"no worker with {_labels(model)} free took it within ready_timeout_s "
                    f"({model.ready_timeout_s:g} s)"
                )
                info.state = "failed"
                info.last_error = reason
                self.replicas.pop(info.id, None)
                self.listener.replica_start_failed(info, reason)
                return
            reason = _short(error) if error is not None else "the replica's task returned"
            logger.warning("replica %s failed (%s); starting it again", info.id, reason)
            self._mark_down(info, reason)
            failures = 0 if info.run_served else failures + 1
            if not info.served and failures >= MAX_START_FAILURES:
                info.state = "failed"
                self.replicas.pop(info.id, None)
                self.listener.replica_start_failed(info, reason)
                return
            backoff = min(MAX_BACKOFF_S, self.cluster_config.restart_backoff_s * 2 ** max(0, failures - 1))
            await asyncio.sleep(backoff)

    async def _run(self, info: ReplicaInfo, model: ModelConfig) -> BaseException | None:
        """Wait for the replica's task to end. A first start that Dask has not begun within
        ``ready_timeout_s`` (no worker had the labels free: it is unrunnable, or waits on a busy
        worker) is cancelled and returns None with the state still ``pending``; a restart keeps
        waiting (the replica was serving: its labels will come back)."""
        waiter = asyncio.ensure_future(_outcome(info.future))
        try:
            done, _ = await asyncio.wait({waiter}, timeout=model.ready_timeout_s)
            if not done and info.state == "pending" and not info.served:
                await self.client.cancel([info.future])
                return None
            return await waiter
        finally:
            waiter.cancel()

    def _mark_down(self, info: ReplicaInfo, reason: str) -> None:
        """A serving replica stopped serving: the control plane stops routing to it."""
        info.last_error = reason
        if info.state == "ready":
            info.state = "restarting"
            self.listener.replica_down(info, reason)

    # ---- events from the cluster -----------------------------------------------------

    def _on_event(self, event: tuple[float, Any]) -> None:
        _, msg = event
        if not isinstance(msg, dict):
            return
        info = self.replicas.get(str(msg.get("replica")))
        if info is None or msg.get("key") != info.key:
            return  # another gateway's replica, or a stale run
        state = msg.get("state")
        if state == "stopped":
            info.state = "stopped"
            return
        if info.stopping:
            return
        if state == "starting":
            if info.state == "ready":  # Dask runs the task again elsewhere: its worker died
                self._mark_down(info, f"worker {info.worker} lost")
            if info.served:
                info.restarts += 1
            info.state = "restarting" if info.served else "starting"
            info.worker, info.worker_name = msg.get("worker"), msg.get("worker_name")
            info.url, info.log = msg.get("url"), msg.get("log")
            info.since = time.time()
        elif state == "ready":
            info.state = "ready"
            info.served = info.run_served = True
            info.worker, info.worker_name = msg.get("worker"), msg.get("worker_name")
            info.url, info.log = msg.get("url"), msg.get("log")
            info.since = time.time()
            info.ready.set()
            logger.info("replica %s serves at %s on worker %s", info.id, info.url, info.worker_name)
            self.listener.replica_ready(info)
        elif state == "exited":
            self._mark_down(info, str(msg.get("reason")))

    def _on_scheduler_event(self, event: tuple[float, Any]) -> None:
        """The scheduler removed a worker: a replica running there is down until Dask runs it again."""
        _, msg = event
        if not isinstance(msg, dict) or msg.get("action") != "remove-worker":
            return
        lost = set(msg.get("processing-tasks") or ())
        for info in list(self.replicas.values()):
            if info.key in lost and not info.stopping:
                self._mark_down(info, f"worker {msg.get('worker')} lost")


def _labels(model: ModelConfig) -> str:
    return "{" + ", ".join(f"{k}={v:g}" for k, v in (model.resources or {}).items()) + "}"


async def _outcome(future: Any) -> BaseException | None:
    """Wait for a Dask future: None if it finished, else the exception it erred with."""
    try:
        await future
    except asyncio.CancelledError:
        if future.cancelled():
            return asyncio.CancelledError("the replica's task was cancelled")
        raise
    except Exception as exc:
        return exc
    return None


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 2000 else text[:2000] + "..."
