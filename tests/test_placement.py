"""Engine replicas placed on labelled Dask workers, supervised and autoscaled by the gateway.

Real parts throughout: the gateway in a uvicorn subprocess starts a real local Dask cluster on
127.0.0.1 whose workers carry *fake* labels (``GPU`` on a machine without one: the label is
fake, the placement is Dask's), each replica is a real engine server process on a worker
(all-MiniLM-L6-v2, or the random-weight tiny LM where the text does not matter), and clients
are the real ``openai`` SDK and httpx.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from distributed import Client
from openai import OpenAI

from sage_prefect.common import ResourceUnavailableError
from sage_prefect.controlplane.config import ControlPlaneConfig
from sage_prefect.controlplane.metrics import sample_sum
from sage_prefect.controlplane.server import Background, start_background
from sage_prefect.controlplane.service import ControlPlane
from sage_prefect.controlplane.supervisor import unsatisfiable

pytestmark = pytest.mark.timeout(420)

EMBED = "all-MiniLM-L6-v2"
TINY = "sage-tiny-random-lm"  # random weights: for tests where the text does not matter


def _write(tmp: Path, doc: dict[str, Any]) -> Path:
    path = tmp / "controlplane.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _health(bg: Background) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(f"{bg.url}/health", timeout=10).json()
    return doc


def _wait(predicate: Any, timeout: float, what: str, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _worker_pids(scheduler: str) -> dict[str, tuple[int, dict[str, float], str]]:
    """Worker address -> (pid, resource labels, CUDA_VISIBLE_DEVICES) of the gateway's cluster."""
    with Client(scheduler, timeout=30) as client:
        pids = client.run(os.getpid)
        env = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
        info = client.scheduler_info(n_workers=-1)["workers"]
    return {addr: (pids[addr], dict(info[addr]["resources"]), env[addr]) for addr in pids}


def _listening(port: int) -> bool:
    return any(
        c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
        for c in psutil.net_connections("tcp")
    )


def _replica_pid(url: str) -> int:
    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return int(conn.pid)
    raise AssertionError(f"no process listens on {url}")


@pytest.fixture(scope="module")
def gpu_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Background]:
    """Three workers with a fake ``GPU`` label and one CPU worker; two MiniLM replicas that each
    hold ``{GPU: 1}``."""
    tmp = tmp_path_factory.mktemp("placed")
    config = {
        "cluster": {"address": "local", "n_gpu_workers": 3, "n_cpu_workers": 1},
        "models": [
            {
                "name": EMBED,
                "kind": "embedding",
                "engine": "sentence-transformers",
                "resources": {"GPU": 1},
                "replicas": 2,
                "env": {"OMP_NUM_THREADS": "1"},  # one core each (a CPU label sets this itself)
            }
        ],
    }
    with start_background(_write(tmp, config), log=tmp / "gateway.log", startup_timeout=300) as bg:
        yield bg


def test_replicas_run_only_on_workers_with_the_labels(gpu_gateway: Background) -> None:
    health = _health(gpu_gateway)
    placed = health["placed"]
    assert sorted(placed) == [f"{EMBED}#0", f"{EMBED}#1"]
    assert all(p["state"] == "ready" for p in placed.values()), placed
    workers = _worker_pids(health["cluster"])
    hosts = set()
    for rid, info in placed.items():
        pid, labels, cuda = workers[info["worker"]]
        # a GPU worker (gpu-i carry GPU=1), whose GPU the replica holds: advertised as taken
        assert info["worker_name"].startswith("gpu-"), f"{rid} runs on {info['worker_name']}"
        assert labels.get("GPU") == 0, f"{rid} does not hold {info['worker_name']}'s GPU: {labels}"
        replica = psutil.Process(_replica_pid(info["url"]))
        assert replica.ppid() == pid, f"{rid}'s server is not a child of its worker"
        # the replica runs with the worker's GPU pinning
        assert replica.environ().get("CUDA_VISIBLE_DEVICES", "<unset>") == cuda
        hosts.add(info["worker"])
    assert len(hosts) == 2, "each replica holds GPU=1: they cannot share a worker"

    client = OpenAI(base_url=gpu_gateway.base_url, api_key="unused", max_retries=0)
    out = client.embeddings.create(model=EMBED, input=["placed on a worker", "by its labels"])
    assert [len(d.embedding) for d in out.data] == [384, 384]
    metrics = httpx.get(f"{gpu_gateway.url}/metrics").text
    assert sample_sum(metrics, "sage_replica_state", replica=f"{EMBED}#0", state="ready") == 1
    assert sample_sum(metrics, "sage_replica_restarts_total", replica=f"{EMBED}#1") == 0


