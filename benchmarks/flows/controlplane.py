"""Control-plane scheduling benchmark: open-loop load against the control plane under each
scheduling policy (or against any OpenAI-compatible endpoint), as a Prefect flow logged to
MLflow (experiment ``controlplane``).

For each policy of ``policies`` a control plane is started on 127.0.0.1 with that policy and
the benchmark models (`sage_prefect.benchmark.gateway.benchmark_config`: the LLM and the
embedding model sharing one device, classes ``interactive`` and ``batch``), and every
experiment of ``experiments`` runs against it. With ``base_url`` the load goes to that
endpoint instead (a running control plane, or a bare ``vllm serve`` for comparison) and the
policy is recorded as ``external``.

Experiments (each request stream is open loop, Poisson or gamma with ``burstiness``):

- ``throughput``: streamed chat at each of ``rates`` (``inf`` = all at once) -> request and
  token throughput, TTFT/TPOT/E2EL per rate;
- ``latency``: chat + completions at ``chat_rate`` -> the full latency distributions;
- ``slo``: interactive chat + batch embeddings at each of ``rates`` -> SLO attainment per class
  and goodput against the rate;
- ``interference``: interactive chat at ``chat_rate`` alone, bulk embeddings (``bulk_rate``
  requests/s of ``bulk_texts`` texts, class ``batch``) alone, then both together with a probe of
  1-token chat requests at ``probe_rate`` -> chat TTFT attainment and percentiles beside the
  bulk job, the embedding throughput kept (``embedding_vs_alone``), the probe's latency;
- ``mixed_ratio``: chat and embeddings at ``chat_rate * 2`` requests/s in the LLM shares of
  ``llm_shares`` -> throughput and attainment per mix.

Objectives: ``ttft_slo_ms``/``tpot_slo_ms``, or calibrated first from a chat-alone run at
``chat_rate``: ``slo_factor`` x its p50 TTFT and TPOT; every policy gets the same ones (in its
gateway config, and for scoring). Metrics use `vllm bench serve` names (``mean_ttft_ms``,
``p99_e2el_ms``, ``request_throughput``, ``request_goodput`` ...), prefixed by the experiment
(and phase), logged per step (one step per rate or mix) in one MLflow child run per
(experiment, policy) under a parent run that holds the comparison plots (latency CDFs, SLO
attainment and goodput vs rate per policy, interference bars). Raw per-request records go in
each child run as JSON.

Run::

    sage-prefect bench run controlplane                              # interference, 4 policies
    sage-prefect bench run controlplane -p 'experiments=["slo","throughput"]' -p 'rates=[1,2,4,8]'
    sage-prefect bench run controlplane -p base_url=http://gpu-node:8000/v1 -p llm_model=meta-llama/Llama-3.1-8B-Instruct
    python benchmarks/flows/controlplane.py --experiments interference --duration 20
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, task

from sage_prefect.benchmark.gateway import benchmark_config, running_gateway
from sage_prefect.benchmark.loadgen import (
    SLO,
    LengthDist,
    LoadResult,
    LoadSpec,
    Probe,
    Workload,
    run_load_sync,
)
from sage_prefect.benchmark.metrics import summarize, summarize_load
from sage_prefect.benchmark.plots import grouped_bars, latency_cdf, lines_vs_rate
from sage_prefect.benchmark.tracking import BenchmarkRun, benchmark_run, publish_table, runs_table
from sage_prefect.common.errors import ConfigError
from sage_prefect.common.settings import command_line_defaults

EXPERIMENTS = ("throughput", "latency", "slo", "interference", "mixed_ratio")
POLICIES = ("fifo", "priority", "slo", "hybrid")
# Metrics the comparison table shows by default: for a sweep, each at every step (rate or mix).
HEADLINE = {
    "throughput": ("request_throughput", "output_throughput", "p99_ttft_ms"),
    "latency": ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_e2el_ms"),
    "slo": ("slo_attainment_interactive", "request_goodput"),
    "interference": (
        "both.slo_attainment_interactive",
        "both.p99_ttft_ms",
        "embedding_vs_alone",
        "both.probe_median_e2el_ms",
    ),
    "mixed_ratio": ("request_throughput", "slo_attainment_interactive"),
}
PHASES = ("chat_alone", "embedding_alone", "both")


def step_tag(name: str, x: float) -> str:
    """The key part naming one sweep step: ``rate_4``, ``rate_inf``, ``llm_share_0.5``.

    >>> step_tag("slo", 4.0), step_tag("throughput", float("inf")), step_tag("mixed_ratio", 0.25)
    ('rate_4', 'rate_inf', 'llm_share_0.25')
    """
    return f"{'llm_share' if name == 'mixed_ratio' else 'rate'}_{x:g}"


def headline_keys(name: str, steps: list[Step]) -> list[str]:
    """The full metric keys of experiment ``name``'s headline metrics in its child runs."""
    if name in ("interference", "latency"):
        return [f"{name}.{m}" for m in HEADLINE[name]]
    return [f"{name}.{step_tag(name, s.x)}.{m}" for m in HEADLINE[name] for s in steps]


