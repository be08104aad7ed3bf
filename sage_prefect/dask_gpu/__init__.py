"""L2 platform: Dask clusters whose workers carry GPU/CPU resource labels.

GPU discovery (`detect_gpus`), local clusters with ``gpu-{i}``/``cpu-{i}`` workers
(`local_cluster`), placement checks and annotations (`worker_resources`,
`resolve_resources`, `annotate`), Prefect task runners on an existing scheduler
(`task_runner`), a foreground cluster server (`serve_cluster`) and Dask-level task
failures (`dask_error`, `killed_key`, `lost_task`: a task whose workers kept dying). See README.md.

>>> from distributed import Client
>>> from sage_prefect.dask_gpu import annotate, local_cluster, resolve_resources, worker_resources
>>> with local_cluster(n_gpu_workers=1, processes=False) as cluster:  # doctest: +SKIP
...     client = Client(cluster)
...     labels = resolve_resources("embed", {"GPU": 1}, worker_resources(client), allow_cpu_fallback=False)
...     with annotate(labels):
...         future = client.submit(sum, [1, 2])
"""

from sage_prefect.dask_gpu.cluster import (
    CPU_LABEL,
    GPU_LABEL,
    WorkerSpec,
    local_cluster,
    local_cluster_from_settings,
)
from sage_prefect.dask_gpu.faults import LostTask, dask_error, killed_key, lost_task
from sage_prefect.dask_gpu.gpus import GPUInfo, detect_gpus
from sage_prefect.dask_gpu.placement import (
    annotate,
    resolve_resources,
    worker_resources,
    worker_resources_async,
)
from sage_prefect.dask_gpu.runner import cluster_address_reachable, task_runner
from sage_prefect.dask_gpu.serve import serve_cluster

__all__ = [
    "CPU_LABEL",
    "GPU_LABEL",
    "GPUInfo",
    "LostTask",
    "WorkerSpec",
    "annotate",
    "cluster_address_reachable",
    "dask_error",
    "detect_gpus",
    "killed_key",
    "local_cluster",
    "local_cluster_from_settings",
    "lost_task",
    "resolve_resources",
    "serve_cluster",
    "task_runner",
    "worker_resources",
    "worker_resources_async",
]
