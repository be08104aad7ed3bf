"""Local Dask clusters whose workers carry GPU/CPU resource labels.

``LocalCluster(resources=...)`` gives every worker the same resources, so the cluster is
built as a `distributed.SpecCluster` with one spec per worker:

* ``gpu-{i}``: ``resources={"GPU": 1}``, one thread, and (process workers) pinned to one
  GPU with ``CUDA_VISIBLE_DEVICES=<index>`` / ``CUDA_DEVICE_ORDER=PCI_BUS_ID``;
* ``cpu-{i}``: ``resources={"CPU": threads_per_worker}`` and (process workers)
  ``CUDA_VISIBLE_DEVICES=""`` so CPU work can never grab a GPU by accident;
* any `WorkerSpec` the caller adds (arbitrary labels, e.g. ``{"TPU": 1}``).

Scheduler and workers listen on ``host`` (``127.0.0.1`` by default, never a public
address unless asked for).

>>> from distributed import Client
>>> with local_cluster(n_gpu_workers=1, n_cpu_workers=1, processes=False) as cluster:  # doctest: +SKIP
...     with Client(cluster) as client:
...         sorted(w["name"] for w in client.scheduler_info()["workers"].values())
['cpu-0', 'gpu-0']
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import dask
from dask.utils import parse_timedelta
from distributed import Nanny, Scheduler, SpecCluster, Worker
from distributed.deploy.cluster import Cluster
from distributed.worker_memory import parse_memory_limit

from sage_prefect.common import ConfigError, SageSettings
from sage_prefect.dask_gpu.gpus import GPUInfo, detect_gpus

logger = logging.getLogger("sage_prefect.dask_gpu")

#: Resource label of GPU workers.
GPU_LABEL = "GPU"
#: Resource label of CPU workers.
CPU_LABEL = "CPU"
#: Port the scheduler dashboard asks for when ``dashboard=True`` (another free one if taken).
DASHBOARD_PORT = 8787


@dataclass(frozen=True)
class WorkerSpec:
    """An extra worker with arbitrary resource labels, added next to the GPU/CPU workers.

    ``env`` is merged over the cluster-wide ``env`` (process workers only).

    >>> spec = WorkerSpec(name="tpu-0", resources={"TPU": 1})
    >>> spec.nthreads
    1
    """

    name: str
    resources: dict[str, float]
    nthreads: int = 1
    env: dict[str, str] = field(default_factory=dict)


class _Cluster(SpecCluster):
    """A `SpecCluster` that leaves no event-loop thread behind when it fails to start, and
    does not close the nanny of a worker that died twice (see `_update_worker_status`)."""

    def __init__(self, **kwargs: Any) -> None:
        self._removals: dict[Any, int] = {}
        try:
            super().__init__(**kwargs)
        except BaseException:
            # SpecCluster closes what it started but not its loop thread when the
            # scheduler itself fails (e.g. port in use).
            loop_runner = getattr(self, "_loop_runner", None)
            if loop_runner is not None:
                loop_runner.stop()
            raise

    def _update_worker_status(self, op: str, msg: Any) -> None:
        """Close a worker's nanny only if the *latest* removal of its name is not undone in time.

        `SpecCluster` closes a worker's nanny for good when no worker of that name is back
        ``distributed.deploy.lost-worker-timeout`` (15 s) after a removal. It checks the name
        when the timer fires, so a worker that died, was restarted by its nanny and is being
        restarted again at that instant (a partition that kills its worker on every attempt)
        loses its nanny: the cluster shrinks, and once every nanny is gone a pipeline waits
        forever for a worker. Here a removal's timer is void once the name was removed again;
        the latest removal's own timer decides.
        """
        if op != "remove":
            super()._update_worker_status(op, msg)
            return
        name = self.scheduler_info["workers"][msg]["name"]
        removal = self._removals[name] = self._removals.get(name, 0) + 1

        def close_if_lost() -> None:
            if self._removals.get(name) != removal or name not in self.workers:
                return
            if any(info["name"] == name for info in self.scheduler_info["workers"].values()):
                return
            self._futures.add(asyncio.ensure_future(self.workers[name].close()))
            del self.workers[name]

        delay = parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout"))
        asyncio.get_running_loop().call_later(delay, close_if_lost)
        Cluster._update_worker_status(self, op, msg)  # what SpecCluster's override adds is above


def _gpu_pin(i: int, gpus: list[GPUInfo]) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value of GPU worker ``i``."""
    if gpus:
        # More workers than GPUs: share the GPUs round-robin.
        return str(gpus[i % len(gpus)].index)
    # No GPU detected (no nvidia-smi, or a test using fake labels): best guess, harmless
    # where no such device exists.
    return str(i)


