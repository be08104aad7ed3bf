"""sage_prefect.dask_gpu: real local clusters with fake GPU labels (no GPU needed)."""

from __future__ import annotations

import logging
import os
import pickle
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from distributed import Client, SpecCluster, get_worker

from sage_prefect.common import ConfigError, ResourceUnavailableError, load_settings
from sage_prefect.dask_gpu import (
    GPUInfo,
    WorkerSpec,
    annotate,
    cluster_address_reachable,
    detect_gpus,
    local_cluster,
    local_cluster_from_settings,
    resolve_resources,
    serve_cluster,
    task_runner,
    worker_resources,
)

pytestmark = pytest.mark.timeout(120)


def _worker_name(_: int) -> str:
    return str(get_worker().name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cluster() -> Iterator[SpecCluster]:
    with local_cluster(
        n_gpu_workers=2,
        n_cpu_workers=2,
        threads_per_worker=2,
        processes=False,
        extra_workers=[WorkerSpec(name="tpu-0", resources={"TPU": 1})],
    ) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster: SpecCluster) -> Iterator[Client]:
    with Client(cluster) as c:
        yield c


# --- cluster layout -----------------------------------------------------------------


def test_worker_names_and_resources(cluster: SpecCluster, client: Client) -> None:
    assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
    assert worker_resources(client) == {
        "gpu-0": {"GPU": 1.0},
        "gpu-1": {"GPU": 1.0},
        "cpu-0": {"CPU": 2.0},
        "cpu-1": {"CPU": 2.0},
        "tpu-0": {"TPU": 1.0},
    }
    nthreads = {w["name"]: w["nthreads"] for w in client.scheduler_info(n_workers=-1)["workers"].values()}
    assert nthreads == {"gpu-0": 1, "gpu-1": 1, "cpu-0": 2, "cpu-1": 2, "tpu-0": 1}
    for info in client.scheduler_info(n_workers=-1)["workers"].values():
        assert info["host"] == "127.0.0.1"


def test_gpu_annotated_tasks_run_only_on_gpu_workers(client: Client) -> None:
    with annotate({"GPU": 1}):
        futures = client.map(_worker_name, range(20), pure=False)
    names = set(client.gather(futures))
    assert names <= {"gpu-0", "gpu-1"}, names


def test_unconstrained_work_with_cpu_label_stays_off_gpu_workers(client: Client) -> None:
    resources = resolve_resources("parse", None, worker_resources(client), allow_cpu_fallback=False)
    assert resources == {"CPU": 1.0}
    with annotate(resources):
        futures = client.map(_worker_name, range(20), pure=False)
    names = set(client.gather(futures))
    assert names <= {"cpu-0", "cpu-1"}, names


def test_arbitrary_fake_label_routes_to_its_worker(client: Client) -> None:
    resources = resolve_resources("tpu-op", {"TPU": 1}, worker_resources(client), allow_cpu_fallback=False)
    with annotate(resources):
        futures = client.map(_worker_name, range(5), pure=False)
    assert set(client.gather(futures)) == {"tpu-0"}


def test_annotate_without_resources_is_a_no_op(client: Client) -> None:
    with annotate(None), annotate({}):
        name = client.submit(_worker_name, 0, pure=False).result()
    assert name in {"gpu-0", "gpu-1", "cpu-0", "cpu-1", "tpu-0"}


def test_bad_cluster_specs_fail_fast() -> None:
    with pytest.raises(ConfigError, match="at least one worker"):
        local_cluster(n_gpu_workers=0, n_cpu_workers=0, processes=False)
    with pytest.raises(ConfigError, match="duplicate worker name 'cpu-0'"):
        local_cluster(
            n_gpu_workers=0,
            n_cpu_workers=1,
            processes=False,
            extra_workers=[WorkerSpec(name="cpu-0", resources={"X": 1})],
        )


def test_local_cluster_from_settings_with_overrides() -> None:
    settings = load_settings(processes=False, n_gpu_workers=1, n_cpu_workers=1, threads_per_worker=3)
    with local_cluster_from_settings(settings, n_cpu_workers=2) as c, Client(c) as cl:
        assert worker_resources(cl) == {"gpu-0": {"GPU": 1.0}, "cpu-0": {"CPU": 3.0}, "cpu-1": {"CPU": 3.0}}


# --- resolve_resources ---------------------------------------------------------------

AVAILABLE = {"gpu-0": {"GPU": 1.0}, "cpu-0": {"CPU": 1.0}, "cpu-1": {"CPU": 1.0}}


def test_resolve_resources_passes_satisfiable_requests() -> None:
    assert resolve_resources("embed", {"GPU": 1}, AVAILABLE, allow_cpu_fallback=False) == {"GPU": 1.0}


def test_resolve_resources_without_cpu_label_is_unconstrained() -> None:
    assert resolve_resources("op", None, {"gpu-0": {"GPU": 1.0}}, allow_cpu_fallback=False) is None
    assert resolve_resources("op", {}, {}, allow_cpu_fallback=False) is None


def test_resolve_resources_raises_naming_operator_label_and_workers() -> None:
    with pytest.raises(ResourceUnavailableError) as info:
        resolve_resources("vllm_generate", {"GPU": 2}, AVAILABLE, allow_cpu_fallback=False)
    err = info.value
    message = str(err)
    assert "vllm_generate" in message
    assert "GPU" in message
    assert "gpu-0 (GPU=1)" in message and "cpu-0 (CPU=1)" in message
    assert err.operator == "vllm_generate"  # type: ignore[attr-defined]
    assert err.label == "GPU"  # type: ignore[attr-defined]
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, ResourceUnavailableError) and again.label == "GPU"  # type: ignore[attr-defined]


