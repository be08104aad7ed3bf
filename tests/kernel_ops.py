"""Operators used by the kernel tests (a module, so process workers can import them by path)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from sage_prefect import FlatMapFunction, KeyByFunction, LanceSink, MapFunction, SourceFunction
from sage_prefect.data import SinkOption


class Upper(MapFunction):
    def execute(self, data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "text": data["text"].upper()}


class WhereAmI(MapFunction):
    """Records which Dask worker ran the record (placement tests)."""

    def execute(self, data: dict[str, Any]) -> dict[str, Any]:
        from distributed import get_worker

        return {**data, f"worker_{self.config.get('tag', 'x')}": get_worker().name}


class Mark(MapFunction):
    """Leaves a marker file per partition it has processed (pipelining test)."""

    def execute_batch(self, table: pa.Table) -> pa.Table:
        Path(self.config["dir"], f"{self.config['tag']}-{table['id'][0].as_py()}").write_text("done")
        return table


class WaitForMark(MapFunction):
    """On the partition starting at ``hold_id``, waits until another stage has marked partition 0.

    With a barrier between stages this can never happen: the run would fail after ``timeout``.
    """

    def execute_batch(self, table: pa.Table) -> pa.Table:
        if table["id"][0].as_py() == int(self.config["hold_id"]):
            marker = Path(self.config["dir"], f"{self.config['tag']}-0")
            deadline = time.monotonic() + float(self.config.get("timeout", 60))
            while not marker.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError("downstream stage never ran partition 0: stages are not pipelined")
                time.sleep(0.05)
        return table


class FlakyUntil(MapFunction):
    """Fails the first ``fail_times`` attempts of every partition; counts attempts in files."""

    def execute_batch(self, table: pa.Table) -> pa.Table:
        first_id = table["id"][0].as_py()
        counter = Path(self.config["dir"]) / f"attempts-{first_id}"
        attempts = int(counter.read_text()) + 1 if counter.exists() else 1
        counter.write_text(str(attempts))
        if attempts <= int(self.config["fail_times"]):
            raise ValueError(f"flaky failure {attempts}")
        return table


class FailOn(MapFunction):
    def execute(self, data: dict[str, Any]) -> dict[str, Any]:
        if data["id"] == self.config["id"]:
            raise ZeroDivisionError("boom")
        return data


class NotADict(MapFunction):
    def execute(self, data: dict[str, Any]) -> Any:
        return [data["id"]] if data["id"] == self.config.get("id", 3) else data


class BatchPreferred(MapFunction):
    """Per-record ``execute`` raises: the kernel must take ``execute_batch``."""

    def execute(self, data: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("execute_batch should have been preferred")

    def execute_batch(self, table: pa.Table) -> pa.Table:
        return table.append_column("batched", pa.array([True] * table.num_rows))


class Counted(MapFunction):
    """Counts executions in a file (cache test)."""

    def execute_batch(self, table: pa.Table) -> pa.Table:
        path = Path(self.config["file"])
        with path.open("a") as handle:
            handle.write(f"{os.getpid()}\n")
        return table.append_column("doubled", pa.compute.multiply(table["id"], 2))


class Sleep(MapFunction):
    def execute(self, data: dict[str, Any]) -> dict[str, Any]:
        time.sleep(float(self.config["seconds"]))
        return data


class ByMod(KeyByFunction):
    def execute(self, data: dict[str, Any]) -> Any:
        return f"k{data['id'] % int(self.config.get('keys', 5))}"


class PartitionTag(MapFunction):
    """Tags each record with an id of the partition it was processed in."""

    def execute_batch(self, table: pa.Table) -> pa.Table:
        import uuid

        return table.append_column("pid", pa.array([uuid.uuid4().hex] * table.num_rows))


class Words(FlatMapFunction):
    def execute(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"id": data["id"], "word": w} for w in data["text"].split()]


class Counter(SourceFunction):
    def setup(self) -> None:
        self.i = 0

    def execute(self) -> dict[str, Any] | None:
        if self.i >= int(self.config["n"]):
            return None
        self.i += 1
        return {"id": self.i - 1, "text": f"doc {self.i - 1}"}


class FailAfterWrite(LanceSink):
    """Writes the partition, then fails once per partition: the retry must not duplicate rows."""

    options: ClassVar[dict[str, SinkOption]] = {
        **LanceSink.options,
        "marker_dir": SinkOption((str,), required=True),
    }

    def write_partition(self, table: pa.Table, partition_key: str) -> int:
        rows = super().write_partition(table, partition_key)
        marker = Path(self.config["marker_dir"]) / f"failed-{partition_key}"
        if not marker.exists():
            marker.write_text("1")
            raise OSError("connection lost after the write")
        return rows
