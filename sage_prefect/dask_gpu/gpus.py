"""GPU discovery: which NVIDIA GPUs this process may use.

The truth comes from ``nvidia-smi``; ``CUDA_VISIBLE_DEVICES`` narrows it down the way
CUDA itself would. There is deliberately no way to fake GPUs here: tests that need
GPU-tagged workers without a GPU ask `local_cluster` for ``n_gpu_workers`` explicitly.

>>> gpus = detect_gpus()
>>> all(g.index >= 0 for g in gpus)
True
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass

logger = logging.getLogger("sage_prefect.dask_gpu")

#: Seconds ``nvidia-smi`` may take before we give up and report no GPUs.
NVIDIA_SMI_TIMEOUT_S = 10.0

_QUERY = "--query-gpu=index,uuid,name,memory.total"


@dataclass(frozen=True)
class GPUInfo:
    """One physical GPU as ``nvidia-smi`` numbers it.

    ``index`` is the PCI-bus-order index ``nvidia-smi`` reports; GPU workers are pinned
    with ``CUDA_VISIBLE_DEVICES=<index>`` and ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that
    CUDA numbers devices the same way. ``memory_mib`` is ``None`` where the driver does
    not report it.

    >>> GPUInfo(index=0, name="NVIDIA H100 80GB HBM3", memory_mib=81559).memory_mib
    81559
    """

    index: int
    name: str
    memory_mib: int | None


def _run_nvidia_smi(timeout: float) -> list[tuple[GPUInfo, str]]:
    """Query ``nvidia-smi``; every failure (missing binary, error exit, timeout) gives ``[]``."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return []
    try:
        proc = subprocess.run(
            [binary, _QUERY, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("nvidia-smi failed: %s", exc)
        return []
    if proc.returncode != 0:
        logger.debug("nvidia-smi exited %s: %s", proc.returncode, proc.stderr.strip())
        return []
    found: list[tuple[GPUInfo, str]] = []
    for line in proc.stdout.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 4:
            continue
        # index, uuid, name (may in theory contain commas), memory.total
        try:
            index = int(fields[0])
        except ValueError:
            continue
        uuid = fields[1]
        name = ", ".join(fields[2:-1])
        try:
            memory: int | None = int(float(fields[-1]))
        except ValueError:  # "[N/A]", "[Not Supported]"
            memory = None
        found.append((GPUInfo(index=index, name=name, memory_mib=memory), uuid))
    return found


def _visible_selectors(value: str) -> list[str]:
    """Entries of ``CUDA_VISIBLE_DEVICES`` up to the first invalid one (CUDA ignores the rest)."""
    selectors: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if entry.isdigit() or entry.startswith(("GPU-", "MIG-")):
            selectors.append(entry)
        else:  # "", "-1", garbage: CUDA stops enumerating here
            break
    return selectors


def detect_gpus(timeout: float = NVIDIA_SMI_TIMEOUT_S) -> list[GPUInfo]:
    """The GPUs this process may use, in ``CUDA_VISIBLE_DEVICES`` order when that is set.

    * ``CUDA_VISIBLE_DEVICES`` set to ``""`` or ``"-1"``: no GPUs (``nvidia-smi`` is not run).
    * ``CUDA_VISIBLE_DEVICES`` set to a list (indices or ``GPU-<uuid>``): only those of the
      GPUs ``nvidia-smi`` reports.
    * otherwise: every GPU ``nvidia-smi --query-gpu=...`` reports.

    A missing ``nvidia-smi``, an error exit or a timeout all mean "no GPUs". MIG instances
    (``MIG-<uuid>`` entries) are not reported: they have no whole-GPU index to pin to.

    >>> for gpu in detect_gpus():  # doctest: +SKIP
    ...     print(gpu.index, gpu.name, gpu.memory_mib)
    0 NVIDIA H100 80GB HBM3 81559
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    selectors: list[str] | None = None
    if visible is not None:
        selectors = _visible_selectors(visible)
        if not selectors:
            return []
    found = _run_nvidia_smi(timeout)
    if selectors is None:
        return [gpu for gpu, _ in found]
    chosen: list[GPUInfo] = []
    for selector in selectors:
        for gpu, uuid in found:
            hit = str(gpu.index) == selector if selector.isdigit() else uuid.startswith(selector)
            if hit and gpu not in chosen:
                chosen.append(gpu)
                break
    return chosen