@dataclass
class Setup:
    """What every experiment of one run shares."""

    llm_model: str
    embedding_model: str
    chat_rate: float
    bulk_rate: float
    bulk_texts: int
    input_tokens: int
    output_tokens: int
    duration_s: float
    rates: list[float]
    llm_shares: list[float]
    burstiness: float
    max_concurrency: int | None
    warmup_requests: int
    probe_rate: float
    seed: int
    slos: dict[str, SLO] = field(default_factory=dict)

    def chat(self, weight: float = 1.0, kind: str = "chat", name: str = "chat") -> Workload:
        return Workload(
            name=name,
            kind=kind,  # type: ignore[arg-type]
            model=self.llm_model,
            weight=weight,
            slo_class="interactive",
            input_tokens=LengthDist(kind="uniform", mean=self.input_tokens, range_ratio=0.5),
            output_tokens=LengthDist(mean=self.output_tokens),
        )

    def bulk(self, weight: float = 1.0) -> Workload:
        return Workload(
            name="bulk-embedding",
            kind="embedding",
            model=self.embedding_model,
            weight=weight,
            slo_class="batch",
            texts_per_request=self.bulk_texts,
            input_tokens=LengthDist(kind="uniform", mean=32, range_ratio=0.75),
        )

    def spec(self, workloads: list[Workload], rate: float, probe: bool = False, **kw: Any) -> LoadSpec:
        size: dict[str, Any] = {"duration_s": self.duration_s}
        if math.isinf(rate):  # all at once: as many requests as the fastest finite rate sends
            finite = [r for r in self.rates if math.isfinite(r)] or [self.chat_rate]
            size = {"num_requests": max(8, round(max(finite) * self.duration_s))}
        return LoadSpec(
            workloads=workloads,
            rate=rate,
            burstiness=self.burstiness,
            max_concurrency=self.max_concurrency,
            warmup_requests=self.warmup_requests,
            seed=self.seed,
            probe=Probe(rate=self.probe_rate, model=self.llm_model, slo_class="interactive")
            if probe
            else None,
            **size,
            **kw,
        )


@dataclass
class Step:
    """One measured load: its x value (rate, LLM share, or phase index), label and metrics."""

    x: float
    label: str
    load: LoadResult
    metrics: dict[str, float]


def _texts_per_s(load: LoadResult) -> float:
    """Embedding texts completed per second of the run (its duration: first arrival to last answer)."""
    per_request = {w.name: w.texts_per_request for w in load.spec.workloads}
    texts = sum(
        per_request.get(r.workload, 1) for r in load.main if r.kind == "embedding" and r.status == "ok"
    )
    return texts / load.duration_s if load.duration_s > 0 else math.nan


def _ttft_ms(step: Step) -> list[float]:
    """TTFT (ms) of a step's completed LLM requests (embedding requests have no first token)."""
    return [r.ttft_s * 1000 for r in step.load.main if r.ttft_s is not None and r.kind != "embedding"]


