"""Gateway overhead: the sage gateway and a LiteLLM proxy in front of the same trivial upstream.

Side by side in one run, on 127.0.0.1, non-streaming chat completions (``max_tokens`` 16):
  direct    the trivial OpenAI-compatible upstream (``benchmarks/trivial_upstream.py``) hit directly
  gateway   sage-prefect's control plane (``python -m sage_prefect.controlplane.server``, default
            settings) with one ``openai``-engine model in front of that upstream
  litellm   LiteLLM's proxy (``litellm --config ...``, default settings, one worker) with one
            ``openai/`` model in front of it, installed from PyPI into its own virtualenv,
            ``benchmarks/.venv-litellm`` (created on the first run, never in the project's
            environment); skipped with a clear message if it cannot be installed
The gateway and LiteLLM both check an API key on every request.

Each target gets a closed loop at concurrency 1, 32 and 64 (that many keep-alive connections,
each sending its next request as soon as the last one is answered), a warm-up, then a fixed
number of measured requests. The load generator runs in its own process; every answer is
checked (status 200, a chat completion with content). Two load generators, each measuring
every target:
  raw       raw HTTP/1.1 on asyncio streams (~0.03 ms of CPU per request), so the servers get
            the cores; the trivial upstream then serves tens of thousands of requests/s
  httpx     one ``httpx.AsyncClient`` per connection (~0.5 ms of CPU per request), the kind of
            client the issue's reference figures came from (upstream alone ~1-2 k req/s)
Measured: requests/s, p50/p99 latency, and CPU time per request of the server processes
(psutil, user+system before/after the measured requests): the front process tree (upstream,
gateway or LiteLLM) and the upstream behind it.

Run:  .venv/bin/python benchmarks/gateway_overhead.py [--requests 5000] [--litellm-requests 600]
      [--concurrency 1,32,64] [--clients raw,httpx] [--no-litellm] [--upstream raw|asgi]
Writes benchmarks/results/gateway_overhead.json and prints a table per load generator with the
ratios. Goals (issue 3): gateway >= 0.5x the direct upstream's requests/s (~8x LiteLLM), and
<= 2 ms added p50 at concurrency 1. On this 2-core machine the load generator, the gateway and
the upstream share the cores, so the figures are noisy; the 1-minute load average before the
run is recorded. Takes about 3 minutes (plus the LiteLLM install on the first run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import git_commit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LITELLM_VENV = HERE / ".venv-litellm"
GOAL_RATIO = 0.5
GOAL_ADDED_P50_MS = 2.0
CLIENTS = ("raw", "httpx")
MODEL = "up"
BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Say hello in five words."}],
    "max_tokens": 16,
}


# ---- the load generator (runs in its own process: `gateway_overhead.py _client ...`) --------


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length: int | None = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if chunked:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        return status, b"".join(parts)
    if length is None:
        raise RuntimeError("response without content-length or chunked encoding")
    return status, await reader.readexactly(length)


def _valid(status: int, body: bytes) -> str | None:
    """None when the answer is a well-formed chat completion, else what is wrong."""
    if status != 200:
        return f"HTTP {status}: {body[:300]!r}"
    try:
        doc = json.loads(body)
        if doc["object"] != "chat.completion" or not doc["choices"][0]["message"]["content"]:
            return f"unexpected answer: {body[:300]!r}"
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return f"malformed answer ({exc}): {body[:300]!r}"
    return None


Sender = Callable[[], Awaitable[tuple[int, bytes]]]


async def _raw_senders(url: str, key: str, n: int) -> tuple[list[Sender], Callable[[], Awaitable[None]]]:
    """``n`` keep-alive connections speaking raw HTTP/1.1, one pre-built request each."""
    hostport, _, path = url.split("://", 1)[1].partition("/")
    host, port = hostport.rsplit(":", 1)
    payload = json.dumps(BODY).encode()
    request = (
        f"POST /{path} HTTP/1.1\r\nhost: {hostport}\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {key}\r\ncontent-length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    writers: list[asyncio.StreamWriter] = []

    async def connect() -> Sender:
        reader, writer = await asyncio.open_connection(host, int(port))
        writers.append(writer)

        async def send() -> tuple[int, bytes]:
            writer.write(request)
            return await _read_response(reader)

        return send

    senders = [await connect() for _ in range(n)]

    async def close() -> None:
        for writer in writers:
            writer.close()

    return senders, close


async def _httpx_senders(url: str, key: str, n: int) -> tuple[list[Sender], Callable[[], Awaitable[None]]]:
    """``n`` ``httpx.AsyncClient`` of one connection each (one shared pool of ``n`` connections
    would cost the client O(n) per request: httpcore checks every idle connection's socket)."""
    import httpx

    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [httpx.AsyncClient(headers=headers, limits=limits, timeout=120) for _ in range(n)]
    payload = json.dumps(BODY).encode()

    def sender(client: httpx.AsyncClient) -> Sender:
        async def send() -> tuple[int, bytes]:
            response = await client.post(url, content=payload)
            return response.status_code, response.content

        return send

    async def close() -> None:
        for client in clients:
            await client.aclose()

    return [sender(c) for c in clients], close


async def _closed_loop(senders: list[Sender], count: int) -> tuple[list[float], float, list[str]]:
    """``count`` requests, each sender sending its next as soon as its last is answered."""
    remaining = count
    latencies: list[float] = []
    errors: list[str] = []

    async def worker(send: Sender) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            status, body = await send()
            latencies.append(time.perf_counter() - start)
            problem = _valid(status, body)
            if problem is not None:
                errors.append(problem)

    start = time.perf_counter()
    await asyncio.gather(*(worker(send) for send in senders))
    return latencies, time.perf_counter() - start, errors


async def _client(args: argparse.Namespace) -> None:
    make = _raw_senders if args.client == "raw" else _httpx_senders
    senders, close = await make(args.url, args.key, args.concurrency)
    try:
        _, _, warm_errors = await _closed_loop(senders, max(args.warmup, args.concurrency))
        print(json.dumps({"warm": True, "errors": warm_errors[:3]}), flush=True)
        go = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if go.strip() != "go":
            return
        cpu0 = os.times()
        latencies, seconds, errors = await _closed_loop(senders, args.requests)
        cpu1 = os.times()
    finally:
        await close()
    result = {
        "latencies": latencies,
        "seconds": seconds,
        "errors": len(errors),
        "first_errors": errors[:3],
        "client_cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
    }
    print(json.dumps(result), flush=True)


def client_main(argv: list[str]) -> None:
    """The load generator: warm-up, then waits for 'go' on stdin, runs, prints JSON."""
    parser = argparse.ArgumentParser(prog="gateway_overhead.py _client")
    parser.add_argument("--url", required=True)  # http://127.0.0.1:PORT/v1/chat/completions
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--client", choices=CLIENTS, default="raw")
    parser.add_argument("--key", default="none")
    args = parser.parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(_client(args))


# ---- processes -------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, process: subprocess.Popen[bytes], timeout: float, what: str, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{what} exited with {process.returncode}; log {log}:\n{log.read_text()[-3000:]}"
            )
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{what} did not answer {url} within {timeout:.0f} s; log: {log}")


