"""Interference: interactive chat at a steady rate while a bulk embedding job saturates the device.

One gateway config serves an LLM (``sage-tiny-random-lm`` on the ``transformers`` engine) and
the embedding model (all-MiniLM-L6-v2, ``--embedding-replicas`` replicas) on the same
``device: cpu``; the gateway runs one torch thread per engine thread (``OMP_NUM_THREADS=1``),
so the "device" is the machine's two cores, which both engines, the HTTP server and the
clients share. For each scheduling policy (``fifo``, ``hybrid``), in one run, each phase
``--duration`` seconds:

  chat alone        streaming chat requests (class ``interactive``, ``--max-tokens`` tokens,
                    greedy) started open loop every 1/``--chat-rate`` s -> TTFT (time to the
                    first content chunk at the client), TPOT
  embeddings alone  the bulk job: ``--bulk-clients`` concurrent clients in a separate process
                    (so their work never delays the chat client), each sending lists of
                    ``--bulk-texts`` texts, class ``batch``, closed loop -> texts/s
  both              the two together -> chat TTFT SLO attainment, p50/p99 TTFT, and the
                    embedding texts/s counted over the same window, as a ratio to "alone"

The TTFT objective of the ``interactive`` class is ``--ttft-slo-ms``, or, by default,
calibrated in a chat-alone run on a fresh gateway before the measured runs: ``--slo-factor``
(2) x its p50 TTFT; the TPOT objective likewise. Both policies get the same objectives;
attainment against 2x and 3x the calibrated p50 is recorded too.

Chat is not free: at 2 requests/s the gateway spends ~0.16 cores and the chat client ~0.03 on
it, about 10% of this machine, so no policy can keep much more than ~90% of the embedding
throughput; at 4/s it is ~0.35 cores (~18%), and neither policy kept 80% there (measured with
``--chat-rate 4 --duration 20``: hybrid 0.72 at 97.5% attainment, fifo 0.78 at 62.5%).

Run:  .venv/bin/python benchmarks/interference.py [--duration 30] [--chat-rate 2] [--bulk-clients 16]
Writes benchmarks/results/interference.json and prints one row per policy (about 5 minutes).
Goal: ``hybrid`` keeps >= 95% of chat requests within the TTFT objective with >= 80% of the
embedding throughput it gets alone; ``fifo`` is reported beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import chat_messages, git_commit  # noqa: E402
from _gateway import (  # noqa: E402
    EMBEDDING_MODEL,
    LLM_MODEL,
    cpu_seconds,
    gateway,
    make_texts,
    metric_sums,
    percentile,
)

GOAL_ATTAINMENT = 0.95
GOAL_THROUGHPUT = 0.80
POLICIES = ("fifo", "hybrid")


def gateway_config(policy: str, ttft_ms: float, tpot_ms: float, embedding_replicas: int) -> dict[str, Any]:
    return {
        "policy": policy,
        "default_class": "interactive",
        "classes": {
            "interactive": {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms, "e2e_ms": 30_000, "max_queue": 256},
            "batch": {"e2e_ms": 600_000, "max_queue": 4096, "max_queued_tokens": 8_000_000},
        },
        "models": [
            {
                "name": EMBEDDING_MODEL,
                "kind": "embedding",
                "engine": "sentence-transformers",
                "device": "cpu",
                "replicas": embedding_replicas,
            },
            {
                "name": LLM_MODEL,
                "kind": "llm",
                "engine": "transformers",
                "device": "cpu",
                "params": {"model": "tiny"},
            },
        ],
    }


# ---- the bulk embedding job (its own process, so its client work never delays the chat client)


async def bulk_job(
    base_url: str, clients: int, per_request: int, duration: float, seed: int
) -> dict[str, Any]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="sk-local", max_retries=0, timeout=300)
    texts = make_texts(4096, seed=seed)
    done: list[tuple[float, int]] = []  # (wall-clock completion time, texts)
    errors: list[str] = []
    counter = 0
    stop_at = time.time() + duration

    async def worker() -> None:
        nonlocal counter
        while time.time() < stop_at:
            start = counter * per_request
            counter += 1
            batch = [texts[(start + k) % len(texts)] for k in range(per_request)]
            try:
                await client.embeddings.create(
                    model=EMBEDDING_MODEL, input=batch, extra_headers={"X-SLO-Class": "batch"}
                )
            except Exception as exc:  # counted, reported; the job goes on
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                await asyncio.sleep(0.1)
                continue
            done.append((time.time(), len(batch)))

    try:
        await asyncio.gather(*(worker() for _ in range(clients)))
    finally:
        await client.close()
    return {"done": done, "errors": errors}


def bulk_main(argv: list[str]) -> None:
    base_url, clients, per_request, duration, seed, out = argv
    result = asyncio.run(bulk_job(base_url, int(clients), int(per_request), float(duration), int(seed)))
    Path(out).write_text(json.dumps(result))


class Bulk:
    """The bulk job in a subprocess (killed on leaving the ``with`` block if it still runs);
    `texts_per_s(t0, t1)` counts the texts of requests completed inside a window."""

    def __init__(self, base_url: str, clients: int, per_request: int, duration: float, seed: int = 1) -> None:
        self.out = Path(tempfile.mkstemp(prefix="sage-bulk-", suffix=".json")[1])
        cmd = [sys.executable, __file__, "--bulk-worker", base_url, str(clients), str(per_request)]
        self.process = subprocess.Popen([*cmd, str(duration), str(seed), str(self.out)])
        self.result: dict[str, Any] = {}

    def __enter__(self) -> Bulk:
        return self

    def __exit__(self, *_: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.out.unlink(missing_ok=True)

    def wait(self) -> dict[str, Any]:
        if self.process.wait(timeout=900) != 0:
            raise RuntimeError(f"the bulk job exited with {self.process.returncode}")
        self.result = json.loads(self.out.read_text())
        return self.result

    def texts_per_s(self, t0: float, t1: float) -> float:
        return sum(n for t, n in self.result["done"] if t0 <= t <= t1) / (t1 - t0)


# ---- interactive chat (open loop, streaming) -------------------------------------------


async def chat_load(base_url: str, rate: float, duration: float, max_tokens: int) -> list[dict[str, Any]]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="sk-local", max_retries=0, timeout=120)
    results: list[dict[str, Any]] = []

    async def one(i: int) -> None:
        messages = chat_messages(i)
        start = time.perf_counter()
        first: float | None = None
        stamps: list[float] = []
        try:
            stream = await client.chat.completions.create(
                model=LLM_MODEL,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=max_tokens,
                temperature=0.0,
                stream=True,
                extra_headers={"X-SLO-Class": "interactive"},
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    now = time.perf_counter()
                    stamps.append(now)
                    if first is None:
                        first = now - start
        except Exception as exc:
            results.append({"error": f"{type(exc).__name__}: {exc}"[:200]})
            return
        gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        results.append(
            {
                "ttft": first if first is not None else math.inf,
                "tpot": statistics.mean(gaps) if gaps else None,
                "e2e": time.perf_counter() - start,
                "chunks": len(stamps),
            }
        )

    tasks = []
    start = time.perf_counter()
    n = int(duration * rate)
    try:
        for i in range(n):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    finally:
        await client.close()
    return results


def chat_summary(results: list[dict[str, Any]], objectives_ms: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in results if "error" not in r]
    ttfts = sorted(r["ttft"] for r in ok)
    tpots = [r["tpot"] for r in ok if r["tpot"] is not None]
    summary: dict[str, Any] = {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "ttft_p50_ms": round(percentile(ttfts, 50) * 1000, 1),
        "ttft_p90_ms": round(percentile(ttfts, 90) * 1000, 1),
        "ttft_p99_ms": round(percentile(ttfts, 99) * 1000, 1),
        "ttft_max_ms": round(max(ttfts) * 1000, 1) if ttfts else None,
        "tpot_p50_ms": round(percentile(tpots, 50) * 1000, 2) if tpots else None,
        "e2e_p50_ms": round(percentile([r["e2e"] for r in ok], 50) * 1000, 1),
    }
    # errors and missing first tokens count as misses
    summary["attainment"] = {
        name: round(sum(1 for t in ttfts if t * 1000 <= ms) / len(results), 4) if results else None
        for name, ms in objectives_ms.items()
    }
    return summary


# ---- one policy --------------------------------------------------------------------------


class Probe:
    """What the gateway did between two points: server CPU, mean embedding batch, mean
    server-side TTFT (from ``/metrics``)."""

    def __init__(self, url: str, pid: int) -> None:
        self.url, self.pid = url, pid
        self.batch = metric_sums(url, "sage_embedding_batch_size")
        self.ttft = metric_sums(url, "sage_time_to_first_token_seconds")
        self.cpu, self.client_cpu, self.t = cpu_seconds(pid), time.process_time(), time.time()

    def report(self) -> dict[str, Any]:
        batch = metric_sums(self.url, "sage_embedding_batch_size")
        ttft = metric_sums(self.url, "sage_time_to_first_token_seconds")
        seconds = time.time() - self.t
        n_batches, n_ttft = batch[1] - self.batch[1], ttft[1] - self.ttft[1]
        return {
            "server_cores": round((cpu_seconds(self.pid) - self.cpu) / seconds, 2),
            "chat_client_cores": round((time.process_time() - self.client_cpu) / seconds, 2),
            "embedding_mean_batch": round((batch[0] - self.batch[0]) / n_batches, 1) if n_batches else None,
            "server_ttft_mean_ms": round((ttft[0] - self.ttft[0]) / n_ttft * 1000, 1) if n_ttft else None,
        }


def run_policy(
    policy: str, args: argparse.Namespace, objectives: dict[str, float], say: Any
) -> dict[str, Any]:
    ttft_ms, tpot_ms = objectives["ttft_ms"], objectives["tpot_ms"]
    config = gateway_config(policy, ttft_ms, tpot_ms, args.embedding_replicas)
    levels = {f"{f:g}x": f * objectives["ttft_alone_p50_ms"] for f in (2, 3)}
    levels = {"objective": ttft_ms, **levels}
    out: dict[str, Any] = {"policy": policy}
    with gateway(config, torch_threads=args.torch_threads) as bg:
        asyncio.run(chat_load(bg.base_url, 8, 1, args.max_tokens))  # warm-up
        say(f"{policy}: chat alone ...")
        probe = Probe(bg.url, bg.process.pid)
        chat = asyncio.run(chat_load(bg.base_url, args.chat_rate, args.duration, args.max_tokens))
        out["chat_alone"] = {**chat_summary(chat, levels), **probe.report()}

        say(f"{policy}: embeddings alone ...")
        with Bulk(bg.base_url, args.bulk_clients, args.bulk_texts, args.duration + 2 * args.warmup) as bulk:
            time.sleep(args.warmup)
            probe = Probe(bg.url, bg.process.pid)
            w0 = time.time()
            time.sleep(args.duration)
            w1 = time.time()
            gateway_side = probe.report()
            bulk.wait()
        out["embedding_alone"] = {
            "texts_per_s": round(bulk.texts_per_s(w0, w1), 1),
            "errors": len(bulk.result["errors"]),
            **gateway_side,
        }

        say(f"{policy}: both ...")
        with Bulk(bg.base_url, args.bulk_clients, args.bulk_texts, args.duration + 2 * args.warmup) as bulk:
            time.sleep(args.warmup)
            probe = Probe(bg.url, bg.process.pid)
            w0 = time.time()
            chat = asyncio.run(chat_load(bg.base_url, args.chat_rate, args.duration, args.max_tokens))
            w1 = time.time()
            gateway_side = probe.report()
            bulk.wait()
        alone = out["embedding_alone"]["texts_per_s"]
        together = bulk.texts_per_s(w0, w1)
        out["both"] = {
            "chat": chat_summary(chat, levels),
            "embedding_texts_per_s": round(together, 1),
            "embedding_vs_alone": round(together / alone, 3) if alone else None,
            "embedding_errors": len(bulk.result["errors"]),
            "window_s": round(w1 - w0, 1),
            **gateway_side,
        }
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--bulk-worker":
        bulk_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="bulk-job seconds before a window opens")
    parser.add_argument("--chat-rate", type=float, default=2.0, help="chat requests per second")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--bulk-clients", type=int, default=16)
    parser.add_argument("--bulk-texts", type=int, default=32, help="texts per bulk request")
    parser.add_argument("--embedding-replicas", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=1, help="OMP_NUM_THREADS of the gateway")
    parser.add_argument("--ttft-slo-ms", type=float, default=None, help="default: calibrated")
    parser.add_argument("--slo-factor", type=float, default=2.0, help="objective = factor x p50 TTFT alone")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "interference.json")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(130, Console().width))
    say = console.print
    load_before = os.getloadavg()[0]
    say("calibration: chat alone ...")
    with gateway(
        gateway_config("fifo", 1000, 200, args.embedding_replicas), torch_threads=args.torch_threads
    ) as bg:
        asyncio.run(chat_load(bg.base_url, 8, 1, args.max_tokens))
        calibration = chat_summary(
            asyncio.run(chat_load(bg.base_url, args.chat_rate, min(args.duration, 15), args.max_tokens)), {}
        )
    alone_p50 = calibration["ttft_p50_ms"]
    objectives = {
        "ttft_alone_p50_ms": alone_p50,
        "ttft_ms": args.ttft_slo_ms or float(math.ceil(args.slo_factor * alone_p50)),
        "tpot_ms": float(math.ceil(args.slo_factor * (calibration["tpot_p50_ms"] or 5))),
    }
    say(f"objectives: {objectives} (chat alone: {calibration})")

    runs = [run_policy(p, args, objectives, say) for p in args.policies.split(",")]
    report = {
        "command": " ".join([".venv/bin/python", "benchmarks/interference.py", *sys.argv[1:]]),
        "git_commit": git_commit(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average_1min_before": round(load_before, 2),
        "setup": {
            "llm": f"{LLM_MODEL} (transformers engine, device cpu)",
            "embedding": f"{EMBEDDING_MODEL} x {args.embedding_replicas} replicas (device cpu)",
            "gateway_torch_threads": args.torch_threads,
            "chat": f"{args.chat_rate}/s open loop, streaming, max_tokens {args.max_tokens}, greedy, "
            "class interactive",
            "bulk": f"{args.bulk_clients} concurrent clients x {args.bulk_texts} texts per request, class batch "
            "(separate process)",
            "phase_seconds": args.duration,
        },
        "objectives": {
            **objectives,
            "rule": f"{args.slo_factor:g} x p50 TTFT of chat alone (calibration run)",
        },
        "calibration_chat_alone": calibration,
        "runs": runs,
        "goals": {"hybrid_attainment": GOAL_ATTAINMENT, "hybrid_embedding_vs_alone": GOAL_THROUGHPUT},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    ttft_ms = objectives["ttft_ms"]
    table = Table(
        title=f"chat ({args.chat_rate:g}/s) while a bulk embedding job saturates the CPU; TTFT objective "
        f"{ttft_ms:.0f} ms = {args.slo_factor:g} x p50 alone; {report['machine']}"
    )
    columns = (
        "policy",
        "chat alone TTFT p50/p99",
        "attainment (3x)",
        "TTFT p50/p99",
        "TPOT p50",
        "emb. alone /s",
        "emb. with chat /s",
        "vs alone",
        "emb. batch",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "policy" else "right")
    for run in runs:
        alone, both = run["chat_alone"], run["both"]
        chat = both["chat"]
        table.add_row(
            run["policy"],
            f"{alone['ttft_p50_ms']:.0f}/{alone['ttft_p99_ms']:.0f} ms",
            f"{chat['attainment']['objective']:.1%} ({chat['attainment']['3x']:.1%})",
            f"{chat['ttft_p50_ms']:.0f}/{chat['ttft_p99_ms']:.0f} ms",
            f"{chat['tpot_p50_ms']} ms",
            f"{run['embedding_alone']['texts_per_s']:.1f}",
            f"{both['embedding_texts_per_s']:.1f}",
            f"{both['embedding_vs_alone']:.2f}",
            f"{run['embedding_alone']['embedding_mean_batch']} / {both['embedding_mean_batch']}",
        )
    console.print(table)
    console.print(
        f"goal: hybrid >= {GOAL_ATTAINMENT:.0%} attainment with >= {GOAL_THROUGHPUT:.0%} of its embedding "
        f"throughput alone; written to {args.out}"
    )


if __name__ == "__main__":
    main()
