"""Embeddings through the gateway: 2,000 single-text requests at concurrency 64, coalesced.

Side by side in one run, the same 2,000 texts (English-like sentences of 8-60 words, seeded):
  direct       ``SentenceTransformer.encode(texts, batch_size=64)`` in this process with 2 torch
               threads (both cores): the limit; one call that sees every text, sorts them all
               by length and runs full, evenly padded batches
  gateway      the control plane in a subprocess, 2,000 requests of one text each from 64
               concurrent clients (``openai.AsyncOpenAI``, closed loop); the scheduler coalesces
               them (shipped defaults: ``max_batch_size`` 64, ``max_wait_ms`` 5). The server runs
               2 replicas of the model with 1 torch thread each (``OMP_NUM_THREADS=1``), the
               shape that holds up while the client and the HTTP server share the two cores;
               for reference, 1 replica with 2 torch threads on a subset (``--reference-requests``)
  uncoalesced  one request at a time (concurrency 1) through a gateway with
               ``max_batch_size: 1``: every text is its own forward pass, as a per-request
               server does; on a subset (``--uncoalesced-requests``), reported as a rate, with
               2 torch threads and with 1; the faster is the baseline. For reference also that
               gateway at concurrency 64, and ``encode`` one text per call in-process.

Direct and gateway alternate ``--repeats`` times and the best run of each is reported (the
machine is shared; the best run is the least disturbed one). The gateway's client, its HTTP
server and torch share the same two cores, which the direct run has to itself: the CPU time
per text of the server and of the client is recorded for that reason.

Run:  .venv/bin/python benchmarks/embeddings.py [--requests 2000] [--concurrency 64]
          [--uncoalesced-requests 300] [--reference-requests 500] [--repeats 2]
Writes benchmarks/results/embeddings.json and prints texts/s, the ratios gateway/direct
(goal >= 0.85) and gateway/uncoalesced (goal >= 5), and the mean coalesced batch size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import git_commit  # noqa: E402
from _gateway import (  # noqa: E402
    EMBEDDING_MODEL,
    cpu_seconds,
    gateway,
    make_texts,
    metric_sums,
    percentile,
)

from sage_prefect.controlplane.server import Background  # noqa: E402

GOAL_VS_DIRECT = 0.85
GOAL_VS_UNCOALESCED = 5.0


def gateway_config(replicas: int, max_batch_size: int | None = None) -> dict[str, Any]:
    model = {
        "name": EMBEDDING_MODEL,
        "kind": "embedding",
        "engine": "sentence-transformers",
        "device": "cpu",
        "replicas": replicas,
    }
    config: dict[str, Any] = {"models": [model]}
    if max_batch_size is not None:
        config["batching"] = {"max_batch_size": max_batch_size}
    return config


def run_direct(model: Any, texts: list[str]) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    vectors = model.encode(texts, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
    return time.perf_counter() - start, vectors


def run_direct_one_by_one(model: Any, texts: list[str]) -> float:
    start = time.perf_counter()
    for text in texts:
        model.encode([text], batch_size=1, show_progress_bar=False)
    return time.perf_counter() - start


async def run_clients(
    base_url: str, texts: list[str], concurrency: int, progress: Any = None
) -> tuple[float, list[float], np.ndarray]:
    """Closed loop: ``concurrency`` clients, each sends its next single-text request as soon as
    the last one is answered. Returns (seconds, per-request latencies, vectors in text order)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="sk-local", max_retries=0, timeout=300)
    vectors: list[Any] = [None] * len(texts)
    latencies: list[float] = []
    task = progress.add_task(f"concurrency {concurrency}", total=len(texts)) if progress else None
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(texts):
            i = next_index
            next_index += 1
            t0 = time.perf_counter()
            response = await client.embeddings.create(model=EMBEDDING_MODEL, input=texts[i])
            latencies.append(time.perf_counter() - t0)
            vectors[i] = response.data[0].embedding
            if progress is not None:
                progress.advance(task)

    try:
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    finally:
        await client.close()
        if progress is not None:
            progress.remove_task(task)
    return seconds, latencies, np.asarray(vectors, dtype=np.float32)


