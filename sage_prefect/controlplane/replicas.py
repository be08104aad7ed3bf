"""One engine replica as a process on a Dask worker: the task that runs it, on the worker's side.

The gateway's `supervisor` submits `run_replica` as a Dask task restricted to the model's
resource labels (``client.submit(..., resources={"GPU": 1})``). Dask picks the worker; the
task then

1. starts the replica's server as a child process on that worker, listening on the worker's
   host and a free port: the project's own engine server (``python -m
   sage_prefect.controlplane.server`` with a one-model config, behind a key made for this
   replica) or any OpenAI-compatible server given by ``command`` (``vllm serve ... --port
   {port}``). It inherits the worker's environment, so ``CUDA_VISIBLE_DEVICES`` is the GPU
   the worker is pinned to; its output goes to ``$SAGE_HOME/logs/replicas/`` on the worker;
2. probes ``ready_path`` until the server answers (or the process exits, or
   ``ready_timeout_s`` passes: `ReplicaStartError`, with the log's tail);
3. publishes where it listens on the Dask event topic `TOPIC` (``starting``, ``ready``,
   ``exited``, ``stopped``), which the gateway subscribes to;
4. `distributed.secede`\\ s: the task stops counting as a busy thread (the scheduler no
   longer adds its run time to the worker's occupancy, and adaptive scale-down never picks a
   worker running one) but keeps holding its resources until it returns, so while the
   replica lives a pipeline task annotated ``{"GPU": 1}`` cannot land on that worker's GPU;
5. watches the process and its own task: it returns (stopping the process) when the gateway
   releases the task (scale-down, shutdown, or the gateway's client is gone), and raises
   `ReplicaExited` when the process dies by itself, so the gateway starts it again.

The child is started in a session of its own (stopping it signals the whole group: servers
such as vLLM run helper processes) with ``PR_SET_PDEATHSIG`` on Linux, so a worker that is
killed outright takes its replica's server with it instead of leaving it orphaned.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

#: The Dask event topic replicas publish their state on.
TOPIC = "sage-replicas"
#: ``{python}`` in a command: the worker's own interpreter.
PYTHON = "{python}"


class ReplicaStartError(RuntimeError):
    """A replica's server did not come up: it exited, or never answered within its timeout."""


class ReplicaExited(RuntimeError):
    """A replica's server exited after it had been serving."""


@dataclass(frozen=True)
class ReplicaSpec:
    """What a worker needs to run one replica (built by the gateway, pickled to the worker).

    ``command`` may hold ``{host}``, ``{port}``, ``{model}`` and ``{python}``; ``config``
    (own engines) is written to a file on the worker and ``{config}`` in the command names it.
    """

    replica: str
    model: str
    command: list[str]
    ready_path: str = "/v1/models"
    ready_timeout_s: float = 300.0
    env: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None  # sent as a bearer token by the readiness probe
    config: dict[str, Any] | None = None
    resources: dict[str, float] = field(default_factory=dict)  # the labels the task holds
    host: str | None = None  # default: the host of the worker's own address
    poll_s: float = 0.5


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> Any:
    """A ``preexec_fn`` asking Linux to SIGKILL the child when its parent dies (None elsewhere).

    ``libc.prctl`` is looked up here, before the fork, so the child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL)

    return preexec


def _fill(part: str, values: dict[str, str]) -> str:
    """``{host}``, ``{port}``, ``{model}``, ``{python}``, ``{config}`` in one argument; any other
    brace is left as it is (an argument may be JSON)."""
    for name, value in values.items():
        part = part.replace("{" + name + "}", value)
    return part


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _stop(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the replica's process group, SIGKILL it after ``grace`` seconds."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


def _released(worker: Any, key: Any) -> bool:
    """Whether Dask no longer wants this task: the gateway cancelled it, or its client is gone.

    A running task cannot be interrupted; the worker marks it ``cancelled`` (or forgets it)
    and the task itself must notice: this reads the worker's own record of it."""
    ts = worker.state.tasks.get(key)
    return ts is None or ts.state in ("cancelled", "released", "forgotten")


