"""The load generator: the arrival process and the plan (pure, seeded), spec validation, and short
real runs against the control plane, a server that answers 429, and a closed port."""

from __future__ import annotations

import doctest
import json
import math
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from pydantic import ValidationError

from sage_prefect.benchmark import loadgen
from sage_prefect.benchmark.loadgen import (
    SLO,
    LengthDist,
    LoadSpec,
    Probe,
    RequestResult,
    Workload,
    arrival_offsets,
    plan_requests,
    run_load_sync,
    sweep_sync,
    synthetic_text,
)
from sage_prefect.benchmark.metrics import summarize, summarize_probe

LLM = "sage-tiny-random-lm"
EMBEDDER = "all-MiniLM-L6-v2"


# -- arrivals -------------------------------------------------------------------------------------


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 4.0])
def test_arrival_rate_and_burstiness(burstiness: float) -> None:
    rate, n = 50.0, 20_000
    offsets = arrival_offsets(rate, n, burstiness, seed=7)
    gaps = np.diff(offsets, prepend=0.0)
    assert np.all(gaps >= 0)
    assert n / offsets[-1] == pytest.approx(rate, rel=0.03)
    cv = gaps.std() / gaps.mean()
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_arrivals_inf_rate_seed_and_normalisation() -> None:
    assert np.array_equal(arrival_offsets(math.inf, 5, seed=3), np.zeros(5))
    assert np.array_equal(arrival_offsets(10.0, 100, 0.5, seed=3), arrival_offsets(10.0, 100, 0.5, seed=3))
    assert not np.array_equal(arrival_offsets(10.0, 100, seed=3), arrival_offsets(10.0, 100, seed=4))
    normalized = arrival_offsets(10.0, 100, seed=3, normalize=True)
    assert normalized[-1] == pytest.approx(10.0)
    raw = arrival_offsets(10.0, 100, seed=3)
    assert np.allclose(normalized / raw, normalized[-1] / raw[-1])  # a pure rescaling
    assert len(arrival_offsets(10.0, 0)) == 0
    with pytest.raises(ValueError, match="rate"):
        arrival_offsets(0.0, 3)


def test_plan_is_seeded_and_follows_weights_and_lengths() -> None:
    spec = LoadSpec(
        workloads=[
            Workload(name="a", model="m", weight=3.0, input_tokens=20, output_tokens=LengthDist(mean=8)),
            Workload(
                name="e",
                kind="embedding",
                model="x",
                texts_per_request=4,
                input_tokens=LengthDist(mean=10, min=9, max=11, kind="normal", std=5),
            ),
        ],
        rate=100.0,
        num_requests=4000,
        seed=11,
    )
    plan = plan_requests(spec)
    assert plan == plan_requests(spec)
    assert plan != plan_requests(spec.model_copy(update={"seed": 12}))
    assert [p.index for p in plan] == list(range(4000)) and len({p.request_id for p in plan}) == 4000
    assert plan[-1].scheduled_s == pytest.approx(40.0)  # num_requests / rate, as vLLM
    share = sum(p.workload.name == "a" for p in plan) / len(plan)
    assert share == pytest.approx(0.75, abs=0.03)
    for p in plan:
        if p.workload.name == "a":
            assert p.input_lens == (20,) and p.max_tokens == 8
        else:
            assert len(p.input_lens) == 4 and all(9 <= n <= 11 for n in p.input_lens) and p.max_tokens == 0

    timed = plan_requests(spec.model_copy(update={"num_requests": None, "duration_s": 30.0}))
    assert all(p.scheduled_s <= 30.0 for p in timed)
    assert len(timed) == pytest.approx(3000, rel=0.08)
    assert [p.scheduled_s for p in timed[:50]] == pytest.approx(list(arrival_offsets(100.0, 50, seed=11)))


def test_length_distributions() -> None:
    rng = np.random.default_rng(0)
    assert LengthDist(mean=12.4).sample(rng, 3).tolist() == [12, 12, 12]
    uni = LengthDist(kind="uniform", mean=100, range_ratio=0.5).sample(rng, 5000)
    assert uni.min() >= 50 and uni.max() <= 150 and uni.mean() == pytest.approx(100, rel=0.03)
    logn = LengthDist(kind="lognormal", mean=200, std=100).sample(rng, 20_000)
    assert logn.mean() == pytest.approx(200, rel=0.03) and logn.std() == pytest.approx(100, rel=0.08)
    clipped = LengthDist(kind="normal", mean=10, std=50, min=5, max=20).sample(rng, 1000)
    assert clipped.min() == 5 and clipped.max() == 20
    assert LengthDist(mean=3).sample(rng, 0).shape == (0,)


def test_synthetic_text_is_deterministic_and_distinct() -> None:
    a = synthetic_text(50, seed=1, key=(4, 2))
    assert a == synthetic_text(50, seed=1, key=(4, 2))
    assert len(a.split()) == 50
    assert a != synthetic_text(50, seed=1, key=(4, 3)) and a != synthetic_text(50, seed=2, key=(4, 2))
    assert a.split()[:5] != synthetic_text(50, seed=1, key=(5, 2)).split()[:5]  # no shared prefix