def _check_name(name: str, seen: set[str]) -> None:
    if name in seen:
        raise ConfigError(f"duplicate worker name {name!r} in local cluster", field="extra_workers")
    seen.add(name)


def local_cluster(
    *,
    n_gpu_workers: int | None = None,
    n_cpu_workers: int | None = None,
    threads_per_worker: int = 1,
    processes: bool = True,
    host: str = "127.0.0.1",
    scheduler_port: int = 0,
    gpu_resources: dict[str, float] | None = None,
    extra_workers: list[WorkerSpec] | None = None,
    env: dict[str, str] | None = None,
    memory_limit: str | int | None = "auto",
    dashboard: bool = False,
    silence_logs: int | bool = logging.WARNING,
) -> SpecCluster:
    """Start a local Dask cluster of GPU-tagged, CPU-tagged and extra workers.

    * ``n_gpu_workers``: default one per GPU `detect_gpus` finds. More than detected is
      allowed: the extra workers still carry the ``GPU`` label (sharing the real GPUs
      round-robin, or pinned to nothing real when there is none). **This is how tests get
      GPU-tagged workers on a machine without a GPU** -- the label is fake, the placement
      logic is real.
    * ``n_cpu_workers``: default the cores left after the GPU workers, divided by
      ``threads_per_worker``, at least one. Each carries ``{"CPU": threads_per_worker}``.
    * ``gpu_resources``: merged over ``{"GPU": 1}`` for every GPU worker (e.g. add
      ``{"VRAM_GB": 80}``).
    * ``extra_workers``: more workers with arbitrary labels (see `WorkerSpec`).
    * ``processes=True``: each worker is a process under a `distributed.Nanny`; ``env`` is
      merged into every worker's environment (the kernel passes ``PREFECT_API_URL`` this
      way), then the GPU pinning on top. ``processes=False``: in-process thread workers
      (`distributed.Worker`), ``asynchronous=False``, usable with ``Client(cluster)``.
      Thread workers share this process's environment, so neither ``env`` nor
      ``CUDA_VISIBLE_DEVICES`` can be set per worker there.
    * ``memory_limit``: ``"auto"`` splits the machine's memory evenly over the process
      workers; for thread workers ``"auto"`` means no limit (they all share one process,
      whose memory each worker would otherwise count as its own).
    * ``scheduler_port``: 0 picks a free port; `serve_cluster` uses a fixed one.
    * ``dashboard``: start the scheduler dashboard on ``host:8787`` (needs ``bokeh``).

    Close the cluster (``with`` block or ``.close()``) to stop every worker process.

    >>> from distributed import Client
    >>> from sage_prefect.dask_gpu import annotate
    >>> with local_cluster(n_gpu_workers=2, n_cpu_workers=1, processes=False) as cluster:  # doctest: +SKIP
    ...     with Client(cluster) as client, annotate({"GPU": 1}):
    ...         client.submit(lambda: "on a GPU worker").result()
    'on a GPU worker'
    """
    if threads_per_worker < 1:
        raise ConfigError("threads_per_worker must be at least 1", field="threads_per_worker")
    if (n_gpu_workers is not None and n_gpu_workers < 0) or (n_cpu_workers is not None and n_cpu_workers < 0):
        raise ConfigError("worker counts must not be negative", field="n_gpu_workers/n_cpu_workers")

    gpus = detect_gpus() if (n_gpu_workers is None or processes) else []
    n_gpu = len(gpus) if n_gpu_workers is None else n_gpu_workers
    if n_cpu_workers is None:
        cores_left = (os.cpu_count() or 1) - n_gpu
        n_cpu = max(1, cores_left // threads_per_worker)
    else:
        n_cpu = n_cpu_workers
    extras = list(extra_workers or [])
    n_total = n_gpu + n_cpu + len(extras)
    if n_total == 0:
        raise ConfigError("a local cluster needs at least one worker", field="n_cpu_workers")
    if gpus and n_gpu > len(gpus):
        logger.info("%d GPU workers share %d detected GPU(s)", n_gpu, len(gpus))

    protocol = "tcp://"
    worker_cls: type[Nanny] | type[Worker] = Nanny if processes else Worker
    if memory_limit == "auto":
        limit: str | int | None = parse_memory_limit("auto", 1, n_total, logger=logger) if processes else None
    else:
        limit = memory_limit
    common: dict[str, Any] = {
        "host": host,
        "protocol": protocol,
        "memory_limit": limit,
        "dashboard": False,
        "silence_logs": silence_logs,
    }
    base_env = dict(env or {})
    if env and not processes:
        logger.debug("env is ignored for in-process thread workers: they share this process's environment")

    def spec(nthreads: int, resources: dict[str, float], worker_env: dict[str, str]) -> dict[str, Any]:
        options = {**common, "nthreads": nthreads, "resources": dict(resources)}
        if processes:
            options["env"] = {**base_env, **worker_env}
        return {"cls": worker_cls, "options": options}

    workers: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    gpu_labels = {GPU_LABEL: 1.0, **{k: float(v) for k, v in (gpu_resources or {}).items()}}
    for i in range(n_gpu):
        name = f"gpu-{i}"
        _check_name(name, seen)
        pin = {"CUDA_VISIBLE_DEVICES": _gpu_pin(i, gpus), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        workers[name] = spec(1, gpu_labels, pin)
    for i in range(n_cpu):
        name = f"cpu-{i}"
        _check_name(name, seen)
        workers[name] = spec(
            threads_per_worker, {CPU_LABEL: float(threads_per_worker)}, {"CUDA_VISIBLE_DEVICES": ""}
        )
    for extra in extras:
        _check_name(extra.name, seen)
        if extra.nthreads < 1:
            raise ConfigError(f"worker {extra.name!r} needs at least one thread", field="extra_workers")
        workers[extra.name] = spec(
            extra.nthreads, {k: float(v) for k, v in extra.resources.items()}, extra.env
        )

    scheduler: dict[str, Any] = {
        "cls": Scheduler,
        "options": {
            "host": host,
            "port": scheduler_port,
            "protocol": protocol,
            "dashboard": dashboard,
            # The scheduler always runs an HTTP server (health, metrics); without the
            # dashboard it gets a free port on `host` instead of fighting over 8787.
            "dashboard_address": f"{host}:{DASHBOARD_PORT if dashboard else 0}",
        },
    }
    try:
        return _Cluster(
            workers=workers,
            scheduler=scheduler,
            asynchronous=False,
            silence_logs=silence_logs,
            name="sage-local",
        )
    except RuntimeError as exc:
        where = f"{host}:{scheduler_port}" if scheduler_port else host
        raise RuntimeError(
            f"could not start the local Dask cluster on {where} (port in use?): {exc}"
        ) from exc


def local_cluster_from_settings(settings: SageSettings, **overrides: Any) -> SpecCluster:
    """`local_cluster` configured from `SageSettings`; keyword ``overrides`` win.

    Uses ``n_gpu_workers``, ``n_cpu_workers``, ``threads_per_worker``, ``processes`` and
    ``host``; ``dask_address`` is the caller's business (set means: do not start one).

    >>> from sage_prefect.common import SageSettings
    >>> settings = SageSettings(processes=False)
    >>> cluster = local_cluster_from_settings(settings, n_gpu_workers=0)  # doctest: +SKIP
    >>> cluster.close()  # doctest: +SKIP
    """
    options: dict[str, Any] = {
        "n_gpu_workers": settings.n_gpu_workers,
        "n_cpu_workers": settings.n_cpu_workers,
        "threads_per_worker": settings.threads_per_worker,
        "processes": settings.processes,
        "host": settings.host,
    }
    options.update(overrides)
    return local_cluster(**options)
