"""`summarize`, `slo_attainment`, `summarize_by` and `summarize_probe` on hand-made traces whose
every number is worked out by hand below (vLLM's definitions, see the module docstring)."""

from __future__ import annotations

import doctest
import json
import math

import pytest

from sage_prefect.benchmark import metrics
from sage_prefect.benchmark.loadgen import SLO, LoadResult, LoadSpec, RequestResult, Workload
from sage_prefect.benchmark.metrics import (
    slo_attainment,
    summarize,
    summarize_by,
    summarize_load,
    summarize_probe,
)

DURATION = 10.0


def approx(x: float) -> object:
    return pytest.approx(x, rel=1e-9, abs=1e-9)


def _r(rid: str, kind: str = "chat", **kw: object) -> RequestResult:
    return RequestResult(request_id=rid, workload=kw.pop("workload", kind), kind=kind, model="m", **kw)  # type: ignore[arg-type]


def trace() -> list[RequestResult]:
    return [
        # TPOT (0.5 - 0.2) / 3 = 0.1; chunk times 0.2 0.3 0.4 0.5 (bucket 0)
        _r("A", ttft_s=0.2, itl_s=[0.1, 0.1, 0.1], latency_s=0.5, prompt_tokens=10, output_tokens=4,
           chunks=4, slo_class="interactive", start_s=0.0),
        # one output token: no TPOT (0 for goodput); chunk at 1.4 (bucket 1)
        _r("B", kind="completion", ttft_s=0.4, latency_s=0.4, prompt_tokens=20, output_tokens=1, chunks=1,
           slo_class="interactive", start_s=1.0),
        # 5 tokens in 3 chunks: TPOT (0.9 - 0.3) / 4 = 0.15; chunks at 2.3 2.5 2.9 (bucket 2)
        _r("C", ttft_s=0.3, itl_s=[0.2, 0.4], latency_s=0.9, prompt_tokens=30, output_tokens=5, chunks=3,
           slo_class="batch", start_s=2.0),
        # embeddings: requests, input tokens and e2el only; D overlaps A -> 2 in flight
        _r("D", kind="embedding", ttft_s=0.05, latency_s=0.05, prompt_tokens=16, slo_class="batch", start_s=0.4),
        _r("E", kind="embedding", ttft_s=0.15, latency_s=0.15, prompt_tokens=8, start_s=3.0),
        _r("F", status="error", http_status=500, error="boom", latency_s=0.01, slo_class="interactive"),
        _r("G", status="rejected", http_status=429, error="busy", latency_s=0.002, slo_class="interactive"),
        # a probe: in no main metric
        _r("P", ttft_s=9.0, latency_s=9.0, prompt_tokens=1000, output_tokens=1, chunks=1, probe=True,
           slo_class="interactive"),
    ]  # fmt: skip


def test_summary_matches_vllm_definitions_by_hand() -> None:
    s = summarize(trace(), DURATION)
    assert s["duration"] == DURATION
    assert (s["completed"], s["failed"], s["rejected"]) == (5, 1, 1)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (84, 10)
    assert s["request_throughput"] == approx(0.5)
    assert s["output_throughput"] == approx(1.0)
    assert s["total_token_throughput"] == approx(9.4)
    assert "request_goodput" not in s
    assert s["max_output_tokens_per_s"] == 4
    assert s["max_concurrent_requests"] == 2

    # TTFT over A, B, C: 200 400 300 ms
    assert s["mean_ttft_ms"] == approx(300.0)
    assert s["median_ttft_ms"] == approx(300.0)
    assert s["p50_ttft_ms"] == approx(300.0)
    assert s["std_ttft_ms"] == approx(math.sqrt(20000 / 3))
    assert s["p90_ttft_ms"] == approx(380.0)  # 300 + 0.8 * 100
    assert s["p99_ttft_ms"] == approx(398.0)
    # TPOT over A, C: 100 150 ms
    assert s["mean_tpot_ms"] == approx(125.0)
    assert s["median_tpot_ms"] == approx(125.0)
    assert s["std_tpot_ms"] == approx(25.0)
    assert s["p90_tpot_ms"] == approx(145.0)
    assert s["p99_tpot_ms"] == approx(149.5)
    # ITL pooled: 100 100 100 200 400 ms
    assert s["mean_itl_ms"] == approx(180.0)
    assert s["median_itl_ms"] == approx(100.0)
    assert s["std_itl_ms"] == approx(math.sqrt(13600))
    assert s["p90_itl_ms"] == approx(320.0)
    assert s["p99_itl_ms"] == approx(392.0)
    # E2EL over every completed request: 50 150 400 500 900 ms
    assert s["mean_e2el_ms"] == approx(400.0)
    assert s["median_e2el_ms"] == approx(400.0)
    assert s["std_e2el_ms"] == approx(math.sqrt(89000))
    assert s["p90_e2el_ms"] == approx(740.0)
    assert s["p99_e2el_ms"] == approx(884.0)