def _measure(url: str, api_key: str | None, spec: LoadSpec, setup: Setup, label: str, x: float) -> Step:
    print(f"  {label}: {spec.rate:g} req/s for {spec.duration_s or spec.num_requests} ...")
    load = run_load_sync(url, spec, api_key, progress=True)
    metrics = summarize_load(
        load, goodput=setup.slos["interactive"], slos=setup.slos, default_class="interactive"
    )
    if any(w.kind == "embedding" for w in spec.workloads):
        metrics["embedding_texts_per_s"] = _texts_per_s(load)
    return Step(x, label, load, metrics)


def run_experiment(name: str, url: str, api_key: str | None, setup: Setup) -> list[Step]:
    """The steps of experiment ``name`` against ``url``."""
    if name == "throughput":
        return [
            _measure(url, api_key, setup.spec([setup.chat()], r, text_salt=i), setup, f"rate {r:g}", r)
            for i, r in enumerate(setup.rates)
        ]
    if name == "latency":
        spec = setup.spec([setup.chat(), setup.chat(kind="completion", name="completion")], setup.chat_rate)
        return [_measure(url, api_key, spec, setup, f"rate {setup.chat_rate:g}", setup.chat_rate)]
    if name == "slo":
        return [
            _measure(
                url,
                api_key,
                setup.spec([setup.chat(), setup.bulk()], r, text_salt=i),
                setup,
                f"rate {r:g}",
                r,
            )
            for i, r in enumerate(setup.rates)
            if math.isfinite(r)
        ]
    if name == "interference":
        chat = _measure(url, api_key, setup.spec([setup.chat()], setup.chat_rate), setup, "chat alone", 0)
        bulk = _measure(
            url, api_key, setup.spec([setup.bulk()], setup.bulk_rate), setup, "embeddings alone", 1
        )
        # both streams at their own rates: one spec at the summed rate, mixed in proportion
        total = setup.chat_rate + setup.bulk_rate
        both_spec = setup.spec([setup.chat(setup.chat_rate), setup.bulk(setup.bulk_rate)], total, probe=True)
        both = _measure(url, api_key, both_spec, setup, "both + probe", 2)
        alone = bulk.metrics.get("embedding_texts_per_s", math.nan)
        both.metrics["embedding_vs_alone"] = (
            both.metrics.get("embedding_texts_per_s", math.nan) / alone if alone else math.nan
        )
        return [chat, bulk, both]
    if name == "mixed_ratio":
        steps = []
        for i, share in enumerate(setup.llm_shares):
            workloads = ([setup.chat(share)] if share > 0 else []) + (
                [setup.bulk(1 - share)] if share < 1 else []
            )
            spec = setup.spec(workloads, setup.chat_rate * 2, text_salt=i)
            steps.append(_measure(url, api_key, spec, setup, f"LLM share {share:g}", share))
        return steps
    raise ConfigError(
        f"unknown experiment {name!r} (experiments: {', '.join(EXPERIMENTS)})", field="experiments"
    )


def _calibrate(
    url: str, api_key: str | None, setup: Setup, factor: float
) -> tuple[float, float, dict[str, float]]:
    spec = setup.spec([setup.chat()], setup.chat_rate)
    print(f"calibrating objectives: chat alone at {setup.chat_rate:g} req/s for {setup.duration_s:g} s")
    load = run_load_sync(url, spec, api_key, progress=True)
    stats = summarize(load.results, load.duration_s)
    ttft, tpot = stats["median_ttft_ms"], stats["median_tpot_ms"]
    if not (math.isfinite(ttft) and math.isfinite(tpot)):
        errors = sorted({r.error or r.status for r in load.results if r.status != "ok"})[:3]
        raise ConfigError(
            f"calibration failed: no completed chat requests ({'; '.join(errors)})", field="llm_model"
        )
    return factor * ttft, factor * tpot, stats


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}.{k}": v for k, v in metrics.items()}


