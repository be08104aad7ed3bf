"""Replicas placed on Dask workers: scale-out, scale-up time, and a worker killed under load.

Every scenario runs the real gateway in a subprocess, which starts a local Dask cluster of
CPU-labelled worker processes on 127.0.0.1 and places all-MiniLM-L6-v2 replicas on them
(``resources: {CPU: 1}``: one core and one torch thread each). Clients are closed-loop
``httpx.AsyncClient`` coroutines in this process sending ``--texts-per-request`` texts per
request (English-like sentences of 8-60 words, seeded).

  scale-out   embedding throughput (texts/s) through the gateway with 1 replica and with 2,
              on two worker processes, alternating ``--repeats`` times; best run of each.
              Goal: 2 replicas >= 1.6x 1 replica. For reference, in the same rotation: one
              replica inside the gateway process (no cluster), the cost of the extra hop.
  scale-up    ``replicas: {min: 1, max: 2}``: an overload starts at t=0 (interactive class,
              2 s objective); seconds until the scheduler asks for a second replica, and until
              that replica serves. Goal: <= 30 s (MiniLM ships in a package: the store is warm).
  worker-kill 2 replicas on 3 workers; under load the worker process hosting one replica is
              killed with SIGKILL. Failed requests (goal: 0; every request here is
              non-streamed), and seconds until the replica serves again on another worker and
              throughput is back to 90% of what it was before the kill.

Run:  .venv/bin/python benchmarks/placement.py [--seconds 25] [--repeats 2]
Writes benchmarks/results/placement.json and docs/img/placement-timeline.png (texts/s per
second and replica count, for the scale-up and worker-kill runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import git_commit  # noqa: E402
from _gateway import EMBEDDING_MODEL, gateway, make_texts  # noqa: E402

from sage_prefect.controlplane.metrics import sample_sum  # noqa: E402
from sage_prefect.controlplane.server import Background  # noqa: E402

GOAL_SCALE_OUT = 1.6
GOAL_SCALE_UP_S = 30.0
ROOT = Path(__file__).resolve().parent.parent


def config(n_workers: int, replicas: Any, **extra: Any) -> dict[str, Any]:
    return {
        "cluster": {"address": "local", "n_gpu_workers": 0, "n_cpu_workers": n_workers},
        "models": [
            {
                "name": EMBEDDING_MODEL,
                "kind": "embedding",
                "engine": "sentence-transformers",
                "resources": {"CPU": 1},
                "replicas": replicas,
            }
        ],
        **extra,
    }


class Load:
    """Closed-loop clients; counts texts embedded per wall-clock second and every failure."""

    def __init__(self, bg: Background, texts: list[str], per_request: int, concurrency: int) -> None:
        self.bg = bg
        self.texts = texts
        self.per_request = per_request
        self.concurrency = concurrency
        self.done: list[tuple[float, int]] = []  # (finish time, texts)
        self.failed: list[str] = []
        self.refused = 0  # 429 from admission control: expected under overload, retried
        self.stop = asyncio.Event()
        self.t0 = time.monotonic()

    async def client(self, n: int) -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            i = n
            while not self.stop.is_set():
                start = (i * self.per_request) % (len(self.texts) - self.per_request)
                body = {"model": EMBEDDING_MODEL, "input": self.texts[start : start + self.per_request]}
                try:
                    r = await http.post(f"{self.bg.base_url}/embeddings", json=body)
                except httpx.HTTPError as exc:
                    self.failed.append(f"{type(exc).__name__}: {exc}")
                    continue
                if r.status_code == 200 and len(r.json()["data"]) == self.per_request:
                    self.done.append((time.monotonic(), self.per_request))
                elif r.status_code == 429:
                    self.refused += 1
                    await asyncio.sleep(0.05)
                else:
                    self.failed.append(f"{r.status_code}: {r.text[:200]}")
                i += self.concurrency

    def rate(self, since: float, until: float) -> float:
        texts = sum(n for t, n in self.done if since <= t < until)
        return texts / max(1e-9, until - since)

    def series(self, end: float) -> list[float]:
        """Texts per second in each whole second since the start."""
        seconds = int(end - self.t0) + 1
        out = [0.0] * seconds
        for t, n in self.done:
            k = int(t - self.t0)
            if 0 <= k < seconds:
                out[k] += n
        return out


async def run_load(
    bg: Background,
    texts: list[str],
    args: argparse.Namespace,
    seconds: float,
    during: Callable[[Load], Any] | None = None,
) -> Load:
    load = Load(bg, texts, args.texts_per_request, args.concurrency)
    clients = [asyncio.create_task(load.client(n)) for n in range(args.concurrency)]
    try:
        if during is not None:
            await during(load)
        else:
            await asyncio.sleep(seconds)
    finally:
        load.stop.set()
        await asyncio.gather(*clients)
    return load


def health(bg: Background) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(f"{bg.url}/health", timeout=10).json()
    return doc


def serving(bg: Background) -> list[dict[str, Any]]:
    return [p for p in health(bg)["placed"].values() if p["state"] == "ready"]


IN_GATEWAY = 0  # reference: one replica inside the gateway process, no cluster (the extra hop's cost)


def scale_out(texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[int, list[float]] = {1: [], 2: [], IN_GATEWAY: []}
    in_gateway = {
        "models": [{"name": EMBEDDING_MODEL, "kind": "embedding", "engine": "sentence-transformers"}]
    }
    for _ in range(args.repeats):
        for replicas in (1, 2, IN_GATEWAY):
            cfg = in_gateway if replicas == IN_GATEWAY else config(2, replicas)
            with gateway(cfg, torch_threads=1) as bg:
                asyncio.run(run_load(bg, texts, args, 3))  # warm-up: first batches, connections
                load = asyncio.run(run_load(bg, texts, args, args.seconds))
                end = time.monotonic()
                rate = load.rate(load.t0 + 2, end)
                runs[replicas].append(rate)
                what = (
                    "1 replica in the gateway" if replicas == IN_GATEWAY else f"{replicas} placed replica(s)"
                )
                print(f"  {what}: {rate:.0f} texts/s, {len(load.failed)} failed", flush=True)
    best = {k: max(v) for k, v in runs.items()}
    ratio = best[2] / best[1]
    return {
        "texts_per_s_1_replica": round(best[1], 1),
        "texts_per_s_2_replicas": round(best[2], 1),
        "ratio": round(ratio, 3),
        "goal": GOAL_SCALE_OUT,
        "met": ratio >= GOAL_SCALE_OUT,
        "texts_per_s_1_replica_in_the_gateway": round(best[IN_GATEWAY], 1),
        "placed_vs_in_gateway_1_replica": round(best[1] / best[IN_GATEWAY], 3),
        "runs": {
            ("in_gateway" if k == IN_GATEWAY else str(k)): [round(x, 1) for x in v] for k, v in runs.items()
        },
    }


def scale_up(texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    cfg = config(2, {"min": 1, "max": 2, "down_delay_s": 600})
    with gateway(cfg, torch_threads=1) as bg:
        assert len(serving(bg)) == 1
        marks: dict[str, float] = {}
        counts: list[tuple[float, int]] = []

        async def watch(load: Load) -> None:
            deadline = load.t0 + 120
            while time.monotonic() < deadline:
                now = time.monotonic()
                text = (await asyncio.to_thread(httpx.get, f"{bg.url}/metrics", timeout=10)).text
                ups = sample_sum(text, "sage_scale_events_total", direction="up") or 0
                if ups >= 2 and "asked" not in marks:
                    marks["asked"] = now - load.t0
                ready = len(await asyncio.to_thread(serving, bg))
                counts.append((now - load.t0, ready))
                if ready >= 2 and "serving" not in marks:
                    marks["serving"] = now - load.t0
                    await asyncio.sleep(args.seconds / 2)  # and a while on both
                    return
                await asyncio.sleep(0.2)

        load = asyncio.run(run_load(bg, texts, args, 0, during=watch))
        end = time.monotonic()
        series = load.series(end)
    return {
        "seconds_to_scale_decision": round(marks.get("asked", float("nan")), 2),
        "seconds_to_second_replica_serving": round(marks.get("serving", float("nan")), 2),
        "goal_s": GOAL_SCALE_UP_S,
        "met": marks.get("serving", 1e9) <= GOAL_SCALE_UP_S,
        "failed_requests": len(load.failed),
        "refused_429": load.refused,
        "texts_per_s": series,
        "replicas": counts,
    }


def worker_kill(texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from distributed import Client

    with gateway(config(3, 2), torch_threads=1) as bg:
        doc = health(bg)
        victim_id = f"{EMBEDDING_MODEL}#0"
        victim = doc["placed"][victim_id]
        with Client(doc["cluster"], timeout=30) as client:
            pid = client.run(os.getpid)[victim["worker"]]
        marks: dict[str, float] = {}
        counts: list[tuple[float, int]] = []

        async def kill(load: Load) -> None:
            await asyncio.sleep(args.seconds / 2)
            before = load.rate(load.t0 + 2, time.monotonic())
            marks["before_texts_per_s"] = before
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            marks["killed"] = killed - load.t0
            while time.monotonic() - killed < 120:
                now = time.monotonic()
                info = (await asyncio.to_thread(health, bg))["placed"][victim_id]
                counts.append((now - load.t0, len(await asyncio.to_thread(serving, bg))))
                if "back" not in marks and info["state"] == "ready" and info["worker"] != victim["worker"]:
                    marks["back"] = now - killed
                    marks["back_on"] = info["worker_name"]
                if "back" in marks and load.rate(now - 3, now) >= 0.9 * before:
                    marks["capacity"] = now - killed
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(3)

        load = asyncio.run(run_load(bg, texts, args, 0, during=kill))
        series = load.series(time.monotonic())
    return {
        "failed_requests": len(load.failed),
        "failures": load.failed[:5],
        "refused_429": load.refused,
        "requests_ok": len(load.done),
        "killed_worker": victim["worker_name"],
        "replica_back_on": marks.get("back_on"),
        "seconds_until_replica_serves_again": round(marks.get("back", float("nan")), 2),
        "seconds_until_throughput_back_to_90pct": round(marks.get("capacity", float("nan")), 2),
        "texts_per_s_before_kill": round(marks.get("before_texts_per_s", 0.0), 1),
        "killed_at_s": round(marks.get("killed", float("nan")), 2),
        "texts_per_s": series,
        "replicas": counts,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, key, title in (
        (axes[0], "scale_up", "overload from t=0: a second replica is started"),
        (axes[1], "worker_kill", "worker of one replica killed (SIGKILL)"),
    ):
        data = result[key]
        raw = data["texts_per_s"]  # batches of 64 finish about once a second: a 3 s mean reads better
        smooth = [sum(raw[max(0, i - 2) : i + 1]) / len(raw[max(0, i - 2) : i + 1]) for i in range(len(raw))]
        ax.plot(range(len(raw)), smooth, label="texts/s (3 s mean)", color="tab:blue")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds")
        twin = ax.twinx()
        if data["replicas"]:
            ts, ns = zip(*data["replicas"], strict=True)
            twin.step(ts, ns, where="post", color="tab:orange", label="replicas serving")
            twin.legend(loc="upper right", fontsize=8)
        twin.set_ylim(0, 3)
        twin.set_ylabel("replicas serving")
        if key == "scale_up":
            for mark, style in (
                ("seconds_to_scale_decision", ":"),
                ("seconds_to_second_replica_serving", "--"),
            ):
                if data[mark] == data[mark]:
                    ax.axvline(data[mark], color="gray", linestyle=style, label=mark.replace("_", " "))
        else:
            ax.axvline(data["killed_at_s"], color="red", linestyle="--", label="worker killed")
        ax.legend(loc="upper left", fontsize=8)
    axes[0].set_ylabel("texts embedded per second")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=25)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--texts-per-request", type=int, default=8)
    parser.add_argument("--only", choices=("scale_out", "scale_up", "worker_kill"), action="append")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "placement.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "placement-timeline.png")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from --out")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.out.read_text()), args.plot)
        return
    texts = make_texts(4000, seed=7)
    result: dict[str, Any] = {
        "command": "python benchmarks/placement.py " + " ".join(sys.argv[1:]),
        "commit": git_commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "concurrency": args.concurrency,
        "texts_per_request": args.texts_per_request,
    }
    scenarios = {"scale_out": scale_out, "scale_up": scale_up, "worker_kill": worker_kill}
    for name, fn in scenarios.items():
        if args.only and name not in args.only:
            continue
        print(f"{name} ...", flush=True)
        result[name] = fn(texts, args)
        summary = {k: v for k, v in result[name].items() if k not in ("texts_per_s", "replicas", "runs")}
        print(f"{name}: {json.dumps(summary)}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if "scale_up" in result and "worker_kill" in result:
        plot(result, args.plot)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