# -- validation -----------------------------------------------------------------------------------

W = {"name": "w", "model": "m"}


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"workloads": [], "num_requests": 1}, "workloads"),
        ({"workloads": [W], "rate": -1.0, "num_requests": 1}, "rate"),
        ({"workloads": [W], "rate": "fast", "num_requests": 1}, "rate"),
        ({"workloads": [W], "num_requests": 1, "rte": 3}, "rte"),
        ({"workloads": [W]}, "num_requests"),
        ({"workloads": [W], "num_requests": 1, "duration_s": 5.0}, "num_requests"),
        ({"workloads": [W], "duration_s": 5.0}, "duration_s"),  # rate inf
        ({"workloads": [W, W], "num_requests": 1}, "unique"),
        ({"workloads": [{**W, "kind": "chatt"}], "num_requests": 1}, "workloads.0.kind"),
        ({"workloads": [{**W, "weight": 0.0}], "num_requests": 1}, "workloads.0.weight"),
        ({"workloads": [{**W, "texts_per_request": 4}], "num_requests": 1}, "texts_per_request"),
        ({"workloads": [{**W, "input_tokens": {"mean": 5, "std": 2}}], "num_requests": 1}, "std"),
        ({"workloads": [{**W, "output_tokens": {"mean": 5, "min": 9, "max": 3}}], "num_requests": 1}, "max"),
        ({"workloads": [W], "num_requests": 1, "probe": {"rate": 1.0}}, "probe.model"),
        ({"workloads": [W], "num_requests": 1, "burstiness": 0}, "burstiness"),
        ({"workloads": [W], "num_requests": "3"}, "num_requests"),  # strict: no string coercion
    ],
)
def test_spec_validation_names_the_field(data: dict[str, object], where: str) -> None:
    with pytest.raises(ValidationError) as info:
        LoadSpec.model_validate(data)
    assert where in str(info.value)


def test_spec_accepts_inf_strings_and_shorthand_lengths() -> None:
    spec = LoadSpec.model_validate(
        {"workloads": [{**W, "input_tokens": 64}], "rate": "Infinity", "num_requests": 2}
    )
    assert math.isinf(spec.rate) and spec.workloads[0].input_tokens == LengthDist(mean=64)
    again = LoadSpec.model_validate(json.loads(spec.model_dump_json()))
    assert again == spec
    assert spec.with_rate(5.0).rate == 5.0
    with pytest.raises(ValidationError, match="duration_s"):
        LoadSpec(workloads=[Workload(**W)], rate=2.0, duration_s=3.0).with_rate(math.inf)
    assert Workload(**W, slo_class="batch", priority=3).headers() == {
        "x-slo-class": "batch",
        "x-priority": "3",
    }


def test_doctests() -> None:
    assert doctest.testmod(loadgen).failed == 0


# -- real runs ------------------------------------------------------------------------------------


def _overlap(results: list[RequestResult]) -> int:
    events = sorted(
        [(r.start_s, 1) for r in results] + [(r.start_s + (r.latency_s or 0.0), -1) for r in results]
    )
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return peak


def test_mixed_run_against_the_control_plane(controlplane: str) -> None:
    spec = LoadSpec(
        workloads=[
            Workload(
                name="chat",
                model=LLM,
                weight=2.0,
                slo_class="interactive",
                priority=-1,
                input_tokens=16,
                output_tokens=LengthDist(kind="uniform", mean=8, range_ratio=0.5),
            ),
            Workload(
                name="complete", kind="completion", model=LLM, input_tokens=12, output_tokens=6, stream=False
            ),
            Workload(
                name="embed",
                kind="embedding",
                model=EMBEDDER,
                slo_class="batch",
                texts_per_request=3,
                input_tokens=10,
            ),
        ],
        rate=20.0,
        num_requests=12,
        max_concurrency=3,
        warmup_requests=1,
        seed=5,
        probe=Probe(rate=4.0, model=LLM, slo_class="interactive"),
        request_timeout_s=30.0,
    )
    calls: list[tuple[int, int]] = []
    load = run_load_sync(controlplane, spec, progress=lambda done, total: calls.append((done, total)))

    plan = plan_requests(spec)
    main = load.main
    assert [r.request_id for r in main] == [p.request_id for p in plan]
    assert {r.workload for r in main} == {"chat", "complete", "embed"}, "the seed should draw every workload"
    assert all(r.status == "ok" for r in load.results), [r.error for r in load.results if r.error]
    assert len(load.warmup) == 1 and load.warmup[0].status == "ok"
    assert calls[0] == (0, 12) and calls[-1] == (12, 12) and len(calls) == 13
    assert load.duration_s >= plan[-1].scheduled_s
    assert _overlap(main) <= 3  # max_concurrency
    for r, p in zip(main, plan, strict=True):
        assert r.scheduled_s == p.scheduled_s and r.start_s >= r.scheduled_s - 0.05
        assert r.slo_class == p.workload.slo_class and r.http_status == 200
        assert r.prompt_tokens > 0 and r.latency_s is not None and r.ttft_s is not None
        assert 0 < r.ttft_s <= r.latency_s
        if r.kind == "chat":  # streamed
            assert 1 <= r.output_tokens <= p.max_tokens
            assert r.chunks >= 1 and len(r.itl_s) == r.chunks - 1
            assert r.tpot_s is None or r.tpot_s >= 0
        elif r.kind == "completion":  # not streamed: first byte is the whole answer
            assert r.ttft_s == r.latency_s and r.itl_s == [] and 1 <= r.output_tokens <= 6
        else:
            assert r.output_tokens == 0 and r.ttft_s == r.latency_s and r.itl_s == []

    probes = load.probes
    assert probes and all(r.probe and r.kind == "chat" and r.slo_class == "interactive" for r in probes)
    assert all(r.output_tokens <= 1 for r in probes)
    assert max(r.scheduled_s for r in probes) <= load.duration_s

    s = summarize(load.results, load.duration_s, goodput=SLO(e2el_ms=60_000))
    assert s["completed"] == 12 and s["failed"] == 0 and s["rejected"] == 0
    assert s["request_goodput"] == pytest.approx(s["request_throughput"])
    assert s["total_output_tokens"] == sum(r.output_tokens for r in main)
    assert summarize_probe(load.results)["probe_count"] == len(probes)
    json.dumps(load.to_dict(), allow_nan=False)