def stop(process: subprocess.Popen[Any] | None) -> None:
    if process is None or process.poll() is not None:
        return
    _signal(process, signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        _signal(process, signal.SIGKILL)
        process.wait(5)


def _signal(process: subprocess.Popen[Any], sig: int) -> None:
    """``sig`` to the process's own group (its children too) when it leads one, else to it."""
    with contextlib.suppress(ProcessLookupError):
        if _own_group(process):
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)


def _own_group(process: subprocess.Popen[Any]) -> bool:
    try:
        return os.getpgid(process.pid) == process.pid
    except ProcessLookupError:
        return False


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A server subprocess in its own process group (so its children are stopped with it)."""
    handle = log.open("wb")
    return subprocess.Popen(
        cmd,
        stdout=handle,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
        cwd=ROOT,
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its descendants."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def ensure_litellm(venv: Path, console: Any) -> tuple[Path | None, str]:
    """The ``litellm`` executable in the benchmark's own venv (created on first use), or None and why."""
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe, ""
    console.print(
        f"[bold]installing LiteLLM's proxy from PyPI into {venv}[/] (first run only; a few minutes)"
    )
    log = Path(tempfile.gettempdir()) / "litellm-install.log"
    try:
        with log.open("w") as out:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=out, stderr=out)
            pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
            subprocess.run([*pip, "-q", "--upgrade", "pip"], check=True, stdout=out, stderr=out)
            subprocess.run([*pip, "litellm[proxy]"], check=True, stdout=out, stderr=out, timeout=1800)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        tail = log.read_text()[-1500:] if log.exists() else ""
        return None, f"pip install 'litellm[proxy]' into {venv} failed ({exc}); see {log}\n{tail}"
    if not exe.exists():
        return None, f"the install finished but {exe} is missing; see {log}"
    return exe, ""


