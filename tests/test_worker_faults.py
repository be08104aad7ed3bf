"""Dask workers dying under a pipeline: one death is survived, a partition that keeps killing
its workers fails the run naming the operator, the partition and the lost workers.

Real process workers under nannies (a dead worker is restarted), on a scheduler that allows
one death per task (``distributed.scheduler.allowed-failures=1``: the second death of a task
raises Dask's ``KilledWorker``). The operators below kill their own worker process with
``os._exit`` on the partition holding record ``KILL_ID``: on every attempt, or on the first
attempt only (a marker file). The sinks die half-way through writing that partition.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, ClassVar

import dask
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sage_prefect import DaskEnvironment, LanceSink, MapFunction, ParquetSink
from sage_prefect.common.errors import OperatorError, WorkerLostError
from sage_prefect.data import SinkOption

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("prefect_api")]

N = 40
BATCH = 10
DOCS = [{"id": i, "text": f"doc {i}"} for i in range(N)]
KILL_ID = 22  # in partition 2 of 4
KILL_PARTITION = KILL_ID // BATCH


def _dies_now(config: dict[str, Any], table: pa.Table) -> bool:
    """Whether this attempt kills its worker: it holds ``KILL_ID`` and it is not past a first death
    (with ``once``, a marker file records the first death)."""
    if KILL_ID not in table["id"].to_pylist():
        return False
    once = config.get("once")
    if once is None:
        return True
    if Path(once).exists():
        return False
    Path(once).write_text(str(os.getpid()))
    return True


def _wait_until_alone() -> None:
    """Wait until no other task is processing anywhere in the cluster (at most 30 s).

    A worker's death counts against every task the scheduler had assigned to it, and a task
    whose result lived on it is recomputed: with one allowed death, a task of another
    partition that happened to share both dying workers would be lost too. Dying alone keeps
    the partition that is lost the one that kills.
    """
    from distributed import get_client, get_worker

    me = get_worker().get_current_task()
    client = get_client()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if {key for keys in client.processing().values() for key in keys} <= {me}:
            return
        time.sleep(0.1)


def _die() -> None:
    sys.stdout.flush()
    os._exit(1)


class KillWorkerOn(MapFunction):
    """A map stage whose worker dies on the partition holding ``KILL_ID``."""

    def execute_batch(self, table: pa.Table) -> pa.Table:
        if KILL_ID in table["id"].to_pylist():
            _wait_until_alone()
            if _dies_now(self.config, table):
                _die()
        return table


class DyingParquetSink(ParquetSink):
    """Dies with half of the partition holding ``KILL_ID`` in its temp file."""

    options: ClassVar[dict[str, SinkOption]] = {**ParquetSink.options, "once": SinkOption((str,))}

    def write_partition(self, table: pa.Table, partition_key: str) -> int:
        if KILL_ID in table["id"].to_pylist():
            _wait_until_alone()
        return super().write_partition(table, partition_key)

    def _write(self, table: pa.Table, handle: IO[bytes]) -> None:
        if _dies_now(self.config, table):
            pq.write_table(table.slice(0, table.num_rows // 2), handle)
            handle.flush()
            _die()
        super()._write(table, handle)


class DyingLanceSink(LanceSink):
    """Commits half of the partition holding ``KILL_ID``, then dies."""

    options: ClassVar[dict[str, SinkOption]] = {**LanceSink.options, "once": SinkOption((str,))}

    def write_partition(self, table: pa.Table, partition_key: str) -> int:
        if KILL_ID in table["id"].to_pylist():
            _wait_until_alone()
            if _dies_now(self.config, table):
                super().write_partition(table.slice(0, table.num_rows // 2), partition_key)
                _die()
        return super().write_partition(table, partition_key)


def _parquet_ids(path: Path) -> list[int]:
    return sorted(pq.read_table(path)["id"].to_pylist())


def _lance_ids(uri: Path) -> list[int]:
    import lancedb

    return sorted(lancedb.connect(str(uri)).open_table("docs").to_arrow()["id"].to_pylist())


SINKS = {
    "parquet": (DyingParquetSink, ParquetSink, lambda tmp: {"path": str(tmp / "pq")}, _parquet_ids, "pq"),
    "lance": (
        DyingLanceSink,
        LanceSink,
        lambda tmp: {"uri": str(tmp / "lance"), "table": "docs"},
        _lance_ids,
        "lance",
    ),
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Two one-thread process workers under nannies; one death per task is allowed."""
    from sage_prefect.dask_gpu import local_cluster

    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):  # read when the scheduler starts
        started = local_cluster(
            n_gpu_workers=0,
            n_cpu_workers=2,
            processes=True,
            host="127.0.0.1",
            env={"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},  # workers import this module
        )
    try:
        yield started
    finally:
        started.close()


def _env(cluster: Any) -> DaskEnvironment:
    """A pipeline environment on ``cluster`` once both its workers are up (a nanny restarts a
    killed worker, which takes a few seconds)."""
    from distributed import Client

    with Client(cluster.scheduler_address, set_as_default=False) as client:
        client.wait_for_workers(2, timeout=60)
    return DaskEnvironment(
        f"faults-{uuid.uuid4().hex[:6]}", address=cluster.scheduler_address, batch_size=BATCH, progress=False
    )


@pytest.mark.parametrize("sink", sorted(SINKS))
def test_a_worker_killed_mid_write_once_is_survived_with_exactly_n_rows(
    cluster: Any, tmp_path: Path, sage_home: Path, sink: str
) -> None:
    dying, _plain, config, read_ids, target = SINKS[sink]
    once = tmp_path / "died"
    env = _env(cluster)
    env.from_batch(DOCS).sink(dying, {**config(tmp_path), "once": str(once)})

    result = env.submit()

    assert once.exists()  # a worker did die half-way through partition 2
    assert result.sinks == {dying.__name__: N}
    assert read_ids(tmp_path / target) == list(range(N))  # exactly N rows: no duplicates, none lost


@pytest.mark.parametrize("sink", sorted(SINKS))
def test_a_partition_that_keeps_killing_its_workers_is_named_and_a_rerun_writes_n_rows(
    cluster: Any, tmp_path: Path, sage_home: Path, sink: str
) -> None:
    dying, plain, config, read_ids, target = SINKS[sink]
    env = _env(cluster)
    env.from_batch(DOCS).sink(dying, config(tmp_path))

    with pytest.raises(WorkerLostError) as info:
        env.submit()

    exc = info.value
    assert isinstance(exc, OperatorError)  # code handling a failed partition handles this too
    assert (exc.operator, exc.partition) == (dying.__name__, KILL_PARTITION)  # type: ignore[attr-defined]
    assert exc.partition_key.startswith(f"p{KILL_PARTITION}-")  # type: ignore[attr-defined]
    workers = exc.workers  # type: ignore[attr-defined]
    assert len(workers) == 2  # allowed-failures=1: the second death is the last
    assert exc.also_lost == []  # type: ignore[attr-defined]
    for address in workers:
        assert address.startswith("tcp://127.0.0.1:")
        assert address in str(exc)
    assert f"operator {dying.__name__!r}" in str(exc) and f"partition {KILL_PARTITION} " in str(exc)
    assert "allowed-failures=1" in str(exc)
    assert exc.flow_run_id  # type: ignore[attr-defined]

    rerun = _env(cluster)
    rerun.from_batch(DOCS).sink(plain, config(tmp_path))
    assert rerun.submit().rows == N
    assert read_ids(tmp_path / target) == list(range(N))  # the half-written partition was replaced


def test_a_map_stage_that_keeps_killing_its_workers_is_named(
    cluster: Any, tmp_path: Path, sage_home: Path
) -> None:
    out = tmp_path / "pq"
    env = _env(cluster)
    env.from_batch(DOCS).map(KillWorkerOn, {"out": str(out)}).sink(ParquetSink, {"path": str(out)})

    with pytest.raises(
        WorkerLostError, match=r"operator 'KillWorkerOn' \(map, stage 1\), partition 2 "
    ) as info:
        env.submit()

    assert len(info.value.workers) == 2  # type: ignore[attr-defined]
    assert _parquet_ids(out) == [i for i in range(N) if i // BATCH != KILL_PARTITION]  # the others are in


def test_an_operator_the_workers_cannot_import_is_named(
    cluster: Any, tmp_path: Path, sage_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The driver can import it, the process workers cannot: unpickling the task breaks each
    # worker's connection to the scheduler, which counts as a worker death, until KilledWorker.
    (tmp_path / "driver_only_ops.py").write_text(
        "from sage_prefect import MapFunction\n\n"
        "class DriverOnly(MapFunction):\n"
        "    def execute(self, data):\n"
        "        return data\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from driver_only_ops import DriverOnly  # type: ignore[import-not-found]

    env = _env(cluster)
    env.from_batch(DOCS[:5]).map(DriverOnly).sink(ParquetSink, {"path": str(tmp_path / "pq")})

    with pytest.raises(
        WorkerLostError, match=r"operator 'DriverOnly' \(map, stage 1\), partition 0 .*cannot import"
    ):
        env.submit()


def test_a_worker_killed_again_while_restarting_keeps_its_nanny() -> None:
    # SpecCluster closes a nanny when no worker of its name is back lost-worker-timeout after a
    # removal, checking the name when the timer fires: a worker being restarted again at that
    # instant lost its nanny for good, and a cluster that lost every nanny hangs the next run.
    from distributed import Client

    from sage_prefect.dask_gpu import local_cluster

    timeout = 8.0
    with (
        dask.config.set({"distributed.deploy.lost-worker-timeout": f"{timeout}s"}),
        local_cluster(n_gpu_workers=0, n_cpu_workers=1, processes=True, host="127.0.0.1") as cluster,
        Client(cluster.scheduler_address, set_as_default=False) as client,
    ):
        client.wait_for_workers(1, timeout=60)
        kills = 0
        deadline = time.monotonic() + timeout + 2  # past the first removal's timer
        while time.monotonic() < deadline:  # kill the worker whenever it is back
            for address in list(client.scheduler_info()["workers"]):
                with contextlib.suppress(Exception):
                    os.kill(client.run(os.getpid, workers=[address])[address], signal.SIGKILL)
                    kills += 1
            time.sleep(0.05)
        assert kills >= 2

        client.wait_for_workers(1, timeout=30)  # its nanny restarted it once left alone
        assert list(cluster.workers) == ["cpu-0"]