def test_bad_requests_become_error_results(controlplane: str) -> None:
    spec = LoadSpec(
        workloads=[
            Workload(name="bad-class", model=LLM, slo_class="no-such-class", input_tokens=4, output_tokens=2),
            Workload(name="bad-model", kind="embedding", model="no-such-model", input_tokens=4),
        ],
        num_requests=6,  # rate inf: all at once
        seed=1,
    )
    load = run_load_sync(controlplane, spec)
    assert len(load.results) == 6
    by_name = {r.workload: r for r in load.results}
    assert by_name["bad-class"].status == "error" and by_name["bad-class"].http_status == 400
    assert "no-such-class" in (by_name["bad-class"].error or "")
    assert by_name["bad-model"].status == "error" and by_name["bad-model"].http_status == 404
    assert all(r.ttft_s is None and r.latency_s is not None for r in load.results)
    assert summarize(load.results, load.duration_s)["failed"] == 6


class _Busy(BaseHTTPRequestHandler):
    """Every POST is turned away with OpenAI's 429 envelope."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.dumps(
            {"error": {"message": "queue full", "type": "rate_limit_error", "param": None, "code": None}}
        )
        self.send_response(429)
        self.send_header("content-type", "application/json")
        self.send_header("retry-after", "1")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def busy_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_429_is_recorded_as_rejected_never_retried(busy_server: str) -> None:
    spec = LoadSpec(
        workloads=[
            Workload(name="chat", model="m", output_tokens=2),
            Workload(name="embed", kind="embedding", model="e"),
        ],
        rate=200.0,
        num_requests=6,
        probe=Probe(rate=50.0, model="m"),
    )
    load = run_load_sync(busy_server, spec, progress=True)
    assert len(load.main) == 6
    assert all(r.status == "rejected" and r.http_status == 429 for r in load.results)
    assert "queue full" in (load.results[0].error or "")
    s = summarize(load.results, load.duration_s)
    assert (s["completed"], s["rejected"], s["failed"]) == (0, 6, 0)
    assert math.isnan(s["mean_e2el_ms"])

    steps = sweep_sync(busy_server, spec.model_copy(update={"probe": None, "num_requests": 2}), [10.0, 40.0])
    assert [step.spec.rate for step in steps] == [10.0, 40.0]
    assert [step.spec.text_salt for step in steps] == [0, 1]  # fresh prompts per step: no prefix-cache hits
    assert [r.request_id for r in steps[0].results] == [r.request_id for r in steps[1].results]


def test_unreachable_endpoint_is_an_error_not_a_crash() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the run: nothing listens there
    spec = LoadSpec(workloads=[Workload(**W)], num_requests=2, request_timeout_s=5.0)
    load = run_load_sync(f"http://127.0.0.1:{port}/v1", spec)
    assert [r.status for r in load.results] == ["error", "error"]
    assert all(r.http_status is None and "Connection" in (r.error or "") for r in load.results)


def test_duration_mode_sends_every_planned_arrival(busy_server: str) -> None:
    spec = LoadSpec(workloads=[Workload(**W)], rate=40.0, duration_s=0.3, seed=3)
    load = run_load_sync(busy_server, spec)
    assert [r.request_id for r in load.results] == [p.request_id for p in plan_requests(spec)]
    assert load.results and all(r.scheduled_s <= 0.3 for r in load.results)


def test_import_stays_light() -> None:
    code = "import sys, sage_prefect.benchmark.metrics; assert 'openai' not in sys.modules, 'openai'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