def litellm_version(venv: Path) -> str:
    python = venv / "bin" / "python"
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


@dataclass
class Target:
    name: str
    url: str  # the chat-completions URL
    pid: int  # the front process (its whole tree is counted)
    upstream_pid: int | None  # the upstream behind it, if any
    requests: int
    warmup: int
    results: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)  # client -> level -> figures


def measure(target: Target, concurrency: int, client_kind: str, key: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "_client",
        "--url",
        target.url,
        "--concurrency",
        str(concurrency),
        "--requests",
        str(target.requests),
        "--warmup",
        str(target.warmup),
        "--client",
        client_kind,
        "--key",
        key,
    ]
    client = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert client.stdin is not None and client.stdout is not None
        warm = json.loads(client.stdout.readline() or "{}")
        if not warm.get("warm"):
            raise RuntimeError(f"the load generator failed during warm-up against {target.name}")
        if warm["errors"]:
            raise RuntimeError(f"{target.name} answered badly during warm-up: {warm['errors'][0]}")
        time.sleep(0.3)  # let the warm-up's stragglers (keep-alive closes) settle
        front0 = cpu_seconds(target.pid)
        up0 = cpu_seconds(target.upstream_pid) if target.upstream_pid else 0.0
        client.stdin.write("go\n")
        client.stdin.flush()
        line = client.stdout.readline()
        front1 = cpu_seconds(target.pid)
        up1 = cpu_seconds(target.upstream_pid) if target.upstream_pid else 0.0
        client.wait(30)
    finally:
        stop(client)
    if not line:
        raise RuntimeError(
            f"the load generator died while measuring {target.name} at concurrency {concurrency}"
        )
    data = json.loads(line)
    lat = sorted(data["latencies"])
    n = len(lat)
    return {
        "requests": n,
        "errors": data["errors"],
        "first_errors": data["first_errors"],
        "seconds": round(data["seconds"], 3),
        "req_per_s": round(n / data["seconds"], 1),
        "p50_ms": round(statistics.median(lat) * 1000, 3),
        "p99_ms": round(lat[min(n - 1, int(n * 0.99))] * 1000, 3),
        "mean_ms": round(statistics.fmean(lat) * 1000, 3),
        "cpu_ms_per_request": round((front1 - front0) / n * 1000, 3),
        "upstream_cpu_ms_per_request": round((up1 - up0) / n * 1000, 3) if target.upstream_pid else None,
        "client_cpu_ms_per_request": round(data["client_cpu_s"] / n * 1000, 3),
    }


# ---- the run ---------------------------------------------------------------------------