def _log_child(
    parent: BenchmarkRun, name: str, policy: str, steps: list[Step], params: dict[str, Any]
) -> dict[str, float]:
    """One child run for (experiment, policy): per-step metrics, the final-step (or phase) summary,
    the raw requests. Returns the headline values."""
    with parent.child(f"{name} / {policy}", {**params, "experiment": name, "policy": policy}) as run:
        flat: dict[str, float] = {}
        if name == "interference":
            for step, phase in zip(steps, PHASES, strict=True):
                values = {k: v for k, v in step.metrics.items() if k != "embedding_vs_alone"}
                flat |= _prefixed(f"{name}.{phase}", values)
            flat[f"{name}.embedding_vs_alone"] = steps[-1].metrics["embedding_vs_alone"]
            run.log_metrics(flat)
        elif name == "latency":
            flat = _prefixed(name, steps[0].metrics)
            run.log_metrics(flat)
        else:  # a sweep: the history per step (MLflow plots it) and every step under its own keys
            x_name = "llm_share" if name == "mixed_ratio" else "rate"
            for i, step in enumerate(steps):
                run.log_metrics({**_prefixed(name, step.metrics), f"{name}.{x_name}": step.x}, step=i)
                flat |= _prefixed(f"{name}.{step_tag(name, step.x)}", step.metrics)
            run.log_metrics(flat)
        run.set_headline(headline_keys(name, steps))
        run.log_json(
            [{"label": s.label, "x": s.x, "metrics": s.metrics, "load": s.load.to_dict()} for s in steps],
            f"raw/{name}-{policy}.json",
        )
        run.log_figure(
            latency_cdf(
                {s.label: _ttft_ms(s) for s in steps},
                f"{name} / {policy}: TTFT",
                "TTFT (ms)",
                objective=params.get("ttft_slo_ms"),
            ),
            f"plots/{name}-{policy}-ttft-cdf.png",
        )
    return flat


def _parent_plots(parent: BenchmarkRun, name: str, by_policy: dict[str, list[Step]], ttft_ms: float) -> None:
    def series(metric: str) -> dict[str, tuple[list[float], list[float]]]:
        return {
            p: ([s.x for s in steps], [s.metrics.get(metric, math.nan) for s in steps])
            for p, steps in by_policy.items()
        }

    if name in ("slo", "throughput", "mixed_ratio"):
        xlabel = "LLM share of requests" if name == "mixed_ratio" else "request rate (req/s)"
        if name == "throughput":
            parent.log_figure(
                lines_vs_rate(
                    series("output_throughput"), "output token throughput vs rate", "tokens/s", xlabel
                ),
                f"plots/{name}-output-throughput.png",
            )
        else:
            parent.log_figure(
                lines_vs_rate(
                    series("slo_attainment_interactive"),
                    f"{name}: interactive SLO attainment",
                    "attainment",
                    xlabel,
                    (0, 1.05),
                    0.95,
                ),
                f"plots/{name}-attainment-vs-rate.png",
            )
        parent.log_figure(
            lines_vs_rate(
                series("request_goodput"), f"{name}: goodput (interactive objectives)", "requests/s", xlabel
            ),
            f"plots/{name}-goodput-vs-rate.png",
        )
    if name == "latency":
        parent.log_figure(
            latency_cdf(
                {p: _ttft_ms(steps[0]) for p, steps in by_policy.items()},
                "TTFT per policy",
                "TTFT (ms)",
                ttft_ms,
            ),
            "plots/latency-ttft-cdf.png",
        )
        parent.log_figure(
            latency_cdf(
                {
                    p: [r.latency_s * 1000 for r in steps[0].load.main if r.latency_s is not None]
                    for p, steps in by_policy.items()
                },
                "end-to-end latency per policy",
                "E2EL (ms)",
            ),
            "plots/latency-e2el-cdf.png",
        )
    if name == "interference":
        bars = {
            p: {
                "chat SLO attainment": steps[2].metrics.get("slo_attainment_interactive", math.nan),
                "embedding kept": steps[2].metrics["embedding_vs_alone"],
            }
            for p, steps in by_policy.items()
        }
        parent.log_figure(
            grouped_bars(bars, "interference: chat beside a bulk embedding job", ylim=(0, 1.1)),
            "plots/interference-bars.png",
        )
        parent.log_figure(
            latency_cdf(
                {
                    **{f"{p} alone": _ttft_ms(steps[0]) for p, steps in list(by_policy.items())[:1]},
                    **{f"{p} beside bulk": _ttft_ms(steps[2]) for p, steps in by_policy.items()},
                },
                "interference: chat TTFT",
                "TTFT (ms)",
                ttft_ms,
            ),
            "plots/interference-ttft-cdf.png",
        )


