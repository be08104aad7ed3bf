"""Pipeline overhead: 100k records through three map stages of ~50 µs real work each.

Side by side in one run (same records, same work functions):
  plain     a single-process Python loop (the limit for one core)
  sage      sage-prefect: LocalEnvironment (Prefect flow on a local Dask cluster, process
            workers), three ``.map`` stages, ``CollectSink``; cold run (starts the ephemeral
            Prefect API and the cluster) and warm run (same environment again)
  per-task  a hand-written Prefect flow with one task per record (default thread-pool task
            runner), on 2,000 records and scaled by its throughput

Run:  .venv/bin/python benchmarks/pipeline_overhead.py [--records 100000] [--per-task-records 2000]
Writes benchmarks/results/pipeline_overhead.json and prints the ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from _common import git_commit  # noqa: E402

TOKEN = re.compile(r"\w+")
ROUNDS = 1  # set by calibrate(); shipped to workers inside the operator config


def work(text: str, salt: bytes, rounds: int) -> str:
    """Real per-record work: tokenise the text, then chain-hash it ``rounds`` times."""
    tokens = TOKEN.findall(text.lower())
    digest = hashlib.blake2b(" ".join(tokens).encode(), key=salt).digest()
    for _ in range(rounds):
        digest = hashlib.blake2b(digest, key=salt).digest()
    return digest.hex()


def calibrate(target_us: float = 50.0) -> int:
    """Rounds of hashing that make one ``work`` call take about ``target_us`` on this machine."""
    text = make_records(1)[0]["text"]
    rounds = 1
    while True:
        start = time.perf_counter()
        for _ in range(2000):
            work(text, b"s1", rounds)
        per_call = (time.perf_counter() - start) / 2000 * 1e6
        if per_call >= target_us:
            return rounds
        rounds = max(rounds + 1, int(rounds * target_us / per_call))


def make_records(n: int) -> list[dict[str, Any]]:
    words = [
        "pipeline",
        "dataflow",
        "prefect",
        "dask",
        "arrow",
        "lance",
        "vector",
        "embedding",
        "retrieval",
        "agent",
        "tool",
    ]
    return [
        {"id": i, "text": f"doc {i} " + " ".join(words[(i + k) % len(words)] for k in range(24))}
        for i in range(n)
    ]


def stage(record: dict[str, Any], salt: bytes, rounds: int) -> dict[str, Any]:
    return {**record, "h_" + salt.decode(): work(record["text"], salt, rounds)}


SALTS = (b"s1", b"s2", b"s3")


def run_plain(records: list[dict[str, Any]], rounds: int) -> tuple[float, int]:
    start = time.perf_counter()
    out = []
    for record in records:
        for salt in SALTS:
            record = stage(record, salt, rounds)
        out.append(record)
    return time.perf_counter() - start, len(out)


def run_sage(records: list[dict[str, Any]], rounds: int, batch_size: int) -> dict[str, float]:
    from sage_prefect import CollectSink, LocalEnvironment, MapFunction

    class Stage(MapFunction):
        def execute(self, data: dict[str, Any]) -> dict[str, Any]:
            return stage(data, self.config["salt"].encode(), self.config["rounds"])

    env = LocalEnvironment("pipeline-overhead", batch_size=batch_size, progress=False)
    stream = env.from_batch(records)
    for salt in SALTS:
        stream = stream.map(Stage, {"salt": salt.decode(), "rounds": rounds}, name=f"Stage_{salt.decode()}")
    stream.sink(CollectSink)
    timings: dict[str, float] = {}
    try:
        for label in ("cold", "warm", "warm2"):
            start = time.perf_counter()
            result = env.submit()
            timings[label] = time.perf_counter() - start
            assert result.collected is not None and result.collected.num_rows == len(records)  # type: ignore[union-attr]
        timings["tasks"] = result.tasks
        timings["workers"] = len(env.cluster.workers)
    finally:
        env.close()
    return timings


def run_per_task(records: list[dict[str, Any]], rounds: int) -> float:
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    @task(cache_policy=NO_CACHE, persist_result=False)
    def process(record: dict[str, Any]) -> dict[str, Any]:
        for salt in SALTS:
            record = stage(record, salt, rounds)
        return record

    @flow
    def per_record(items: list[dict[str, Any]]) -> int:
        futures = [process.submit(r) for r in items]
        return len([f.result() for f in futures])

    per_record(records[:10])  # warm-up: the ephemeral API is already up from the sage runs
    start = time.perf_counter()
    assert per_record(records) == len(records)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--per-task-records", type=int, default=2_000)
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "pipeline_overhead.json"
    )
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console()
    rounds = calibrate()
    records = make_records(args.records)
    with console.status("plain loop ..."):
        plain_s, _ = run_plain(records, rounds)
    per_call_us = plain_s / (len(records) * 3) * 1e6
    with console.status("sage-prefect (cold, warm, warm) ..."):
        sage = run_sage(records, rounds, args.batch_size)
    with console.status(f"Prefect, one task per record, {args.per_task_records} records ..."):
        per_task_s = run_per_task(records[: args.per_task_records], rounds)

    plain_tput = len(records) / plain_s
    sage_warm = min(sage["warm"], sage["warm2"])
    sage_tput = len(records) / sage_warm
    sage_cold_tput = len(records) / sage["cold"]
    per_task_tput = args.per_task_records / per_task_s
    report = {
        "command": "python " + " ".join(sys.argv),
        "git_commit": git_commit(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "records": len(records),
        "stage_work_us_per_record": round(per_call_us, 1),
        "batch_size": args.batch_size,
        "sage_workers": sage["workers"],
        "sage_tasks": sage["tasks"],
        "throughput_rps": {
            "plain_loop": round(plain_tput),
            "sage_warm": round(sage_tput),
            "sage_cold": round(sage_cold_tput),
            "prefect_task_per_record": round(per_task_tput, 1),
        },
        "seconds": {
            "plain_loop": round(plain_s, 2),
            "sage_cold": round(sage["cold"], 2),
            "sage_warm": round(sage_warm, 2),
            "prefect_task_per_record": round(per_task_s, 2),
            "prefect_task_per_record_scaled_to_records": round(
                per_task_s * len(records) / args.per_task_records, 1
            ),
        },
        "ratios": {
            "sage_warm_vs_plain": round(sage_tput / plain_tput, 2),
            "sage_cold_vs_plain": round(sage_cold_tput / plain_tput, 2),
            "sage_warm_vs_task_per_record": round(sage_tput / per_task_tput, 1),
            "sage_cold_vs_task_per_record": round(sage_cold_tput / per_task_tput, 1),
        },
        "goals": {"vs_plain": 0.8, "vs_task_per_record": 20},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    table = Table(title=f"{len(records):,} records x 3 stages of ~{per_call_us:.0f} µs ({report['machine']})")
    table.add_column("contender")
    table.add_column("records/s", justify="right")
    table.add_column("vs plain", justify="right")
    table.add_column("vs task-per-record", justify="right")
    for name, tput in (
        ("plain Python loop", plain_tput),
        ("sage-prefect (warm)", sage_tput),
        ("sage-prefect (cold: API + cluster start)", sage_cold_tput),
        (f"Prefect task per record ({args.per_task_records:,})", per_task_tput),
    ):
        table.add_row(name, f"{tput:,.0f}", f"{tput / plain_tput:.2f}x", f"{tput / per_task_tput:.1f}x")
    console.print(table)
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