def gateway_config(path: Path, upstream: str) -> Path:
    import yaml

    config = {
        "host": "127.0.0.1",
        "models": [
            {
                "name": MODEL,
                "kind": "llm",
                "engine": "openai",
                "params": {"base_url": f"{upstream}/v1", "model": MODEL, "api_key": "x"},
            }
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def litellm_config(path: Path, upstream: str, key: str) -> Path:
    import yaml

    config = {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {"model": f"openai/{MODEL}", "api_base": f"{upstream}/v1", "api_key": "x"},
            }
        ],
        "general_settings": {"master_key": key},  # it refuses to start without one
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        client_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--requests", type=int, default=5000, help="measured requests per level (direct, gateway)"
    )
    parser.add_argument(
        "--litellm-requests", type=int, default=600, help="measured requests per level (LiteLLM)"
    )
    parser.add_argument("--warmup", type=int, default=300, help="warm-up requests per level")
    parser.add_argument("--concurrency", default="1,32,64")
    parser.add_argument(
        "--upstream", choices=("raw", "asgi"), default="raw", help="trivial upstream implementation"
    )
    parser.add_argument(
        "--clients",
        default="raw,httpx",
        help="load generators, each measuring every target: 'raw' (raw HTTP/1.1, ~0.03 ms of CPU per "
        "request) and/or 'httpx' (httpx.AsyncClient, ~0.5 ms: the issue's reference figures)",
    )
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM (no install)")
    parser.add_argument("--litellm-venv", type=Path, default=LITELLM_VENV)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gateway_overhead.json")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    if not clients or any(c not in CLIENTS for c in clients):
        parser.error(f"--clients takes a comma-separated list of {', '.join(CLIENTS)}")

    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress

    console = Console()
    # SIGTERM (and SIGHUP) unwind like Ctrl-C, so every server is stopped in the finally below
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)

    litellm_exe: Path | None = None
    litellm_note = "skipped (--no-litellm)"
    if not args.no_litellm:
        litellm_exe, why = ensure_litellm(args.litellm_venv, console)
        if litellm_exe is None:
            litellm_note = f"LiteLLM could not be installed: {why}"
            console.print(f"[bold red]{escape(litellm_note)}[/]\n[bold]measuring direct vs gateway only[/]")
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="gateway-overhead-"))
    key = "sk-bench-" + secrets.token_hex(
        16
    )  # the gateway and LiteLLM both check it; the upstream ignores it
    processes: list[subprocess.Popen[bytes]] = []
    targets: list[Target] = []
    try:
        up_port = free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        up_cmd = [
            sys.executable,
            str(HERE / "trivial_upstream.py"),
            "--port",
            str(up_port),
            "--impl",
            args.upstream,
        ]
        up = spawn(up_cmd, tmp / "upstream.log")
        processes.append(up)
        wait_http(f"{upstream}/health", up, 30, "the trivial upstream", tmp / "upstream.log")
        targets.append(
            Target("direct", f"{upstream}/v1/chat/completions", up.pid, None, args.requests, args.warmup)
        )

        gw_port = free_port()
        gw_cmd = [
            sys.executable,
            "-m",
            "sage_prefect.controlplane.server",
            "--config",
            str(gateway_config(tmp / "controlplane.yaml", upstream)),
            "--port",
            str(gw_port),
        ]
        gw = spawn(gw_cmd, tmp / "gateway.log", env={"SAGE_CONTROLPLANE_API_KEYS": f"bench:{key}"})
        processes.append(gw)
        wait_http(f"http://127.0.0.1:{gw_port}/health", gw, 120, "the sage gateway", tmp / "gateway.log")
        targets.append(
            Target(
                "gateway",
                f"http://127.0.0.1:{gw_port}/v1/chat/completions",
                gw.pid,
                up.pid,
                args.requests,
                args.warmup,
            )
        )

        if litellm_exe is not None:
            ll_port = free_port()
            ll_cmd = [
                str(litellm_exe),
                "--config",
                str(litellm_config(tmp / "litellm.yaml", upstream, key)),
                "--host",
                "127.0.0.1",
                "--port",
                str(ll_port),
            ]
            env = {"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "NO_DOCS": "True"}
            ll = spawn(ll_cmd, tmp / "litellm.log", env=env)
            processes.append(ll)
            try:
                wait_http(
                    f"http://127.0.0.1:{ll_port}/health/liveliness",
                    ll,
                    180,
                    "LiteLLM's proxy",
                    tmp / "litellm.log",
                )
                litellm_note = (
                    f"litellm {litellm_version(args.litellm_venv)} (its proxy, default settings, 1 worker)"
                )
                targets.append(
                    Target(
                        "litellm",
                        f"http://127.0.0.1:{ll_port}/v1/chat/completions",
                        ll.pid,
                        up.pid,
                        args.litellm_requests,
                        max(50, args.warmup // 2),
                    )
                )
            except (RuntimeError, TimeoutError) as exc:
                litellm_note = f"LiteLLM's proxy did not start: {exc}"
                console.print(f"[bold red]{escape(litellm_note)}[/]")

        runs = [(k, c, t) for k in clients for c in levels for t in targets]
        with Progress(console=console, transient=True) as progress:
            bar = progress.add_task("measuring", total=len(runs))
            for kind, concurrency, target in runs:
                progress.update(bar, description=f"{kind} client: {target.name} at concurrency {concurrency}")
                figures = measure(target, concurrency, kind, key)
                target.results.setdefault(kind, {})[concurrency] = figures
                progress.advance(bar)
    finally:
        for process in reversed(processes):
            stop(process)

    report: dict[str, Any] = {
        "command": "python " + " ".join(["benchmarks/gateway_overhead.py", *sys.argv[1:]]),
        "git_commit": git_commit(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average_1min_before": round(load_before, 2),
        "request": BODY,
        "upstream": f"benchmarks/trivial_upstream.py --impl {args.upstream}",
        "litellm": litellm_note,
        "clients": {
            "raw": "raw HTTP/1.1 over keep-alive connections (one per concurrent request), own process",
            "httpx": "one httpx.AsyncClient per concurrent request (one connection each), own process",
        },
        "auth": "the gateway and LiteLLM check an API key (Bearer) on every request",
        "cpu": "server CPU = user+system time of the front process tree during the measured requests",
        "goals": {
            "gateway_vs_direct_req_per_s": GOAL_RATIO,
            "gateway_added_p50_ms_at_concurrency_1": GOAL_ADDED_P50_MS,
        },
    }
    for kind in clients:
        by_name = {t.name: t.results[kind] for t in targets}
        ratios: dict[str, Any] = {}
        for c in levels:
            d, g = by_name["direct"][c], by_name["gateway"][c]
            entry = {
                "gateway_vs_direct_req_per_s": round(g["req_per_s"] / d["req_per_s"], 3),
                "gateway_added_p50_ms": round(g["p50_ms"] - d["p50_ms"], 3),
            }
            if "litellm" in by_name:
                lite = by_name["litellm"][c]
                entry["gateway_vs_litellm_req_per_s"] = round(g["req_per_s"] / lite["req_per_s"], 2)
                entry["litellm_vs_direct_req_per_s"] = round(lite["req_per_s"] / d["req_per_s"], 3)
                entry["litellm_added_p50_ms"] = round(lite["p50_ms"] - d["p50_ms"], 3)
            ratios[str(c)] = entry
        concurrent = [r["gateway_vs_direct_req_per_s"] for c, r in ratios.items() if int(c) > 1]
        added_c1 = ratios["1"]["gateway_added_p50_ms"] if "1" in ratios else None
        report[kind] = {
            "results": {name: {str(c): r for c, r in res.items()} for name, res in by_name.items()},
            "ratios": ratios,
            "met": {
                "req_per_s_under_concurrency": bool(concurrent) and min(concurrent) >= GOAL_RATIO,
                "req_per_s_every_level": min(r["gateway_vs_direct_req_per_s"] for r in ratios.values())
                >= GOAL_RATIO,
                "added_p50_at_concurrency_1": added_c1 is not None and added_c1 <= GOAL_ADDED_P50_MS,
            },
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    for kind in clients:
        print_client(console, kind, report, levels)
    console.print(f"LiteLLM: {escape(litellm_note)}")
    console.print(f"written to {escape(str(args.out))}")


def print_client(console: Any, kind: str, report: dict[str, Any], levels: list[int]) -> None:
    from rich.table import Table

    part = report[kind]
    table = Table(title=f"{kind} client: chat completions, non-streaming ({report['machine']})")
    columns = (
        "target",
        "concurrency",
        "req/s",
        "p50 ms",
        "p99 ms",
        "server CPU ms/req",
        "upstream CPU ms/req",
    )
    for col in columns:
        table.add_column(col, justify="left" if col == "target" else "right")
    for c in levels:
        for name, res in part["results"].items():
            r = res[str(c)]
            up_cpu = r["upstream_cpu_ms_per_request"]
            table.add_row(
                name,
                str(c),
                f"{r['req_per_s']:,.0f}",
                f"{r['p50_ms']:.2f}",
                f"{r['p99_ms']:.2f}",
                f"{r['cpu_ms_per_request']:.2f}",
                "" if up_cpu is None else f"{up_cpu:.2f}",
            )
    console.print(table)
    for c, r in part["ratios"].items():
        line = f"  concurrency {c}: gateway/direct {r['gateway_vs_direct_req_per_s']:.2f}x req/s"
        if "gateway_vs_litellm_req_per_s" in r:
            line += f", gateway/litellm {r['gateway_vs_litellm_req_per_s']:.1f}x req/s"
        line += f", gateway adds {r['gateway_added_p50_ms']:+.2f} ms p50"
        if "litellm_added_p50_ms" in r:
            line += f" (litellm {r['litellm_added_p50_ms']:+.2f} ms)"
        console.print(line)
    met = part["met"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    console.print(
        f"  goals: >= {GOAL_RATIO}x direct req/s under concurrency (32, 64): "
        f"{verdict(met['req_per_s_under_concurrency'])}, at every level: {verdict(met['req_per_s_every_level'])}; "
        f"<= {GOAL_ADDED_P50_MS} ms added p50 at concurrency 1: {verdict(met['added_p50_at_concurrency_1'])}"
    )
    errors = sum(r["errors"] for res in part["results"].values() for r in res.values())
    if errors:
        console.print(f"[bold red]  {errors} requests were answered badly; see first_errors in the JSON[/]")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: every server this run started has been stopped", file=sys.stderr)
        sys.exit(130)
