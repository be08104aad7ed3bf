"""LLM batching: the local transformers engine serving 64 chat requests at concurrency 16 vs one by one.

Side by side in one run, on one engine (same model, same rendered prompts, greedy decoding):
  sequential   the 64 requests one after another (each runs alone: batch size 1)
  concurrent   the same 64 requests, 16 in flight at a time (asyncio semaphore); the engine's
               iteration-level batching runs them in shared forward passes

The model is ``sage-tiny-random-lm`` (random weights, meaningless text: this measures the
serving machinery, not answer quality), built offline under ``$SAGE_HOME/models`` if absent.
Also checks that every concurrent completion is identical to its sequential twin.

Run:  .venv/bin/python benchmarks/llm_batching.py [--requests 64] [--concurrency 16] [--max-tokens 64]
Writes benchmarks/results/llm_batching.json and prints tokens/s of both and the ratio (goal >= 4x).
Run it on an otherwise idle machine: other processes competing for the cores slow the one-by-one
run far more than the batched one (torch's worker threads wait on each other at every op), and
the ratio then overstates the gain. The 1-minute load average before the run is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import chat_messages, git_commit  # noqa: E402

from sage_prefect.controlplane.engines.base import GenerationRequest  # noqa: E402
from sage_prefect.controlplane.engines.local_llm import TransformersLLMEngine  # noqa: E402

GOAL = 4.0


async def run_one(engine: TransformersLLMEngine, i: int, prompt: str, max_tokens: int) -> dict[str, Any]:
    request = GenerationRequest(id=f"req-{i}", prompt=prompt, max_tokens=max_tokens, temperature=0.0)
    start = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    completion_tokens = 0
    async for event in engine.generate(request):
        if event.text and first is None:
            first = time.perf_counter() - start
        parts.append(event.text)
        if event.finish_reason is not None:
            completion_tokens = event.completion_tokens
    return {
        "text": "".join(parts),
        "tokens": completion_tokens,
        "latency": time.perf_counter() - start,
        "ttft": first if first is not None else time.perf_counter() - start,
    }


async def sequential(
    engine: TransformersLLMEngine, prompts: list[str], max_tokens: int
) -> list[dict[str, Any]]:
    return [await run_one(engine, i, p, max_tokens) for i, p in enumerate(prompts)]


async def concurrent(
    engine: TransformersLLMEngine, prompts: list[str], max_tokens: int, concurrency: int
) -> list[dict[str, Any]]:
    gate = asyncio.Semaphore(concurrency)

    async def limited(i: int, prompt: str) -> dict[str, Any]:
        async with gate:
            return await run_one(engine, i, prompt, max_tokens)

    return list(await asyncio.gather(*(limited(i, p) for i, p in enumerate(prompts))))


def summary(results: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in results)
    return {
        "seconds": round(seconds, 3),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
        "latency_p50_s": round(statistics.median(r["latency"] for r in results), 3),
        "ttft_p50_s": round(statistics.median(r["ttft"] for r in results), 4),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    load_before = os.getloadavg()[0]
    engine = TransformersLLMEngine(args.model, max_batch_size=args.concurrency)
    try:
        prompts = [engine.render_chat(chat_messages(i)) for i in range(args.requests)]
        await sequential(engine, prompts[:2], 8)  # warm-up: first-call allocations, lazy inits

        start = time.perf_counter()
        seq = await sequential(engine, prompts, args.max_tokens)
        seq_s = time.perf_counter() - start

        engine.step_batch_sizes.clear()
        engine.prefill_batch_sizes.clear()
        start = time.perf_counter()
        con = await concurrent(engine, prompts, args.max_tokens, args.concurrency)
        con_s = time.perf_counter() - start
        steps = dict(sorted(engine.step_batch_sizes.items()))
        prefills = dict(sorted(engine.prefill_batch_sizes.items()))
    finally:
        await engine.aclose()

    seq_sum, con_sum = summary(seq, seq_s), summary(con, con_s)
    ratio = con_sum["tokens_per_s"] / seq_sum["tokens_per_s"]
    n_steps = sum(steps.values())
    return {
        "command": " ".join(["python", "benchmarks/llm_batching.py", *sys.argv[1:]]),
        "git_commit": git_commit(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}",
        "load_average_1min_before": round(load_before, 2),
        "model": f"{engine.name} (random weights, {engine.path})",
        "device": "cpu",
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
        "sequential": seq_sum,
        "concurrent": con_sum,
        "ratio_tokens_per_s": round(ratio, 2),
        "goal_ratio": GOAL,
        "identical_completions": sum(a["text"] == b["text"] for a, b in zip(seq, con, strict=True)),
        "concurrent_decode_steps_by_batch_size": steps,
        "concurrent_mean_decode_batch": round(sum(k * v for k, v in steps.items()) / max(n_steps, 1), 2),
        "concurrent_prefills_by_batch_size": prefills,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="local model directory, or 'tiny' (default)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "llm_batching.json")
    args = parser.parse_args()

    report = asyncio.run(bench(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    seq, con = report["sequential"], report["concurrent"]
    print(
        f"{report['requests']} chat requests, max_tokens {report['max_tokens']}, greedy; {report['machine']}"
    )
    print(f"model: {report['model']}")
    print(
        f"  sequential (one by one):     {seq['tokens_per_s']:>8.1f} tok/s  ({seq['completion_tokens']} tokens in {seq['seconds']} s)"
    )
    print(
        f"  concurrent ({report['concurrency']} in flight):   {con['tokens_per_s']:>8.1f} tok/s  "
        f"({con['completion_tokens']} tokens in {con['seconds']} s, mean decode batch "
        f"{report['concurrent_mean_decode_batch']})"
    )
    print(f"  ratio: {report['ratio_tokens_per_s']}x (goal >= {GOAL}x)")
    print(f"  identical completions: {report['identical_completions']}/{report['requests']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