@task(name="load-on-policy")
def _policy_runs(
    policy: str,
    url: str | None,
    api_key: str | None,
    setup: Setup,
    experiments: list[str],
    gateway: dict[str, Any] | None,
) -> dict[str, list[Step]]:
    """Every experiment against one policy's control plane (started here) or ``url``."""
    if url is not None:
        return {name: run_experiment(name, url, api_key, setup) for name in experiments}
    assert gateway is not None
    with running_gateway(gateway) as started:
        print(f"policy {policy}: control plane at {started}")
        return {name: run_experiment(name, started, None, setup) for name in experiments}


@flow(name="bench-controlplane", log_prints=True)
def controlplane_bench(
    experiments: list[str] | None = None,
    policies: list[str] | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    llm_model: str = "sage-tiny-random-lm",
    embedding_model: str = "all-MiniLM-L6-v2",
    duration_s: float = 20.0,
    rates: list[float] | None = None,
    burstiness: float = 1.0,
    max_concurrency: int | None = None,
    warmup_requests: int = 4,
    chat_rate: float = 2.0,
    bulk_rate: float = 10.0,
    bulk_texts: int = 32,
    input_tokens: int = 64,
    output_tokens: int = 32,
    llm_shares: list[float] | None = None,
    probe_rate: float = 1.0,
    ttft_slo_ms: float | None = None,
    tpot_slo_ms: float | None = None,
    slo_factor: float = 2.0,
    embedding_replicas: int = 2,
    seed: int = 0,
    experiment: str = "controlplane",
    run_name: str | None = None,
) -> dict[str, Any]:
    """Open-loop scheduling experiments (throughput, latency, slo, interference, mixed_ratio) per policy."""
    experiments = list(experiments or ["interference"])
    unknown = [e for e in experiments if e not in EXPERIMENTS]
    if unknown:
        raise ConfigError(
            f"unknown experiment {unknown[0]!r} (experiments: {', '.join(EXPERIMENTS)})", field="experiments"
        )
    policies = ["external"] if base_url else list(policies or POLICIES)
    bad = [p for p in policies if p not in POLICIES and p != "external"]
    if bad:
        raise ConfigError(f"unknown policy {bad[0]!r} (policies: {', '.join(POLICIES)})", field="policies")
    if (ttft_slo_ms is None) != (tpot_slo_ms is None):
        raise ConfigError(
            "give both ttft_slo_ms and tpot_slo_ms, or neither (calibrate)", field="ttft_slo_ms"
        )
    setup = Setup(
        llm_model=llm_model,
        embedding_model=embedding_model,
        chat_rate=chat_rate,
        bulk_rate=bulk_rate,
        bulk_texts=bulk_texts,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        duration_s=duration_s,
        rates=[float(r) for r in (rates or [1.0, 2.0, 4.0, 8.0])],
        llm_shares=[float(s) for s in (llm_shares or [1.0, 0.75, 0.5, 0.25, 0.0])],
        burstiness=burstiness,
        max_concurrency=max_concurrency,
        warmup_requests=warmup_requests,
        probe_rate=probe_rate,
        seed=seed,
    )
    calibration: dict[str, float] = {}
    if ttft_slo_ms is None or tpot_slo_ms is None:
        setup.slos = {"interactive": SLO(), "batch": SLO(e2el_ms=600_000)}
        if base_url:
            ttft_slo_ms, tpot_slo_ms, calibration = _calibrate(base_url, api_key, setup, slo_factor)
        else:
            probe_cfg = benchmark_config(
                "fifo",
                ttft_ms=10_000,
                tpot_ms=1_000,
                embedding_model=embedding_model,
                llm_model=llm_model,
                embedding_replicas=embedding_replicas,
            )
            with running_gateway(probe_cfg) as url:
                ttft_slo_ms, tpot_slo_ms, calibration = _calibrate(url, None, setup, slo_factor)
        print(
            f"objectives: TTFT {ttft_slo_ms:.1f} ms, TPOT {tpot_slo_ms:.2f} ms ({slo_factor:g} x chat-alone p50)"
        )
    setup.slos = {
        "interactive": SLO(ttft_ms=ttft_slo_ms, tpot_ms=tpot_slo_ms),
        "batch": SLO(e2el_ms=600_000),
    }
    params: dict[str, Any] = {
        "experiments": experiments,
        "policies": policies,
        "endpoint": base_url or "embedded control plane per policy",
        "llm_model": llm_model,
        "embedding_model": embedding_model,
        "embedding_replicas": embedding_replicas if not base_url else None,
        "duration_s": duration_s,
        "rates": setup.rates,
        "burstiness": burstiness,
        "max_concurrency": max_concurrency,
        "warmup_requests": warmup_requests,
        "chat_rate": chat_rate,
        "bulk_rate": bulk_rate,
        "bulk_texts": bulk_texts,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "llm_shares": setup.llm_shares,
        "probe_rate": probe_rate,
        "ttft_slo_ms": round(ttft_slo_ms, 3),
        "tpot_slo_ms": round(tpot_slo_ms, 3),
        "slo_rule": "given" if not calibration else f"{slo_factor:g} x chat-alone p50",
        "seed": seed,
    }
    results: dict[str, dict[str, list[Step]]] = {}
    for policy in policies:
        gateway = None
        if not base_url:
            gateway = benchmark_config(
                policy,
                ttft_ms=ttft_slo_ms,
                tpot_ms=tpot_slo_ms,
                embedding_model=embedding_model,
                llm_model=llm_model,
                embedding_replicas=embedding_replicas,
            )
        print(f"policy {policy}: {', '.join(experiments)}")
        results[policy] = _policy_runs(policy, base_url, api_key, setup, experiments, gateway)
    headline: dict[str, dict[str, float]] = {}
    with benchmark_run(
        experiment, params, run_name=run_name or f"{'+'.join(experiments)}: {'/'.join(policies)}"
    ) as parent:
        if calibration:
            parent.log_metrics(_prefixed("calibration", calibration))
        for name in experiments:
            by_policy = {p: results[p][name] for p in policies}
            child_params = {k: v for k, v in params.items() if k not in ("experiments", "policies")}
            for policy, steps in by_policy.items():
                headline.setdefault(policy, {}).update(_log_child(parent, name, policy, steps, child_params))
            _parent_plots(parent, name, by_policy, ttft_slo_ms)
        keys = [k for name in experiments for k in headline_keys(name, results[policies[0]][name])]
        parent.log_json({p: {k: headline[p].get(k) for k in keys} for p in policies}, "summary.json")
        parent_id, artifact_uri = parent.run_id, parent.artifact_uri
    table = runs_table(
        experiment,
        keys,
        ["experiment", "policy"],
        max_runs=len(policies) * len(experiments),
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
    )
    publish_table(
        table,
        f"bench-{experiment}-{'-'.join(experiments)}",
        f"MLflow experiment {experiment!r}: this run's policies side by side",
    )
    for policy in policies:
        line = ", ".join(f"{k} {headline[policy].get(k, math.nan):.4g}" for k in keys)
        print(f"{policy}: {line}")
    return {
        "experiment": experiment,
        "mlflow_run_id": parent_id,
        "artifact_uri": artifact_uri,
        "ttft_slo_ms": ttft_slo_ms,
        "tpot_slo_ms": tpot_slo_ms,
        "policies": {p: {k: headline[p].get(k) for k in keys} for p in policies},
    }


def main(argv: list[str] | None = None) -> None:
    command_line_defaults()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiments", nargs="+", default=["interference"], choices=EXPERIMENTS)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--base-url", default=None)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--rates", nargs="+", type=float, default=None)
    parser.add_argument("--chat-rate", type=float, default=2.0)
    args = parser.parse_args(argv)
    out = controlplane_bench(
        experiments=args.experiments,
        policies=args.policies,
        base_url=args.base_url,
        duration_s=args.duration,
        rates=args.rates,
        chat_rate=args.chat_rate,
    )
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