def test_resolve_resources_needs_all_labels_on_one_worker() -> None:
    split = {"a": {"GPU": 1.0}, "b": {"VRAM_GB": 80.0}}
    with pytest.raises(ResourceUnavailableError, match="no single worker"):
        resolve_resources("big", {"GPU": 1, "VRAM_GB": 40}, split, allow_cpu_fallback=False)


def test_resolve_resources_rejects_non_positive_quantities() -> None:
    with pytest.raises(ConfigError, match="positive"):
        resolve_resources("op", {"GPU": 0}, AVAILABLE, allow_cpu_fallback=False)


def test_resolve_resources_cpu_fallback_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sage_prefect.dask_gpu"):
        got = resolve_resources("embed", {"GPU": 1}, {"cpu-0": {"CPU": 1.0}}, allow_cpu_fallback=True)
    assert got == {"CPU": 1.0}
    record = next(r for r in caplog.records if r.name == "sage_prefect.dask_gpu")
    assert record.levelno == logging.WARNING
    assert "embed" in record.getMessage() and "GPU" in record.getMessage()


# --- GPU discovery ---------------------------------------------------------------------


def _fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: str, code: int = 0) -> None:
    script = tmp_path / "nvidia-smi"
    # PATH will hold only tmp_path: use shell builtins, no cat.
    script.write_text(f"#!/bin/sh\nprintf '%s' '{output}'\nexit {code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(tmp_path))


NVIDIA_SMI_OUT = (
    "0, GPU-aaaa-1111, NVIDIA H100 80GB HBM3, 81559\n1, GPU-bbbb-2222, NVIDIA H100 80GB HBM3, [N/A]\n"
)


@pytest.mark.parametrize("value", ["", "-1"])
def test_detect_gpus_hidden_by_cuda_visible_devices(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_nvidia_smi(tmp_path, monkeypatch, NVIDIA_SMI_OUT)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert detect_gpus() == []


def test_detect_gpus_parses_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_nvidia_smi(tmp_path, monkeypatch, NVIDIA_SMI_OUT)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert detect_gpus() == [
        GPUInfo(index=0, name="NVIDIA H100 80GB HBM3", memory_mib=81559),
        GPUInfo(index=1, name="NVIDIA H100 80GB HBM3", memory_mib=None),
    ]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [g.index for g in detect_gpus()] == [1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa")
    assert [g.index for g in detect_gpus()] == [0]


def test_detect_gpus_without_working_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi at all
    assert detect_gpus() == []
    _fake_nvidia_smi(tmp_path, monkeypatch, "NVIDIA-SMI has failed\n", code=9)
    assert detect_gpus() == []


# --- process workers -----------------------------------------------------------------


def _env_of_worker(dask_worker: object) -> tuple[str, str | None, str | None, int]:
    name = str(getattr(dask_worker, "name", ""))
    return name, os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("SAGE_TEST_MARKER"), os.getpid()


def test_process_workers_get_env_and_pinning_and_close_cleanly() -> None:
    marker = {"SAGE_TEST_MARKER": "hello"}
    with local_cluster(n_gpu_workers=1, n_cpu_workers=1, processes=True, env=marker) as c, Client(c) as cl:
        seen = {name: (cvd, marker, pid) for name, cvd, marker, pid in cl.run(_env_of_worker).values()}
    assert set(seen) == {"gpu-0", "cpu-0"}
    assert seen["cpu-0"][:2] == ("", "hello")
    gpu_pin, gpu_marker, _ = seen["gpu-0"]
    assert gpu_pin is not None and gpu_pin.isdigit() and gpu_marker == "hello"
    pids = [pid for _, _, pid in seen.values()]
    assert os.getpid() not in pids
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=10)
    assert not alive, alive


# --- serve_cluster / runner -------------------------------------------------------------


def test_serve_cluster_in_a_thread_accepts_clients() -> None:
    port = _free_port()
    stop = threading.Event()
    ready: list[str] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            serve_cluster(
                scheduler_port=port,
                n_gpu_workers=1,
                n_cpu_workers=1,
                processes=False,
                on_ready=ready.append,
                stop_event=stop,
            )
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        for _ in range(300):
            if ready or errors:
                break
            stop.wait(0.1)
        assert not errors, errors
        assert ready == [f"tcp://127.0.0.1:{port}"]
        assert cluster_address_reachable(ready[0], timeout=3)
        with Client(f"tcp://127.0.0.1:{port}") as cl:
            assert worker_resources(cl) == {"gpu-0": {"GPU": 1.0}, "cpu-0": {"CPU": 1.0}}
            with annotate({"GPU": 1}):
                assert cl.submit(_worker_name, 0, pure=False).result() == "gpu-0"
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert not errors, errors
    assert not cluster_address_reachable(f"tcp://127.0.0.1:{port}", timeout=1)


def test_serve_cluster_port_in_use_fails_cleanly() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = {t.ident for t in threading.enumerate()}
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}"):
            serve_cluster(scheduler_port=port, n_gpu_workers=0, n_cpu_workers=1, processes=False)
        leftover = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
        assert not leftover, leftover


def test_cluster_address_reachable_false_for_nothing_or_non_dask() -> None:
    assert not cluster_address_reachable(f"tcp://127.0.0.1:{_free_port()}", timeout=0.5)
    assert not cluster_address_reachable("not an address", timeout=0.5)
    with socket.socket() as silent:  # accepts connections, never speaks Dask
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        assert not cluster_address_reachable(f"tcp://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)


def test_task_runner_connects_to_address() -> None:
    runner = task_runner("tcp://127.0.0.1:8786")
    assert runner.address == "tcp://127.0.0.1:8786"