def measure_gateway(bg: Background, texts: list[str], concurrency: int, progress: Any) -> dict[str, Any]:
    asyncio.run(run_clients(bg.base_url, texts[: 2 * concurrency], concurrency))  # warm-up
    before = metric_sums(bg.url, "sage_embedding_batch_size")
    server_cpu, client_cpu = cpu_seconds(bg.process.pid), time.process_time()
    seconds, latencies, vectors = asyncio.run(run_clients(bg.base_url, texts, concurrency, progress))
    server_cpu, client_cpu = cpu_seconds(bg.process.pid) - server_cpu, time.process_time() - client_cpu
    after = metric_sums(bg.url, "sage_embedding_batch_size")
    inputs, batches = after[0] - before[0], after[1] - before[1]
    return {
        "requests": len(texts),
        "concurrency": concurrency,
        "seconds": round(seconds, 3),
        "texts_per_s": round(len(texts) / seconds, 1),
        "latency_p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "latency_p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "batches": int(batches),
        "mean_batch_size": round(inputs / batches, 1) if batches else None,
        "cpu_ms_per_text": {
            "server": round(server_cpu / len(texts) * 1000, 2),
            "client": round(client_cpu / len(texts) * 1000, 2),
        },
        "_vectors": vectors,
    }


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--uncoalesced-requests", type=int, default=300)
    parser.add_argument("--reference-requests", type=int, default=500, help="1 replica x 2 threads run")
    parser.add_argument("--repeats", type=int, default=2, help="direct and gateway runs, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "embeddings.json")
    args = parser.parse_args()

    import sentence_transformers
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from sage_prefect.controlplane.engines.sentence_transformers import resolve_model

    console = Console(width=max(130, Console().width))
    torch.set_num_threads(2)
    load_before = os.getloadavg()[0]
    texts = make_texts(args.requests, seed=args.seed)
    subset = texts[: args.uncoalesced_requests]
    model = sentence_transformers.SentenceTransformer(resolve_model(EMBEDDING_MODEL), device="cpu")
    tokens = [len(ids) for ids in model.tokenizer(texts)["input_ids"]]
    model.encode(texts[:128], batch_size=64, show_progress_bar=False)  # warm-up

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    )
    c = args.concurrency
    direct_runs: list[float] = []
    gateway_runs: list[dict[str, Any]] = []
    reference: np.ndarray | None = None
    say = progress.console.print
    with progress:
        say("gateway: 2 replicas x 1 torch thread ...")
        with gateway(gateway_config(2), torch_threads=1) as bg:
            for _ in range(args.repeats):
                say("direct encode ...")
                seconds, reference = run_direct(model, texts)
                direct_runs.append(seconds)
                gateway_runs.append(measure_gateway(bg, texts, c, progress))
        say("direct encode, one text per call ...")
        direct_single_s = run_direct_one_by_one(model, subset)
        say("gateway: 1 replica x 2 torch threads (reference) ...")
        with gateway(gateway_config(1), torch_threads=2) as bg:
            two_threads = measure_gateway(bg, texts[: args.reference_requests], c, progress)
        say("uncoalesced: max_batch_size 1, 2 replicas x 1 torch thread ...")
        with gateway(gateway_config(2, max_batch_size=1), torch_threads=1) as bg:
            unc_one_thread = measure_gateway(bg, subset, 1, progress)
            unc_concurrent = measure_gateway(bg, subset, c, progress)
        say("uncoalesced: max_batch_size 1, 1 replica x 2 torch threads ...")
        with gateway(gateway_config(1, max_batch_size=1), torch_threads=2) as bg:
            unc_two_threads = measure_gateway(bg, subset, 1, progress)

    assert reference is not None
    direct_s = min(direct_runs)
    direct_tput = len(texts) / direct_s
    best = max(gateway_runs, key=lambda r: r["texts_per_s"])
    agreement = cosine_min(best["_vectors"], reference)
    uncoalesced = max(unc_one_thread, unc_two_threads, key=lambda r: r["texts_per_s"])
    for run in (*gateway_runs, two_threads, unc_one_thread, unc_two_threads, unc_concurrent):
        run.pop("_vectors", None)
    report = {
        "command": " ".join([".venv/bin/python", "benchmarks/embeddings.py", *sys.argv[1:]]),
        "git_commit": git_commit(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, sentence-transformers {sentence_transformers.__version__}",
        "load_average_1min_before": round(load_before, 2),
        "model": EMBEDDING_MODEL,
        "texts": {
            "count": len(texts),
            "seed": args.seed,
            "words": "8-60",
            "tokens_mean": round(sum(tokens) / len(tokens), 1),
            "tokens_max": max(tokens),
        },
        "direct": {
            "torch_threads": 2,
            "seconds": round(direct_s, 3),
            "texts_per_s": round(direct_tput, 1),
            "runs_s": [round(s, 3) for s in direct_runs],
        },
        "direct_one_text_per_call": {
            "torch_threads": 2,
            "texts": len(subset),
            "seconds": round(direct_single_s, 3),
            "texts_per_s": round(len(subset) / direct_single_s, 1),
        },
        "gateway": {"shape": "2 replicas x 1 torch thread", **best},
        "gateway_runs_texts_per_s": [r["texts_per_s"] for r in gateway_runs],
        "gateway_1_replica_2_threads": {"shape": "1 replica x 2 torch threads", **two_threads},
        "uncoalesced_1_thread": {"shape": "max_batch_size 1, 2 replicas x 1 torch thread", **unc_one_thread},
        "uncoalesced_2_threads": {
            "shape": "max_batch_size 1, 1 replica x 2 torch threads",
            **unc_two_threads,
        },
        "uncoalesced_concurrent": {
            "shape": "max_batch_size 1, 2 replicas x 1 torch thread",
            **unc_concurrent,
        },
        "uncoalesced_baseline": "uncoalesced_1_thread"
        if uncoalesced is unc_one_thread
        else "uncoalesced_2_threads",
        "gateway_vs_direct_min_cosine": round(agreement, 6),
        "ratios": {
            "gateway_vs_direct": round(best["texts_per_s"] / direct_tput, 3),
            "gateway_vs_uncoalesced": round(best["texts_per_s"] / uncoalesced["texts_per_s"], 2),
        },
        "goals": {"gateway_vs_direct": GOAL_VS_DIRECT, "gateway_vs_uncoalesced": GOAL_VS_UNCOALESCED},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    table = Table(
        title=f"{len(texts):,} texts ({report['texts']['tokens_mean']} tokens mean), {EMBEDDING_MODEL}; "
        f"{report['machine']}"
    )
    columns = (
        "contender",
        "texts",
        "texts/s",
        "vs direct",
        "vs uncoal.",
        "batch",
        "p50/p99 ms",
        "CPU ms/text",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "contender" else "right")
    unc = uncoalesced["texts_per_s"]
    rows: list[tuple[str, int, float, Any, dict[str, Any] | None]] = [
        ("direct encode(batch_size=64), 2 threads", len(texts), direct_tput, 64, None),
        (
            "direct, one text per encode call",
            len(subset),
            report["direct_one_text_per_call"]["texts_per_s"],
            1,
            None,
        ),
        (
            f"gateway, conc. {c}, 2 replicas x 1 thread",
            len(texts),
            best["texts_per_s"],
            best["mean_batch_size"],
            best,
        ),
        (
            f"gateway, conc. {c}, 1 replica x 2 threads",
            two_threads["requests"],
            two_threads["texts_per_s"],
            two_threads["mean_batch_size"],
            two_threads,
        ),
        ("uncoalesced, conc. 1, 1 thread", len(subset), unc_one_thread["texts_per_s"], 1, unc_one_thread),
        ("uncoalesced, conc. 1, 2 threads", len(subset), unc_two_threads["texts_per_s"], 1, unc_two_threads),
        (
            f"uncoalesced, conc. {c}, 2 x 1 thread",
            len(subset),
            unc_concurrent["texts_per_s"],
            1,
            unc_concurrent,
        ),
    ]
    for name, n, tput, batch, run in rows:
        lat = cpu = "-"
        if run is not None:
            lat = f"{run['latency_p50_ms']:.0f}/{run['latency_p99_ms']:.0f}"
            cpu = f"{run['cpu_ms_per_text']['server']}+{run['cpu_ms_per_text']['client']}"
        table.add_row(
            name,
            f"{n:,}",
            f"{tput:,.1f}",
            f"{tput / direct_tput:.2f}x",
            f"{tput / unc:.1f}x",
            str(batch),
            lat,
            cpu,
        )
    console.print(table)
    ratios = report["ratios"]
    console.print(
        f"gateway/direct {ratios['gateway_vs_direct']}x (goal >= {GOAL_VS_DIRECT}), "
        f"gateway/uncoalesced {ratios['gateway_vs_uncoalesced']}x (goal >= {GOAL_VS_UNCOALESCED}); "
        f"CPU ms/text = server + client; min cosine gateway vs direct {report['gateway_vs_direct_min_cosine']}"
    )
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