def test_a_gpu_replica_keeps_gpu_tasks_off_its_worker(gpu_gateway: Background) -> None:
    """While two replicas hold GPU=1 on two of the three GPU workers, Dask runs GPU tasks only on
    the third: the replicas' labels are held, not just checked."""
    health = _health(gpu_gateway)
    held = {p["worker"] for p in health["placed"].values()}
    with Client(health["cluster"], timeout=30) as client:
        futures = [
            client.submit(
                lambda i: __import__("distributed").get_worker().address, i, resources={"GPU": 1}, pure=False
            )
            for i in range(6)
        ]
        ran_on = set(client.gather(futures))
    assert ran_on and ran_on.isdisjoint(held), f"GPU tasks ran on {ran_on}; replicas hold {held}"


def test_a_killed_worker_brings_its_replica_back_elsewhere_without_losing_requests(
    gpu_gateway: Background,
) -> None:
    health = _health(gpu_gateway)
    victim_id = f"{EMBED}#0"
    victim = health["placed"][victim_id]
    workers = _worker_pids(health["cluster"])
    pid = workers[victim["worker"]][0]

    client = OpenAI(base_url=gpu_gateway.base_url, api_key="unused", max_retries=0, timeout=120)
    stop = threading.Event()
    results: list[str] = []

    def load(n: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                out = client.embeddings.create(
                    model=EMBED, input=[f"request {n}-{i} text {k}" for k in range(8)]
                )
                results.append("ok" if len(out.data) == 8 else "short")
            except Exception as exc:  # counted: none may fail
                results.append(f"{type(exc).__name__}: {exc}")
            i += 1

    with ThreadPoolExecutor(4) as pool:
        for n in range(4):
            pool.submit(load, n)
        _wait(lambda: len(results) >= 8, 60, "load to start")
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()

        def back() -> bool:
            info = _health(gpu_gateway)["placed"][victim_id]
            return bool(
                info["state"] == "ready" and info["worker"] != victim["worker"] and info["restarts"] >= 1
            )

        try:
            _wait(back, 180, f"{victim_id} to serve again on another worker")
        except AssertionError as exc:  # say where it stood
            raise AssertionError(f"{exc}; health: {_health(gpu_gateway)}; results: {results[-5:]}") from None
        recovered = time.monotonic() - killed_at
        time.sleep(2)  # load on the recovered replica too
        stop.set()
    failures = [r for r in results if r != "ok"]
    assert not failures, f"{len(failures)} of {len(results)} requests failed: {failures[:3]}"
    info = _health(gpu_gateway)["placed"][victim_id]
    assert info["worker_name"].startswith("gpu-") and info["state"] == "ready"
    assert recovered < 180


def test_a_model_no_worker_can_host_fails_fast_naming_the_label(tmp_path: Path) -> None:
    config = ControlPlaneConfig(
        cluster={"address": "local", "n_gpu_workers": 0, "n_cpu_workers": 1, "threads_per_worker": 1},
        models=[
            {
                "name": "big-model",
                "kind": "embedding",
                "engine": "sentence-transformers",
                "resources": {"TPU": 1},
                "params": {"model": EMBED},
            }
        ],
    )
    plane = ControlPlane(config)
    started = time.monotonic()
    with pytest.raises(
        ResourceUnavailableError, match=r"model 'big-model' asks for resources \{TPU=1\}"
    ) as err:
        asyncio.run(plane.start())
    assert "no worker carries TPU>=1" in str(err.value) and "cpu-0 (CPU=1" in str(err.value)
    assert time.monotonic() - started < 60


def test_engine_command_runs_any_openai_server_on_a_labelled_worker(tmp_path: Path) -> None:
    """``engine: command`` with a real OpenAI-compatible server: this project's own engine
    server, started from its command line as a user would start ``vllm serve``."""
    server_config = tmp_path / "server.yaml"
    server_config.write_text(
        yaml.safe_dump(
            {"models": [{"name": TINY, "kind": "llm", "engine": "transformers", "params": {"model": "tiny"}}]}
        )
    )
    config = {
        "cluster": {
            "address": "local",
            "n_gpu_workers": 0,
            "n_cpu_workers": 1,
            "workers": [{"name": "accel-0", "resources": {"ACCEL": 1}}],
        },
        "models": [
            {
                "name": "served-by-command",
                "kind": "llm",
                "engine": "command",
                "resources": {"ACCEL": 1},
                "command": [
                    "{python}",
                    "-m",
                    "sage_prefect.controlplane.server",
                    "--config",
                    str(server_config),
                    "--host",
                    "{host}",
                    "--port",
                    "{port}",
                ],
                "params": {"model": TINY},
                "env": {"SAGE_TEST_MARK": "command-replica"},
                "ready_timeout_s": 120,
            }
        ],
    }
    with start_background(_write(tmp_path, config), log=tmp_path / "gateway.log", startup_timeout=300) as bg:
        health = _health(bg)
        (info,) = health["placed"].values()
        assert info["worker_name"] == "accel-0" and info["state"] == "ready"
        client = OpenAI(base_url=bg.base_url, api_key="unused", max_retries=0)
        out = client.chat.completions.create(
            model="served-by-command", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert out.choices[0].finish_reason in ("stop", "length") and out.usage is not None
        assert out.usage.completion_tokens >= 1
        replica = psutil.Process(_replica_pid(info["url"]))
        assert replica.environ().get("SAGE_TEST_MARK") == "command-replica"
        log = Path(info["log"])
        assert log.parent.name == "replicas" and "sage_prefect.controlplane.server" in log.read_text()
        port = int(info["url"].rsplit(":", 1)[1])
    # the gateway stopped: so did the replica's server
    _wait(lambda: not _listening(port), 30, "the replica's server to stop with the gateway")


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after_the_cooldown(tmp_path: Path) -> None:
    config = {
        "cluster": {"address": "local", "n_gpu_workers": 0, "n_cpu_workers": 2},
        "classes": {"interactive": {"e2e_ms": 1000, "max_queue": 64}},
        "models": [
            {
                "name": EMBED,
                "kind": "embedding",
                "engine": "sentence-transformers",
                "resources": {"CPU": 1},
                "replicas": {"min": 1, "max": 2, "down_delay_s": 4},
            }
        ],
    }
    with start_background(_write(tmp_path, config), log=tmp_path / "gateway.log", startup_timeout=300) as bg:
        assert len(_health(bg)["placed"]) == 1
        stop = threading.Event()
        statuses: list[int] = []
        text = "a sentence long enough to cost the model some time to embed " * 6

        def load() -> None:
            with httpx.Client(timeout=60) as http:
                while not stop.is_set():
                    r = http.post(f"{bg.base_url}/embeddings", json={"model": EMBED, "input": [text] * 32})
                    statuses.append(r.status_code)

        with ThreadPoolExecutor(6) as pool:
            for _ in range(6):
                pool.submit(load)
            try:
                two = _wait(
                    lambda: [p for p in _health(bg)["placed"].values() if p["state"] == "ready"][1:],
                    150,
                    "a second replica to serve",
                )
            finally:
                stop.set()
        assert two
        placed = _health(bg)["placed"]
        assert len({p["worker"] for p in placed.values()}) == 2
        assert 200 in statuses and set(statuses) <= {200, 429}, set(statuses)
        metrics = httpx.get(f"{bg.url}/metrics").text
        # one replica asked for at start (min_replicas), one under load (max_replicas)
        assert sample_sum(metrics, "sage_scale_events_total", model=EMBED, direction="up") == 2
        urls = {rid: p["url"] for rid, p in placed.items()}
        # quiet now: after the cooldown one replica is drained and stopped, never below min
        _wait(lambda: len(_health(bg)["placed"]) == 1, 60, "scale-down to one replica")
        (gone,) = set(urls) - set(_health(bg)["placed"])
        port = int(urls[gone].rsplit(":", 1)[1])
        _wait(lambda: not _listening(port), 30, f"the drained replica {gone}'s server to stop")
        time.sleep(3)  # and it stays at min_replicas
        assert len(_health(bg)["placed"]) == 1
        out = OpenAI(base_url=bg.base_url, api_key="unused", max_retries=0).embeddings.create(
            model=EMBED, input=["still served"]
        )
        assert len(out.data[0].embedding) == 384


def _pending_and_target(dask_scheduler: Any) -> tuple[list[str], int, int]:
    unrunnable = [str(ts.key) for ts in dask_scheduler.unrunnable]
    return unrunnable, dask_scheduler.adaptive_target(), len(dask_scheduler.workers)


def test_a_replica_no_free_worker_can_take_waits_as_work_an_adaptive_cluster_sees() -> None:
    """One fake-GPU worker, held by the first replica: a second replica (what a scale-up asks
    for) cannot be placed. It must wait in Dask as an unrunnable task, not fail or hang the
    gateway, and the scheduler's `adaptive_target` (what ``cluster.adapt``, dask-jobqueue and
    dask-kubernetes scale on) must ask for more workers than there are."""
    config = ControlPlaneConfig(
        cluster={"address": "local", "n_gpu_workers": 1, "n_cpu_workers": 0},
        models=[
            {
                "name": EMBED,
                "kind": "embedding",
                "engine": "sentence-transformers",
                "resources": {"GPU": 1},
                "replicas": {"min": 1, "max": 2},
                "env": {"OMP_NUM_THREADS": "1"},
            }
        ],
    )

    async def scenario() -> tuple[list[str], int, int, dict[str, Any]]:
        plane = ControlPlane(config)
        await plane.start()
        try:
            assert plane.supervisor is not None
            second = plane.supervisor.add(plane.models[EMBED])
            for _ in range(100):
                await asyncio.sleep(0.1)
                unrunnable, target, workers = await plane.supervisor.client.run_on_scheduler(
                    _pending_and_target
                )
                if unrunnable:
                    break
            return unrunnable, target, workers, plane.supervisor.snapshot()[second.id]
        finally:
            await plane.stop()

    unrunnable, target, workers, info = asyncio.run(scenario())
    assert len(unrunnable) == 1 and unrunnable[0].endswith(f"{EMBED}#1"), unrunnable
    assert info["state"] == "pending" and info["worker"] is None
    assert target > workers == 1, f"adaptive_target {target} with {workers} worker(s)"


def test_streams_on_a_killed_replica_end_with_a_clear_error_and_others_finish(
    tmp_path: Path, real_model: Path
) -> None:
    """Two replicas of the real SmolLM2-135M-Instruct (a stream takes seconds on a CPU); the
    worker of one is SIGKILLed while four streams run. A stream that has sent tokens cannot be
    replayed: it must end with an error naming the failure, never hang or end as if complete;
    the other streams finish, and a non-streamed request sent after the kill is answered."""
    config = {
        "cluster": {"address": "local", "n_gpu_workers": 2, "n_cpu_workers": 0},
        "models": [
            {
                "name": "smollm2",
                "kind": "llm",
                "engine": "transformers",
                "resources": {"GPU": 1},
                "replicas": 2,
                "params": {"model": str(real_model), "threads": 1},
            }
        ],
    }
    with start_background(_write(tmp_path, config), log=tmp_path / "gateway.log", startup_timeout=300) as bg:
        health = _health(bg)
        victim = health["placed"]["smollm2#0"]
        pid = _worker_pids(health["cluster"])[victim["worker"]][0]
        client = OpenAI(base_url=bg.base_url, api_key="unused", max_retries=0, timeout=120)
        first = threading.Barrier(5)
        outcomes: list[str] = []

        def stream(i: int) -> None:
            got_first = False
            try:
                chunks = client.chat.completions.create(
                    model="smollm2",
                    messages=[
                        {"role": "user", "content": f"Count from 1 to 100, one number per line ({i})."}
                    ],
                    max_tokens=96,
                    temperature=0.0,
                    stream=True,
                )
                finish = None
                for chunk in chunks:
                    if not got_first and chunk.choices and chunk.choices[0].delta.content:
                        got_first = True
                        first.wait(60)
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
                outcomes.append(f"finished:{finish}")
            except Exception as exc:
                outcomes.append(f"error:{type(exc).__name__}:{exc}")
            finally:
                if not got_first:
                    first.abort()

        with ThreadPoolExecutor(4) as pool:
            for i in range(4):
                pool.submit(stream, i)
            first.wait(120)  # every stream has tokens: none can be replayed any more
            os.kill(pid, signal.SIGKILL)
            answer = client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "Say hi."}], max_tokens=8
            )
        assert answer.choices[0].message.content is not None
        assert len(outcomes) == 4, outcomes
        errors = [o for o in outcomes if o.startswith("error:")]
        assert errors, f"no stream was on the killed replica: {outcomes}"
        assert all("smollm2#0" in e and "mid-stream" in e for e in errors), errors
        assert all(o in ("finished:length", "finished:stop") for o in outcomes if o not in errors), outcomes


