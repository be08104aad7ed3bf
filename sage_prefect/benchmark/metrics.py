"""Serving metrics under `vllm bench serve`'s names and definitions, plus per-class SLO attainment.

The definitions follow ``calculate_metrics`` in vLLM's ``vllm/benchmarks/serve.py``:

- Only completed requests (``status == "ok"``) contribute latencies and tokens;
  ``request_throughput = completed / duration``, ``output_throughput = total_output_tokens /
  duration``, ``total_token_throughput = (total_input_tokens + total_output_tokens) / duration``.
- TTFT: per request, send to first content. TPOT: per request with ``output_tokens > 1``,
  ``(latency - ttft) / (output_tokens - 1)``; requests with one token contribute none. ITL: every
  inter-chunk gap of every request, pooled. E2EL: per request latency.
- ``mean_*``, ``median_*`` and ``std_*`` are ``np.mean``, ``np.median`` and ``np.std`` (population);
  ``p<q>_*`` is ``np.percentile`` (linear interpolation), named ``p99``, ``p99.9``...; all in ms.
- ``request_goodput``: completed requests meeting every bound of the ``goodput`` `SLO`, per second;
  a request with at most one output token has TPOT 0 there (vLLM's rule).
- ``max_output_tokens_per_s``: the most content chunks arriving within one 1-second bucket from
  the first request's start; ``max_concurrent_requests``: the most completed requests in flight at
  once (half-open ``[start, end)`` intervals).

Where this differs from vLLM, on purpose:

- ``failed`` counts errors only; 429 answers are counted as ``rejected`` (vLLM's ``failed`` is the sum).
- One summary covers a mix: embedding requests count in requests, input tokens and E2EL, not in
  TTFT, TPOT or ITL (vLLM reports embeddings in a separate run).
- A latency statistic with no samples is NaN (vLLM reports 0), and so is a throughput over a
  duration that is not positive.
- Probe requests (``probe=True``) are left out; `summarize_probe` reports them.

>>> from sage_prefect.benchmark.loadgen import RequestResult
>>> r = RequestResult(request_id="r0", workload="w", kind="chat", model="m",
...                   ttft_s=0.1, itl_s=[0.02, 0.02], latency_s=0.14, output_tokens=3)
>>> s = summarize([r], duration_s=2.0)
>>> s["completed"], s["request_throughput"], round(s["mean_tpot_ms"], 6)
(1, 0.5, 20.0)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

from sage_prefect.benchmark.loadgen import SLO, LoadResult, RequestResult

__all__ = ["slo_attainment", "summarize", "summarize_by", "summarize_load", "summarize_probe"]

NAN = math.nan
Percentiles = Sequence[float]


def _pname(q: float) -> str:
    """vLLM's percentile names: ``p99`` for 99, ``p99.9`` for 99.9."""
    return str(int(q)) if float(q).is_integer() else str(q)


def _stats(
    name: str, values_s: Sequence[float], percentiles: Percentiles, prefix: str = ""
) -> dict[str, float]:
    """mean / median / std / percentiles of ``values_s`` (seconds), in ms; NaN when empty."""
    keys = ["mean", "median", "std", *(f"p{_pname(q)}" for q in percentiles)]
    if not values_s:
        return {f"{prefix}{k}_{name}_ms": NAN for k in keys}
    arr = np.asarray(values_s, dtype=np.float64)
    out = {
        f"{prefix}mean_{name}_ms": float(np.mean(arr) * 1000),
        f"{prefix}median_{name}_ms": float(np.median(arr) * 1000),
        f"{prefix}std_{name}_ms": float(np.std(arr) * 1000),
    }
    for q in percentiles:
        out[f"{prefix}p{_pname(q)}_{name}_ms"] = float(np.percentile(arr, q) * 1000)
    return out


def _rate(count: float, duration_s: float) -> float:
    return count / duration_s if duration_s > 0 else NAN


def _peaks(ok: Sequence[RequestResult]) -> tuple[float, int]:
    """vLLM's ``max_output_tokens_per_s`` and ``max_concurrent_requests`` over completed requests."""
    spans = [(r.start_s, r.start_s + r.latency_s) for r in ok if r.latency_s is not None]
    if not spans:
        return 0.0, 0
    origin = min(s for s, _ in spans)
    buckets = np.zeros(int(math.ceil(max(e for _, e in spans) - origin)) + 1)
    for r in ok:
        if r.kind == "embedding" or r.ttft_s is None or not r.chunks:
            continue
        times = r.start_s + r.ttft_s + np.concatenate([[0.0], np.cumsum(r.itl_s)])
        idx = (times - origin).astype(np.int64)
        np.add.at(buckets, idx[(idx >= 0) & (idx < len(buckets))], 1)
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])  # ends first on ties
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return float(buckets.max()), peak


