"""Faults, overload and bad input against the real gateway: one client's mistake or burst must
never reach another client.

One gateway (``python -m sage_prefect.controlplane.server``, 127.0.0.1) serving the real
embedding model (all-MiniLM-L6-v2) and the tiny random-weight LLM (real forward passes,
meaningless text: only the protocol matters here), three parts in one run:

malformed   at least 150 malformed requests across every endpoint: bodies that are not JSON,
            lone surrogates, ``1e400``, 64-bit overflow, 100,000-deep nesting, every field of a
            valid request replaced by values of the wrong type or range, wrong methods, paths and
            headers. Goal: no 5xx; every error body OpenAI's envelope
            ``{"error": {"message": str, "type": str, "param", "code"}}``; ``/health`` fine after.
overload    the embedding capacity C (requests/s of one short text, a closed loop of 32 clients),
            then an open loop at 10 x C for ``--overload-seconds`` in the ``interactive`` class
            (the gateway's default classes, admission by estimated wait on: the default), then
            probes every 100 ms; once with the class's default objective (e2e 2 s) and once
            with 10 s: admission holds the queue to the objective, so the time the queue takes
            to drain after the load, the recovery, is bounded by it. Measured: the share of the excess (sent - admitted) answered 429
            within 100 ms, the time to the first 429, p50/p99 latency of admitted requests
            against the class's objective, recovery (from the end of the load until probes are
            answered within 2x their unloaded latency again), the gateway's RSS before, at
            peak and after. Goals: >= 90% of the excess 429 within 100 ms, admitted p99 within
            the objective, recovery <= 2 s, RSS flat.
schema      schemathesis with OpenAI's own OpenAPI spec against the served operations, in its own
            virtualenv (``benchmarks/openai_schema.py``); skipped with a message if it cannot run.
            Goal: 0 5xx, 0 schema violations (base64 embeddings excepted: OpenAI itself answers a
            string there).

Run:  .venv/bin/python benchmarks/faults.py [--overload-seconds 15] [--objectives default,10000]
      [--skip-schema] [--schema-examples 30]
Writes benchmarks/results/faults.json (and faults_overload.png: every request of the overload
over time, which the JSON leaves out). On this 2-core machine the load generator shares the
cores with the gateway; the load average before the run is recorded. Takes 3-6 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from _common import git_commit
from _gateway import EMBEDDING_MODEL, LLM_MODEL, gateway, make_texts, percentile

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FAST_429_S = 0.1

# ---------------------------------------------------------------------------------- malformed


@dataclass
class Case:
    name: str
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] | None = None


TEMPLATES: dict[str, dict[str, str]] = {  # a valid request per endpoint, each value JSON text
    "/v1/chat/completions": {
        "model": json.dumps(LLM_MODEL),
        "messages": '[{"role": "user", "content": "hello"}]',
        "max_tokens": "4",
        "temperature": "0",
    },
    "/v1/completions": {"model": json.dumps(LLM_MODEL), "prompt": '"hello"', "max_tokens": "4"},
    "/v1/embeddings": {"model": json.dumps(EMBEDDING_MODEL), "input": '"hello"'},
}
DEEP = "[" * 100_000 + "]" * 100_000
WRONG_VALUES = {
    "null": "null",
    "true": "true",
    "int": "5",
    "negative": "-1",
    "inf": "1e400",
    "-inf": "-1e400",
    "int64+1": str(2**64),
    "string": '"x"',
    "surrogate": '"\\ud800"',
    "empty-list": "[]",
    "object": "{}",
    "deep": DEEP,
}
EXTRA_FIELDS = {  # fields a template leaves out, each with values of the wrong type or range
    "/v1/chat/completions": {
        "seed": [str(2**64), "-9223372036854775809", "1.5", '"7"'],
        "priority": ["1e400", '"high"', str(2**40)],
        "stop": ["[1]", '["a","b","c","d","e"]', "5"],
        "top_p": ["2", "-0.1", '"1"'],
        "n": ["3", "0"],
        "stream": ['"yes"', "1"],
        "stream_options": ["5", '{"include_usage": "yes"}'],
        "tools": ["5", '[{"type": "function"}]', '[{"type": "function", "function": {"name": "bad name!"}}]'],
        "tool_choice": ["5", '"sometimes"', '{"type": "function", "function": {"name": "nope"}}'],
        "response_format": ["5", '{"type": "yaml"}', '{"type": "json_schema", "json_schema": {"schema": 5}}'],
        "logit_bias": ['{"5": 1000}', "[]"],
        "max_completion_tokens": ["0", str(2**40)],
        "messages.content-part": [
            '[{"role": "user", "content": [{"type": "text", "text": 5}]}]',
            '[{"role": "user", "content": [{"type": "text", "text": null}]}]',
            '[{"role": "user", "content": [{"type": "text"}]}]',
            '[{"role": "user", "content": [5]}]',
            '[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]',
            '[{"role": "robot", "content": "x"}]',
            '[{"role": "tool", "content": "x"}]',
            '[{"role": "user", "content": "x", "tool_calls": []}]',
            '[{"role": "assistant", "tool_calls": [{"function": {"name": 5, "arguments": "{}"}}]}]',
            '[{"role": "user"}]',
            "[" + ",".join(['{"role": "user", "content": "hi"}'] * 3000) + "]",
        ],
    },
    "/v1/completions": {
        "seed": [str(2**64), '"7"'],
        "echo": ["true"],
        "suffix": ['"tail"'],
        "best_of": ["3"],
        "logprobs": ["2"],
        "tools": ['[{"type": "function", "function": {"name": "f"}}]'],
        "prompt.forms": ["[1, 2, 3]", '["a", "b"]', '""', json.dumps("word " * 300_000)],
    },
    "/v1/embeddings": {
        "encoding_format": ['"hex"', "5"],
        "truncate_prompt_tokens": ["0", "-2", "true", "99999"],
        "dimensions": ["7", '"384"'],
        "slo_class": ['"gold"', "5"],
        "input.forms": [
            '["ok", 3]',
            '[""]',
            "[[1, 2]]",
            json.dumps(["x"] * 3000),
            json.dumps("word " * 300_000),
        ],
    },
}


def _body(fields: dict[str, str]) -> bytes:
    return ("{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields.items()) + "}").encode()


def malformed_cases() -> list[Case]:
    cases: list[Case] = []
    raw_bodies = {
        "empty": b"",
        "not-json": b"{not json",
        "null": b"null",
        "array": b"[1, 2]",
        "number": b"123",
        "string": b'"text"',
        "truncated": b'{"model": ',
        "nan": b'{"model": NaN}',
        "invalid-utf8": b'{"model": "\xff\xfe"}',
        "trailing": b'{"model": "x"} garbage',
        "deep": DEEP.encode(),
        "duplicate-keys": b'{"model": 1, "model": 2}',
    }
    for path in TEMPLATES:
        for name, raw in raw_bodies.items():
            cases.append(Case(f"{path} body {name}", "POST", path, raw))
        for field in TEMPLATES[path]:
            cases.append(
                Case(f"{path} missing {field}", "POST", path, _body(_without(TEMPLATES[path], field)))
            )
            for label, value in WRONG_VALUES.items():
                fields = {**TEMPLATES[path], field: value}
                cases.append(Case(f"{path} {field}={label}", "POST", path, _body(fields)))
        for field, values in EXTRA_FIELDS[path].items():
            key = field.split(".", 1)[0]
            for k, value in enumerate(values):
                fields = {**TEMPLATES[path], key: value}
                cases.append(Case(f"{path} {field}#{k}", "POST", path, _body(fields)))
        cases.append(Case(f"{path} GET", "GET", path))
        cases.append(
            Case(f"{path} x-priority 1e400", "POST", path, _body(TEMPLATES[path]), {"x-priority": "1e400"})
        )
        cases.append(
            Case(f"{path} x-slo-class unknown", "POST", path, _body(TEMPLATES[path]), {"x-slo-class": "gold"})
        )
        cases.append(
            Case(f"{path} text/plain", "POST", path, _body(TEMPLATES[path]), {"content-type": "text/plain"})
        )
        cases.append(
            Case(f"{path} oversize", "POST", path, b'{"model": "' + b"x" * (5 * 1024 * 1024) + b'"}')
        )
    cases += [
        Case("unknown path", "GET", "/v1/nothing"),
        Case("models POST", "POST", "/v1/models", b"{}"),
        Case("models garbage key", "GET", "/v1/models", headers={"authorization": "Bearer \\u00ff"}),
    ]
    return cases


def _without(fields: dict[str, str], key: str) -> dict[str, str]:
    return {k: v for k, v in fields.items() if k != key}


def envelope_problem(status: int, body: bytes) -> str | None:
    """None if ``body`` is what OpenAI would send with ``status``; else what is wrong."""
    if status < 400:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return "not JSON"
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict):
        return "no 'error' object"
    if not isinstance(error.get("message"), str) or not isinstance(error.get("type"), str):
        return "message/type not strings"
    if not {"param", "code"} <= error.keys():
        return "param/code missing"
    return None


def run_malformed(url: str) -> dict[str, Any]:
    cases = malformed_cases()
    statuses: Counter[int] = Counter()
    problems: list[dict[str, Any]] = []
    slowest = (0.0, "")
    with httpx.Client(timeout=120) as http:
        for case in cases:
            headers = {"content-type": "application/json", **(case.headers or {})}
            t0 = time.perf_counter()
            response = http.request(case.method, url + case.path, content=case.body, headers=headers)
            took = time.perf_counter() - t0
            slowest = max(slowest, (took, case.name))
            statuses[response.status_code] += 1
            problem = envelope_problem(response.status_code, response.content)
            if response.status_code >= 500 or problem:
                problems.append(
                    {
                        "case": case.name,
                        "status": response.status_code,
                        "problem": problem,
                        "body": response.text[:300],
                    }
                )
        health = http.get(url + "/health").json()
    return {
        "requests": len(cases),
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "server_errors": sum(v for k, v in statuses.items() if k >= 500),
        "envelope_problems": sum(1 for p in problems if p["problem"]),
        "problems": problems[:20],
        "slowest_s": round(slowest[0], 3),
        "slowest_case": slowest[1],
        "health_after": health["status"],
    }


# ---------------------------------------------------------------------------------- overload


@dataclass
class Shot:
    sent: float
    done: float
    status: int

    @property
    def latency(self) -> float:
        return self.done - self.sent


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, start: float) -> Shot:
    sent = time.perf_counter() - start
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
            await response.read()
            status = response.status
    except aiohttp.ClientError:
        status = 0
    return Shot(sent, time.perf_counter() - start, status)


def _body_for(text: str) -> bytes:
    return json.dumps({"model": EMBEDDING_MODEL, "input": text}).encode()


async def _closed_loop(url: str, bodies: list[bytes], clients: int, seconds: float) -> float:
    """Requests/s a closed loop of ``clients`` gets (every answer a 200)."""
    done = 0
    stop = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(k: int) -> None:
            nonlocal done
            i = k
            while time.perf_counter() < stop:
                shot = await _post(session, url, bodies[i % len(bodies)], 0.0)
                if shot.status != 200:
                    raise RuntimeError(f"capacity probe got {shot.status}")
                done += 1
                i += clients

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        return done / (time.perf_counter() - t0)


async def _probe_latency(session: aiohttp.ClientSession, url: str, body: bytes) -> Shot:
    return await _post(session, url, body, 0.0)


async def _overload(
    url: str, base: str, bodies: list[bytes], rate: float, seconds: float, pid: int, baseline: float
) -> dict[str, Any]:
    start = time.perf_counter()
    rss: list[tuple[float, int]] = []
    shots: list[Shot] = []
    sampling = True

    async def sample_rss() -> None:
        while sampling:
            rss.append((time.perf_counter() - start, rss_bytes(pid)))
            await asyncio.sleep(0.2)

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        sampler = asyncio.create_task(sample_rss())
        await asyncio.sleep(0.5)
        load_start = time.perf_counter() - start
        tasks: list[asyncio.Task[Shot]] = []
        n = int(rate * seconds)
        for i in range(n):
            due = load_start + i / rate
            delay = due - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_post(session, url, bodies[i % len(bodies)], start)))
        load_end = time.perf_counter() - start
        # probes from the end of the load: when are they answered as fast as on an idle gateway?
        probes: list[Shot] = []
        recovered_at: float | None = None
        deadline = load_end + 60
        while time.perf_counter() - start < deadline:
            shot = await _post(session, url, bodies[len(probes) % len(bodies)], start)
            probes.append(shot)
            quick = [p.status == 200 and p.latency <= 2 * baseline for p in probes[-3:]]
            if len(quick) == 3 and all(quick):
                recovered_at = probes[-3].sent
                break
            await asyncio.sleep(max(0.0, 0.1 - shot.latency))
        shots = await asyncio.gather(*tasks)
        await asyncio.sleep(2.0)
        sampling = False
        await sampler
    statuses = Counter(s.status for s in shots)
    admitted = [s for s in shots if s.status == 200]
    rejected = [s for s in shots if s.status == 429]
    excess = len(shots) - len(admitted)
    fast = [s for s in rejected if s.latency <= FAST_429_S]
    first_429 = min((s.done for s in rejected), default=None)
    peak = max(v for _, v in rss)
    before = rss[0][1]
    return {
        "offered_rate_rps": round(rate, 1),
        "achieved_send_rate_rps": round(len(shots) / max(1e-9, load_end - load_start), 1),
        "seconds": seconds,
        "sent": len(shots),
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "server_errors": sum(v for k, v in statuses.items() if k >= 500 or k == 0),
        "excess": excess,
        "share_of_excess_429_within_100ms": round(len(fast) / excess, 4) if excess else None,
        "time_to_first_429_s": round(first_429 - load_start, 3) if first_429 is not None else None,
        "rejected_latency_p50_ms": round(percentile([s.latency for s in rejected], 50) * 1000, 1),
        "rejected_latency_p99_ms": round(percentile([s.latency for s in rejected], 99) * 1000, 1),
        "admitted_latency_p50_ms": round(percentile([s.latency for s in admitted], 50) * 1000, 1),
        "admitted_latency_p99_ms": round(percentile([s.latency for s in admitted], 99) * 1000, 1),
        "admitted_latency_max_ms": round(max((s.latency for s in admitted), default=0) * 1000, 1),
        "recovery_s": round(recovered_at - load_end, 3) if recovered_at is not None else None,
        "probe_baseline_ms": round(baseline * 1000, 1),
        "rss_before_mb": round(before / 2**20, 1),
        "rss_peak_mb": round(peak / 2**20, 1),
        "rss_after_mb": round(rss[-1][1] / 2**20, 1),
        "timeline": {
            "load_start": round(load_start, 3),
            "load_end": round(load_end, 3),
            "shots": [(round(s.sent, 3), round(s.latency, 4), s.status) for s in shots],
            "probes": [(round(p.sent, 3), round(p.latency, 4), p.status) for p in probes],
            "rss_mb": [(round(t, 2), round(v / 2**20, 1)) for t, v in rss],
        },
    }


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run_overload(bg: Any, seconds: float, objective_ms: float) -> dict[str, Any]:
    url = f"{bg.base_url}/embeddings"
    bodies = [_body_for(t) for t in make_texts(512, seed=14, min_words=20, max_words=40)]

    async def measure() -> dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            for body in bodies[:20]:  # warm-up
                await _probe_latency(session, url, body)
            idle = [(await _probe_latency(session, url, b)).latency for b in bodies[20:40]]
        capacity = await _closed_loop(url, bodies, clients=32, seconds=5.0)
        await asyncio.sleep(1.0)
        result = await _overload(
            url, bg.base_url, bodies, 10 * capacity, seconds, bg.process.pid, percentile(idle, 50)
        )
        return {"capacity_rps": round(capacity, 1), "objective_ms": objective_ms, **result}

    return asyncio.run(measure())


def plot_overload(results: list[dict[str, Any]], path: Path) -> None:
    """Per overload run: every request's latency over time (admitted, refused, probes after the
    load) against the objective, and the gateway's RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(7 * len(results), 6), sharex="col", squeeze=False)
    for col, result in enumerate(results):
        top, bottom = axes[0][col], axes[1][col]
        tl = result["timeline"]
        for status, colour, label in (
            (200, "tab:green", "admitted (200)"),
            (429, "tab:red", "refused (429)"),
        ):
            pts = [(t, lat * 1000) for t, lat, s in tl["shots"] if s == status]
            if pts:
                top.scatter(*zip(*pts, strict=True), s=2, c=colour, label=label, alpha=0.5)
        probes = [(t, lat * 1000) for t, lat, _ in tl["probes"]]
        if probes:
            top.plot(*zip(*probes, strict=True), "k.-", ms=4, label="probes after the load")
        top.axhline(result["objective_ms"], color="tab:blue", ls="--", label="interactive objective")
        top.set_yscale("log")
        top.set_ylabel("latency (ms)")
        top.legend(loc="upper right", fontsize=8)
        top.set_title(
            f"objective {result['objective_ms']:.0f} ms: {result['offered_rate_rps']:.0f} req/s "
            f"offered, capacity {result['capacity_rps']:.0f}",
            fontsize=10,
        )
        for ax in (top, bottom):
            ax.axvspan(tl["load_start"], tl["load_end"], color="0.9", zorder=0)
        bottom.plot(*zip(*tl["rss_mb"], strict=True), color="tab:purple")
        bottom.set_ylabel("gateway RSS (MB)")
        bottom.set_xlabel("seconds (grey: the load)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--overload-seconds", type=float, default=15.0)
    parser.add_argument(
        "--objectives",
        default="default,10000",
        help="the interactive class's e2e objectives (ms) to overload under, 'default' for the "
        "gateway's own (comma-separated; one overload run each)",
    )
    parser.add_argument("--skip-schema", action="store_true")
    parser.add_argument("--skip-overload", action="store_true", help="(a quick look at the other parts)")
    parser.add_argument("--schema-examples", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS / "faults.json")
    args = parser.parse_args()
    from rich.console import Console

    from sage_prefect.controlplane.config import ControlPlaneConfig

    console = Console()
    load_before = os.getloadavg()
    classes = ControlPlaneConfig().model_dump(mode="json")["classes"]
    embedding = {"name": EMBEDDING_MODEL, "kind": "embedding", "engine": "sentence-transformers"}
    tiny = {"name": LLM_MODEL, "kind": "llm", "engine": "transformers", "params": {"model": "tiny"}}
    report: dict[str, Any] = {
        "command": " ".join([".venv/bin/python", "benchmarks/faults.py", *sys.argv[1:]]),
        "git_commit": git_commit(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average_before": [round(x, 2) for x in load_before],
        "models": {"embedding": EMBEDDING_MODEL, "llm": f"{LLM_MODEL} (random weights: protocol only)"},
        "classes": classes,
    }
    with gateway({"classes": classes, "models": [embedding, tiny]}, torch_threads=1) as bg:
        root = bg.base_url.removesuffix("/v1")
        console.print(f"[bold]malformed[/bold]: {len(malformed_cases())} requests")
        report["malformed"] = run_malformed(root)
        console.print(report["malformed"])
        if args.skip_schema:
            report["schema"] = {"skipped": "--skip-schema"}
        else:
            report["schema"] = run_schema(bg.base_url, args.schema_examples, console)
            console.print({k: v for k, v in report["schema"].items() if k != "operations"})
    report["overload"] = []
    # The overload runs against a gateway serving the embedding model alone: with a local LLM on
    # the same CPU the embedding engine computes at background priority (hybrid, config.py), and
    # the load generator, on this same machine, would then take its core.
    for objective in [] if args.skip_overload else args.objectives.split(","):
        variant = {name: dict(c) for name, c in classes.items()}
        if objective != "default":
            variant["interactive"]["e2e_ms"] = float(objective)
        e2e = variant["interactive"]["e2e_ms"]
        with gateway({"classes": variant, "models": [embedding]}, torch_threads=1) as bg:
            console.print(
                f"[bold]overload[/bold]: 10x the embedding capacity for {args.overload_seconds:.0f} s, "
                f"interactive objective {e2e:.0f} ms ({objective})"
            )
            result = run_overload(bg, args.overload_seconds, e2e)
        result["objective_setting"] = objective
        report["overload"].append(result)
        console.print({k: v for k, v in result.items() if k != "timeline"})
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report["goals"] = goals(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if report["overload"]:
        plot_overload(report["overload"], args.out.with_name(args.out.stem + "_overload.png"))
    for run in report["overload"]:  # every request's timing: in the plot, not in the JSON (~1 MB)
        del run["timeline"]
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for name, (ok, detail) in report["goals"].items():
        console.print(f"{'[green]met[/green]' if ok else '[red]missed[/red]'}  {name}: {detail}")
    console.print(f"wrote {args.out}")


def run_schema(base_url: str, examples: int, console: Any) -> dict[str, Any]:
    try:
        import openai_schema  # benchmarks/openai_schema.py: schemathesis in its own virtualenv
    except ImportError as exc:
        return {"skipped": f"benchmarks/openai_schema.py not importable: {exc}"}
    console.print(f"[bold]schema[/bold]: schemathesis, OpenAI's spec, {examples} examples per operation")
    try:
        result: dict[str, Any] = openai_schema.run(base_url, LLM_MODEL, EMBEDDING_MODEL, examples)
    except Exception as exc:  # no package index, no spec: say so, keep the other parts
        return {"skipped": f"{type(exc).__name__}: {exc}"}
    return result


def goals(report: dict[str, Any]) -> dict[str, tuple[bool, str]]:
    m, o, s = report["malformed"], report.get("overload"), report.get("schema", {})
    out = {
        "malformed: 0 5xx": (m["server_errors"] == 0, f"{m['server_errors']} of {m['requests']}"),
        "malformed: every error OpenAI's envelope": (
            m["envelope_problems"] == 0,
            f"{m['envelope_problems']} not",
        ),
    }
    for run in o or []:
        out |= {
            f"{name} ({run['objective_ms']:.0f} ms objective)": v for name, v in overload_goals(run).items()
        }
    if "skipped" not in s:
        out["schema: 0 5xx"] = (s.get("server_errors", 1) == 0, f"{s.get('server_errors')}")
        out["schema: 0 violations"] = (s.get("schema_violations", 1) == 0, f"{s.get('schema_violations')}")
    return out


def overload_goals(o: dict[str, Any]) -> dict[str, tuple[bool, str]]:
    return {
        "overload: >= 90% of the excess 429 within 100 ms": (
            (o["share_of_excess_429_within_100ms"] or 0) >= 0.9,
            f"{o['share_of_excess_429_within_100ms']}",
        ),
        "overload: admitted p99 within the objective": (
            o["admitted_latency_p99_ms"] <= o["objective_ms"],
            f"{o['admitted_latency_p99_ms']} ms against {o['objective_ms']:.0f} ms",
        ),
        "overload: recovery <= 2 s": (
            o["recovery_s"] is not None and o["recovery_s"] <= 2,
            f"{o['recovery_s']} s",
        ),
        "overload: RSS flat": (
            o["rss_after_mb"] <= o["rss_before_mb"] * 1.1 + 20,
            f"{o['rss_before_mb']} -> peak {o['rss_peak_mb']} -> {o['rss_after_mb']} MB",
        ),
        "overload: 0 5xx": (o["server_errors"] == 0, f"{o['server_errors']}"),
    }


if __name__ == "__main__":
    main()