def test_what_no_worker_can_host_is_named_exactly() -> None:
    """The fail-fast message tells a missing label, labels that never meet on one worker, and
    too little memory apart (the scheduler's identity entries, as the supervisor reads them)."""
    workers = {
        "tcp://a": {"name": "gpu-0", "resources": {"GPU": 1.0}, "memory_limit": 8e9},
        "tcp://b": {"name": "fast-0", "resources": {"NVME": 1.0}, "memory_limit": 0},
    }

    def model(**kw: Any) -> Any:
        from sage_prefect.controlplane.config import ModelConfig

        return ModelConfig(name="m", kind="embedding", engine="sentence-transformers", **kw)

    assert unsatisfiable(model(resources={"GPU": 1}, memory_gb=4), workers) is None
    assert "no worker carries TPU>=1" in str(unsatisfiable(model(resources={"TPU": 1}), workers))
    together = str(unsatisfiable(model(resources={"GPU": 1, "NVME": 1}), workers))
    assert "no single worker carries all of them together" in together
    memory = str(unsatisfiable(model(resources={"GPU": 1}, memory_gb=16), workers))
    assert "no worker with those labels has 16 GB of memory" in memory
    assert "workers: fast-0 (NVME=1; no memory limit); gpu-0 (GPU=1; memory 8.0 GB)" in memory