def run_replica(spec: ReplicaSpec) -> str:
    """Run one replica until the gateway releases this task (returns ``"stopped"``).

    Raises `ReplicaStartError` when the server never answers, `ReplicaExited` when it dies
    after serving: either way the gateway's supervisor starts the replica again.
    """
    from distributed import get_worker, secede
    from distributed.worker import thread_state

    from sage_prefect.common.settings import load_settings

    worker = get_worker()
    key = thread_state.key
    host = spec.host or urlsplit(worker.address).hostname or "127.0.0.1"
    port = _free_port(host)
    url = f"http://{host}:{port}"
    log_dir = load_settings().log_dir / "replicas"
    log_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{_slug(spec.replica)}-{time.strftime('%Y%m%d-%H%M%S')}-{port}"
    log = log_dir / f"{stem}.log"
    fill = {"host": host, "port": str(port), "model": spec.model, "python": sys.executable}
    if spec.config is not None:
        config_file = log_dir / f"{stem}.json"
        config_file.write_text(json.dumps({**spec.config, "host": host, "port": port}, indent=1))
        fill["config"] = str(config_file)
    argv = [_fill(part, fill) for part in spec.command]
    env = {**os.environ, **spec.env, "SAGE_REPLICA": spec.replica}

    def publish(state: str, **extra: Any) -> None:
        worker.log_event(
            TOPIC,
            {
                "replica": spec.replica,
                "model": spec.model,
                "key": str(key),
                "state": state,
                "worker": worker.address,
                "worker_name": str(worker.name),
                "url": url,
                "log": str(log),
                **extra,
            },
        )

    held = _advertise_held(worker, spec.resources, -1)
    try:
        with log.open("ab") as out:
            out.write(f"$ {' '.join(argv)}\n".encode())
            out.flush()
            process = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent(),  # only a prctl call, looked up before the fork
            )
    except BaseException:
        _advertise_held(worker, held, +1)
        raise
    publish("starting", pid=process.pid)
    try:
        if _wait_ready(spec, process, url, log, worker, key):
            publish("ready", pid=process.pid)
            secede()
        while not _released(worker, key):
            code = process.poll()
            if code is not None:
                reason = f"the server exited with status {code}"
                publish("exited", reason=reason)
                raise ReplicaExited(
                    f"replica {spec.replica} on {worker.address}: {reason}; log {log}:\n{_tail(log)}"
                )
            time.sleep(spec.poll_s)
    finally:
        _stop(process)
        _advertise_held(worker, held, +1)
        if spec.config is not None:
            with contextlib.suppress(OSError):
                Path(fill["config"]).unlink()  # the log stays
    publish("stopped")
    return "stopped"


def _advertise_held(worker: Any, resources: dict[str, float], sign: int) -> dict[str, float]:
    """Take what this replica holds out of the totals the worker advertises (``sign`` -1), or
    put it back (+1); returns what was changed.

    Dask's scheduler places a task by a worker's *total* resources, not the free ones: while a
    replica holds the worker's ``GPU``, a pipeline task asking for ``{"GPU": 1}`` would still be
    sent there and wait until the replica stops, even with another GPU worker idle. Lowering
    the advertised totals (``Worker.set_resources``, which the scheduler is told of) makes
    Dask send such tasks to a worker that has the label free, or leave them unrunnable, where
    an adaptive cluster sees them. The worker's nanny restarts a dead worker with its full
    labels."""
    from distributed.utils import sync

    change = {k: v for k, v in resources.items() if k in worker.state.total_resources}
    if change:
        totals = {k: max(0.0, worker.state.total_resources[k] + sign * v) for k, v in change.items()}
        try:
            sync(worker.loop, worker.set_resources, **totals)
        except Exception:  # the scheduler is gone (shutting down): nothing left to tell
            return {}
    return change


def _wait_ready(
    spec: ReplicaSpec, process: subprocess.Popen[bytes], url: str, log: Path, worker: Any, key: Any
) -> bool:
    """True once the server answers; False if the task was released while it started."""
    headers = {"authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    deadline = time.monotonic() + spec.ready_timeout_s
    with httpx.Client(timeout=2.0, trust_env=False) as http:
        while True:
            code = process.poll()
            if code is not None:
                raise ReplicaStartError(
                    f"replica {spec.replica} exited with status {code} before it answered "
                    f"{spec.ready_path} on {worker.address}; log {log}:\n{_tail(log)}"
                )
            if _released(worker, key):
                return False
            try:
                if http.get(f"{url}{spec.ready_path}", headers=headers).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ReplicaStartError(
                    f"replica {spec.replica} did not answer {spec.ready_path} within "
                    f"{spec.ready_timeout_s:g} s on {worker.address}; log {log}:\n{_tail(log)}"
                )
            time.sleep(0.25)
