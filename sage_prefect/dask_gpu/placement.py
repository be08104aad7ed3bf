"""Placement: which resource labels the workers carry, and what a task is annotated with.

A task that asks for a label no worker carries waits forever in Dask, so the rule here is
*fail fast*: `resolve_resources` checks the request against the cluster before anything
is submitted, and either raises `ResourceUnavailableError` or (with CPU fallback on)
logs a warning and runs the operator as CPU work.

>>> available = {"gpu-0": {"GPU": 1.0}, "cpu-0": {"CPU": 1.0}}
>>> resolve_resources("embed", {"GPU": 1}, available, allow_cpu_fallback=False)
{'GPU': 1.0}
>>> resolve_resources("parse", None, available, allow_cpu_fallback=False)
{'CPU': 1.0}
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import dask
from distributed import Client

from sage_prefect.common import ConfigError, ResourceUnavailableError
from sage_prefect.dask_gpu.cluster import CPU_LABEL

logger = logging.getLogger("sage_prefect.dask_gpu")


def _resources_from_identity(identity: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    workers: Mapping[str, Mapping[str, Any]] = identity.get("workers", {})
    return {
        str(info.get("name", address)): {str(k): float(v) for k, v in (info.get("resources") or {}).items()}
        for address, info in workers.items()
    }


def worker_resources(client: Client) -> dict[str, dict[str, float]]:
    """Worker name -> resource labels of every worker the scheduler knows now.

    Needs a synchronous client: an asynchronous client's ``scheduler_info()`` is a cache
    without per-worker entries; use `worker_resources_async` there.

    >>> from distributed import Client
    >>> with local_cluster(n_gpu_workers=1, n_cpu_workers=1, processes=False) as cluster:  # doctest: +SKIP
    ...     with Client(cluster) as client:
    ...         worker_resources(client)
    {'gpu-0': {'GPU': 1.0}, 'cpu-0': {'CPU': 1.0}}
    """
    if client.asynchronous:
        raise TypeError(
            "worker_resources() needs a synchronous Client; use `await worker_resources_async(client)`"
        )
    return _resources_from_identity(client.scheduler_info(n_workers=-1))


async def worker_resources_async(client: Client) -> dict[str, dict[str, float]]:
    """`worker_resources` for an asynchronous client (asks the scheduler directly).

    >>> async with Client(address, asynchronous=True) as client:  # doctest: +SKIP
    ...     resources = await worker_resources_async(client)
    """
    if client.scheduler is None:
        raise RuntimeError("the client is not connected to a scheduler")
    identity = await client.scheduler.identity(n_workers=-1)
    return _resources_from_identity(identity)


def _default(available: Mapping[str, Mapping[str, float]]) -> dict[str, float] | None:
    """``{"CPU": 1}`` where some worker carries the CPU label (keeps CPU work off GPU workers)."""
    if any(CPU_LABEL in labels for labels in available.values()):
        return {CPU_LABEL: 1.0}
    return None


def _describe(available: Mapping[str, Mapping[str, float]]) -> str:
    if not available:
        return "the cluster has no workers"
    parts = []
    for name, labels in sorted(available.items()):
        shown = ", ".join(f"{k}={v:g}" for k, v in sorted(labels.items())) or "no labels"
        parts.append(f"{name} ({shown})")
    return "workers carry: " + "; ".join(parts)


def resolve_resources(
    operator: str,
    requested: Mapping[str, float] | None,
    available: Mapping[str, Mapping[str, float]],
    allow_cpu_fallback: bool,
) -> dict[str, float] | None:
    """The resources to annotate an operator's tasks with, checked against the cluster.

    * ``requested`` empty/None: ``{"CPU": 1}`` if any worker carries a ``CPU`` label, else
      ``None`` (unconstrained).
    * ``requested`` given: some worker must carry every requested label with at least the
      requested quantity (Dask places a task on one worker, so the labels must be found
      together). Then the request is returned as given.
    * otherwise, with ``allow_cpu_fallback``: a warning on the ``sage_prefect.dask_gpu``
      logger and the CPU default as above; without it: `ResourceUnavailableError` naming
      the operator, the missing label(s) and what the workers carry (attributes
      ``operator``, ``label`` = first missing label, ``labels`` = all of them).

    >>> resolve_resources("llm", {"GPU": 1}, {"cpu-0": {"CPU": 1.0}}, allow_cpu_fallback=True)
    {'CPU': 1.0}
    """
    if not requested:
        return _default(available)
    wanted: dict[str, float] = {}
    for label, quantity in requested.items():
        if isinstance(quantity, bool) or not isinstance(quantity, int | float) or quantity <= 0:
            raise ConfigError(
                f"operator {operator!r}: resource {label!r} must be a positive number, got {quantity!r}",
                field="resources",
                operator=operator,
            )
        wanted[str(label)] = float(quantity)

    def enough(labels: Mapping[str, float], label: str) -> bool:
        return labels.get(label, 0.0) >= wanted[label]

    if any(all(enough(labels, label) for label in wanted) for labels in available.values()):
        return wanted

    missing = [label for label in wanted if not any(enough(labels, label) for labels in available.values())]
    asked = ", ".join(f"{k}={v:g}" for k, v in wanted.items())
    if missing:
        problem = "no worker carries " + ", ".join(f"{k}>={wanted[k]:g}" for k in missing)
    else:
        missing = list(wanted)
        problem = "no single worker carries all of them together"
    message = f"operator {operator!r} asks for resources {{{asked}}}, but {problem}; {_describe(available)}"
    if allow_cpu_fallback:
        fallback = _default(available)
        logger.warning(
            "%s -- running it %s (CPU fallback)", message, f"as {fallback}" if fallback else "unconstrained"
        )
        return fallback
    raise ResourceUnavailableError(message, operator=operator, label=missing[0], labels=tuple(missing))


@contextlib.contextmanager
def annotate(resources: Mapping[str, float] | None) -> Iterator[None]:
    """``dask.annotate(resources=...)`` when ``resources`` is non-empty, else nothing.

    Must wrap the ``submit()`` call itself.

    >>> with annotate({"GPU": 1}):  # doctest: +SKIP
    ...     future = client.submit(embed, batch)
    """
    if resources:
        with dask.annotate(resources=dict(resources)):
            yield
    else:
        yield