def test_a_replica_that_never_starts_fails_the_gateway_start_with_its_log() -> None:
    """A server that exits at once is started three times (with backoff), then the gateway's
    start fails naming the model, the exit status and the tail of the server's own log."""
    config = ControlPlaneConfig(
        cluster={"address": "local", "n_gpu_workers": 0, "n_cpu_workers": 1, "restart_backoff_s": 0.2},
        models=[
            {
                "name": "broken",
                "kind": "llm",
                "engine": "command",
                "resources": {"CPU": 1},
                "command": ["{python}", "-c", "import sys; print('no weights here'); sys.exit(3)", "{port}"],
            }
        ],
    )
    plane = ControlPlane(config)
    with pytest.raises(RuntimeError, match="model 'broken': a replica could not be started") as err:
        asyncio.run(plane.start())
    assert "exited with status 3" in str(err.value) and "no weights here" in str(err.value)


def test_command_placeholders_are_filled_and_other_braces_kept() -> None:
    from sage_prefect.controlplane.replicas import _fill

    values = {"host": "10.0.0.7", "port": "41234", "model": "m", "python": "/venv/bin/python"}
    argv = [
        "{python}",
        "-m",
        "x",
        "--host",
        "{host}",
        "--port={port}",
        '--generation-config={"temperature": 0}',
    ]
    assert [_fill(a, values) for a in argv] == [
        "/venv/bin/python",
        "-m",
        "x",
        "--host",
        "10.0.0.7",
        "--port=41234",
        '--generation-config={"temperature": 0}',
    ]