def test_goodput_uses_vllm_rules() -> None:
    # A meets both; B's TTFT 400 > 350; C's TPOT 150 > 120; D and E are embeddings (e2el only)
    s = summarize(trace(), DURATION, goodput=SLO(ttft_ms=350, tpot_ms=120))
    assert s["request_goodput"] == approx(0.3)
    # B's single token counts as TPOT 0: a TPOT bound alone passes it
    assert summarize(trace(), DURATION, goodput=SLO(tpot_ms=1))["request_goodput"] == approx(0.3)  # B D E
    assert summarize(trace(), DURATION, goodput=SLO(e2el_ms=100))["request_goodput"] == approx(0.1)  # D
    # the bound is inclusive, as vLLM's `slo >= value`
    assert summarize(trace(), DURATION, goodput=SLO(e2el_ms=900))["request_goodput"] == approx(0.5)


def test_slo_attainment_per_class_counts_failures_as_misses() -> None:
    slos = {"interactive": SLO(ttft_ms=500, e2el_ms=600), "batch": SLO(e2el_ms=100), "idle": SLO(e2el_ms=1)}
    a = slo_attainment(trace(), slos)
    assert a["slo_attainment_interactive"] == approx(0.5)  # A, B met; F failed, G rejected
    assert a["slo_requests_interactive"] == 4  # the probe is left out
    assert a["slo_attainment_batch"] == approx(0.5)  # D met, C 900 ms
    assert a["slo_requests_batch"] == 2
    assert math.isnan(a["slo_attainment_idle"]) and a["slo_requests_idle"] == 0
    assert a["slo_attainment"] == approx(0.5)  # 3 of 6
    # a request without a class counts as the default class: E (150 ms) misses batch's 100 ms
    b = slo_attainment(trace(), slos, default_class="batch")
    assert b["slo_attainment_batch"] == approx(1 / 3) and b["slo_requests_batch"] == 3
    # the probe counts when asked for
    c = slo_attainment(trace(), slos, include_probes=True)
    assert c["slo_requests_interactive"] == 5 and c["slo_attainment_interactive"] == approx(0.4)

    s = summarize(trace(), DURATION, slos=slos)
    assert s["slo_attainment_interactive"] == approx(0.5)
    assert s["slo_goodput"] == approx(0.3)  # A, B, D