def summarize(
    results: Iterable[RequestResult],
    duration_s: float,
    goodput: SLO | None = None,
    slos: dict[str, SLO] | None = None,
    percentiles: Percentiles = (50, 90, 99),
    default_class: str | None = None,
) -> dict[str, float]:
    """The `vllm bench serve` summary of the main (non-probe) requests of a run of ``duration_s``.

    ``goodput`` adds ``request_goodput``; ``slos`` (by class) adds `slo_attainment`'s fields and
    ``slo_goodput`` (requests meeting their own class's objective, per second). Requests with no
    class count as ``default_class`` there (the gateway's default), or not at all.
    """
    main = [r for r in results if not r.probe]
    ok = [r for r in main if r.status == "ok"]
    llm = [r for r in ok if r.kind != "embedding"]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    peak_tokens, peak_requests = _peaks(ok)
    out: dict[str, float] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": sum(r.status == "error" for r in main),
        "rejected": sum(r.status == "rejected" for r in main),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": _rate(len(ok), duration_s),
    }
    if goodput is not None:
        out["request_goodput"] = _rate(sum(goodput.met_by(r) for r in ok), duration_s)
    out["output_throughput"] = _rate(total_out, duration_s)
    out["total_token_throughput"] = _rate(total_in + total_out, duration_s)
    out["max_output_tokens_per_s"] = peak_tokens
    out["max_concurrent_requests"] = peak_requests
    out |= _stats("ttft", [r.ttft_s for r in llm if r.ttft_s is not None], percentiles)
    out |= _stats("tpot", [t for r in llm if (t := r.tpot_s) is not None], percentiles)
    out |= _stats("itl", [gap for r in llm for gap in r.itl_s], percentiles)
    out |= _stats("e2el", [r.latency_s for r in ok if r.latency_s is not None], percentiles)
    if slos is not None:
        out |= slo_attainment(main, slos, default_class)
        targets = [(r, _class_slo(r, slos, default_class)) for r in ok]
        out["slo_goodput"] = _rate(sum(t is not None and t.met_by(r) for r, t in targets), duration_s)
    return out


def _class_slo(r: RequestResult, slos: dict[str, SLO], default_class: str | None) -> SLO | None:
    cls = r.slo_class if r.slo_class is not None else default_class
    return slos.get(cls) if cls is not None else None


def slo_attainment(
    results: Iterable[RequestResult],
    slos: dict[str, SLO],
    default_class: str | None = None,
    include_probes: bool = False,
) -> dict[str, float]:
    """Per class of ``slos``: ``slo_attainment_<class>``, the fraction of that class's requests
    meeting its SLO (rejected and failed ones are misses; NaN with no requests), and
    ``slo_requests_<class>``, their count; ``slo_attainment`` over every request of those classes.

    >>> from sage_prefect.benchmark.loadgen import RequestResult
    >>> rs = [RequestResult(request_id=str(i), workload="w", kind="embedding", model="m",
    ...                     slo_class="batch", latency_s=t) for i, t in enumerate([0.1, 0.3])]
    >>> slo_attainment(rs, {"batch": SLO(e2el_ms=200)})
    {'slo_attainment_batch': 0.5, 'slo_requests_batch': 2, 'slo_attainment': 0.5}
    """
    met = dict.fromkeys(slos, 0)
    seen = dict.fromkeys(slos, 0)
    for r in results:
        if r.probe and not include_probes:
            continue
        cls = r.slo_class if r.slo_class is not None else default_class
        if cls not in slos:
            continue
        seen[cls] += 1
        met[cls] += slos[cls].met_by(r)
    out: dict[str, float] = {}
    for cls in slos:
        out[f"slo_attainment_{cls}"] = met[cls] / seen[cls] if seen[cls] else NAN
        out[f"slo_requests_{cls}"] = seen[cls]
    total = sum(seen.values())
    out["slo_attainment"] = sum(met.values()) / total if total else NAN
    return out


def summarize_by(
    results: Iterable[RequestResult],
    duration_s: float,
    key: Literal["slo_class", "workload", "model", "kind"] = "slo_class",
    goodput: SLO | None = None,
    slos: dict[str, SLO] | None = None,
    percentiles: Percentiles = (50, 90, 99),
    default_class: str | None = None,
) -> dict[str, dict[str, float]]:
    """`summarize` per value of ``key`` (main requests; throughputs over the whole run's duration).

    By ``slo_class``, a class's own SLO from ``slos`` is its ``goodput`` objective; requests with
    no class are grouped under ``default_class``, or ``"none"``.
    """
    groups: dict[str, list[RequestResult]] = {}
    for r in results:
        if r.probe:
            continue
        value = getattr(r, key)
        if value is None:
            value = default_class if key == "slo_class" and default_class is not None else "none"
        groups.setdefault(str(value), []).append(r)
    out: dict[str, dict[str, float]] = {}
    for name, members in sorted(groups.items()):
        target = goodput
        if key == "slo_class" and slos is not None and name in slos:
            target = slos[name]
        out[name] = summarize(members, duration_s, target, slos, percentiles, default_class)
    return out


def summarize_probe(
    results: Iterable[RequestResult], percentiles: Percentiles = (50, 90, 99)
) -> dict[str, float]:
    """The interference probe's requests: ``probe_count``, ``probe_completed``, ``probe_failed``,
    ``probe_rejected`` and ``probe_{mean,median,std,p<q>}_{e2el,ttft}_ms`` (NaN without probes)."""
    probes = [r for r in results if r.probe]
    ok = [r for r in probes if r.status == "ok"]
    out: dict[str, float] = {
        "probe_count": len(probes),
        "probe_completed": len(ok),
        "probe_failed": sum(r.status == "error" for r in probes),
        "probe_rejected": sum(r.status == "rejected" for r in probes),
    }
    out |= _stats("e2el", [r.latency_s for r in ok if r.latency_s is not None], percentiles, "probe_")
    out |= _stats("ttft", [r.ttft_s for r in ok if r.ttft_s is not None], percentiles, "probe_")
    return out


def summarize_load(
    load: LoadResult,
    goodput: SLO | None = None,
    slos: dict[str, SLO] | None = None,
    percentiles: Percentiles = (50, 90, 99),
    default_class: str | None = None,
) -> dict[str, float]:
    """`summarize` of a `LoadResult`'s main requests, plus `summarize_probe` when it had a probe."""
    out = summarize(load.results, load.duration_s, goodput, slos, percentiles, default_class)
    if load.spec.probe is not None:
        out |= summarize_probe(load.results, percentiles)
    return out