def test_summarize_by_class_and_workload() -> None:
    slos = {"interactive": SLO(ttft_ms=350), "batch": SLO(e2el_ms=100)}
    by = summarize_by(trace(), DURATION, key="slo_class", slos=slos)
    assert sorted(by) == ["batch", "interactive", "none"]
    inter = by["interactive"]
    assert (inter["completed"], inter["failed"], inter["rejected"]) == (2, 1, 1)
    assert inter["request_goodput"] == approx(0.1)  # its own SLO: A only (B's TTFT 400)
    assert inter["mean_ttft_ms"] == approx(300.0)
    assert by["batch"]["request_goodput"] == approx(0.1)  # D
    assert by["batch"]["mean_e2el_ms"] == approx(475.0)
    assert by["none"]["completed"] == 1 and "request_goodput" not in by["none"]
    assert math.isnan(by["none"]["mean_ttft_ms"])  # an embedding has no TTFT

    by_default = summarize_by(trace(), DURATION, key="slo_class", default_class="batch")
    assert sorted(by_default) == ["batch", "interactive"] and by_default["batch"]["completed"] == 3

    by_workload = summarize_by(trace(), DURATION, key="workload")
    assert sorted(by_workload) == ["chat", "completion", "embedding"]
    assert by_workload["embedding"]["request_throughput"] == approx(0.2)
    assert by_workload["chat"]["total_output_tokens"] == 9


def test_probe_summary() -> None:
    probes = [
        _r("p0", ttft_s=0.03, latency_s=0.03, probe=True),
        _r("p1", ttft_s=0.01, latency_s=0.05, probe=True),
        _r("p2", status="rejected", http_status=429, latency_s=0.001, probe=True),
        _r("p3", status="error", latency_s=0.001, probe=True),
    ]
    p = summarize_probe(trace()[:3] + probes)
    assert (p["probe_count"], p["probe_completed"], p["probe_rejected"], p["probe_failed"]) == (4, 2, 1, 1)
    assert p["probe_mean_e2el_ms"] == approx(40.0)
    assert p["probe_median_e2el_ms"] == approx(40.0)
    assert p["probe_p90_e2el_ms"] == approx(48.0)
    assert p["probe_p99_e2el_ms"] == approx(49.8)
    assert p["probe_mean_ttft_ms"] == approx(20.0)
    assert p["probe_p99_ttft_ms"] == approx(29.8)

    empty = summarize_probe(trace()[:3])
    assert empty["probe_count"] == 0 and math.isnan(empty["probe_mean_e2el_ms"])


def test_empty_and_degenerate_inputs_never_crash() -> None:
    s = summarize([], 0.0, goodput=SLO(ttft_ms=1), slos={"a": SLO(e2el_ms=1)})
    assert s["completed"] == 0 and s["failed"] == 0
    assert math.isnan(s["request_throughput"]) and math.isnan(s["mean_ttft_ms"])
    assert math.isnan(s["slo_attainment_a"])
    assert s["max_concurrent_requests"] == 0
    s = summarize([_r("x", status="error", latency_s=0.1)], 5.0, goodput=SLO(ttft_ms=1))
    assert s["request_throughput"] == 0.0 and s["request_goodput"] == 0.0 and s["failed"] == 1
    assert math.isnan(s["p99_e2el_ms"])
    assert summarize_by([], 1.0) == {}


def test_percentile_names_follow_vllm() -> None:
    s = summarize(trace(), DURATION, percentiles=(25, 99.9))
    assert s["p99.9_e2el_ms"] == approx(898.4)  # 500 + 0.996 * 400
    assert s["p25_e2el_ms"] == approx(150.0)
    assert "p50_e2el_ms" not in s and s["median_e2el_ms"] == approx(400.0)


def test_load_result_round_trips_through_json() -> None:
    spec = LoadSpec(workloads=[Workload(name="w", model="m")], num_requests=8)  # rate inf
    load = LoadResult(results=trace(), duration_s=DURATION, warmup=trace()[:1], spec=spec)
    text = json.dumps(load.to_dict(), allow_nan=False)
    again = LoadResult.from_dict(json.loads(text))
    assert again.results == load.results and again.warmup == load.warmup
    assert again.spec == spec and math.isinf(again.spec.rate)
    assert summarize_load(again) == summarize(load.results, DURATION)
    assert [r.request_id for r in load.probes] == ["P"] and len(load.main) == 7


def test_doctests() -> None:
    assert doctest.testmod(metrics).failed == 0
