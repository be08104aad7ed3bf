"""The benchmark flows (benchmarks/flows/*.py) end to end: a real Prefect API, the real control
plane, real load, and a real MLflow SQLite store in a temp dir that each run must leave with the
expected parameters, metrics and artifacts."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def benches() -> Iterator[dict[str, Any]]:
    from prefect.flows import load_flow_from_entrypoint

    from sage_prefect.cli.bench import BENCHMARKS

    yield {
        name: load_flow_from_entrypoint(f"{ROOT / 'benchmarks' / 'flows' / name}.py:{fn}")
        for name, fn in BENCHMARKS.items()
        if (ROOT / "benchmarks" / "flows" / f"{name}.py").is_file()
    }
    for name in list(sys.modules):
        if name.startswith("__prefect_loader"):
            del sys.modules[name]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SAGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("SAGE_N_CPU_WORKERS", "1")
    monkeypatch.setenv("SAGE_N_GPU_WORKERS", "0")
    monkeypatch.setenv("SAGE_PROCESSES", "false")
    monkeypatch.setenv("SAGE_THREADS_PER_WORKER", "2")
    return tmp_path / "home"


def _runs(experiment: str) -> list[Any]:
    from mlflow import MlflowClient

    from sage_prefect.benchmark.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    return list(client.search_runs([exp.experiment_id]))


def _artifacts(run: Any) -> Path:
    return Path(run.info.artifact_uri.removeprefix("file://"))


def test_controlplane_flow_runs_every_experiment_against_an_endpoint(
    benches: dict[str, Any], prefect_api: str, controlplane: str, home: Path
) -> None:
    """External-endpoint mode (as against a bare vLLM server): five experiments, short and bounded."""
    out = benches["controlplane"](
        experiments=["throughput", "latency", "slo", "interference", "mixed_ratio"],
        base_url=controlplane,
        duration_s=1.5,
        rates=[4, "inf"],
        llm_shares=[1.0, 0.5],
        chat_rate=3.0,
        bulk_rate=3.0,
        bulk_texts=4,
        output_tokens=8,
        warmup_requests=1,
        probe_rate=2.0,
        ttft_slo_ms=5000,
        tpot_slo_ms=1000,
    )
    runs = {r.info.run_name: r for r in _runs("controlplane")}
    parent = runs.pop(next(n for n in runs if ":" in n))
    assert parent.info.run_id == out["mlflow_run_id"] and parent.info.status == "FINISHED"
    assert set(runs) == {
        f"{e} / external" for e in ("throughput", "latency", "slo", "interference", "mixed_ratio")
    }
    for run in runs.values():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["policy"] == "external" and float(run.data.params["ttft_slo_ms"]) == 5000
        assert run.data.params["endpoint"] == controlplane and len(run.data.params["git_commit"]) == 40
        assert "prefect.flow_run_id" in run.data.tags

    slo = runs["slo / external"].data.metrics
    assert 0.0 <= slo["slo.rate_4.slo_attainment_interactive"] <= 1.0
    assert slo["slo.rate_4.completed"] + slo["slo.rate_4.failed"] + slo["slo.rate_4.rejected"] >= 3
    tp = runs["throughput / external"].data.metrics
    assert tp["throughput.rate_inf.request_throughput"] > 0 and tp["throughput.rate_4.mean_ttft_ms"] > 0
    inter = runs["interference / external"].data.metrics
    assert inter["interference.embedding_vs_alone"] > 0
    assert inter["interference.both.probe_count"] >= 1
    lat = runs["latency / external"].data.metrics
    assert lat["latency.p99_ttft_ms"] >= lat["latency.median_ttft_ms"] > 0
    assert runs["mixed_ratio / external"].data.metrics["mixed_ratio.llm_share_0.5.request_throughput"] > 0

    raw = json.loads(
        (_artifacts(runs["interference / external"]) / "raw" / "interference-external.json").read_text()
    )
    assert [s["label"] for s in raw] == ["chat alone", "embeddings alone", "both + probe"]
    both = raw[2]["load"]["results"]
    assert {r["kind"] for r in both} == {"chat", "embedding"} and any(r["probe"] for r in both)
    assert all(r["status"] in ("ok", "error", "rejected") for r in both)
    plots = {p.name for p in (_artifacts(parent) / "plots").iterdir()}
    assert {"slo-attainment-vs-rate.png", "slo-goodput-vs-rate.png", "interference-bars.png"} <= plots
    assert {"latency-ttft-cdf.png", "throughput-output-throughput.png"} <= plots


def test_controlplane_flow_starts_a_gateway_per_policy_and_calibrates(
    benches: dict[str, Any], prefect_api: str, home: Path
) -> None:
    out = benches["controlplane"](
        experiments=["interference"],
        policies=["hybrid"],
        duration_s=1.5,
        chat_rate=3.0,
        bulk_rate=3.0,
        bulk_texts=4,
        output_tokens=8,
        warmup_requests=1,
        embedding_replicas=1,
    )
    assert 0 < out["ttft_slo_ms"] < 10_000 and out["tpot_slo_ms"] > 0
    runs = {r.info.run_name: r for r in _runs("controlplane")}
    child = runs["interference / hybrid"]
    assert child.data.params["policy"] == "hybrid"
    assert child.data.params["slo_rule"] == "2 x chat-alone p50"
    assert float(child.data.params["ttft_slo_ms"]) == pytest.approx(out["ttft_slo_ms"], rel=1e-3)
    assert child.data.metrics["interference.chat_alone.completed"] >= 1
    parent = runs[next(n for n in runs if ":" in n)]
    assert parent.data.metrics["calibration.median_ttft_ms"] * 2 == pytest.approx(
        out["ttft_slo_ms"], rel=1e-6
    )


def test_controlplane_flow_names_a_bad_experiment_or_policy(
    benches: dict[str, Any], prefect_api: str, home: Path
) -> None:
    from sage_prefect.common.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown experiment 'speed'"):
        benches["controlplane"](experiments=["speed"])
    with pytest.raises(ConfigError, match="unknown policy 'lifo'"):
        benches["controlplane"](policies=["lifo"])


def test_pipeline_flow_logs_throughput_and_stage_latency(
    benches: dict[str, Any], prefect_api: str, controlplane_env: str, home: Path, tmp_path: Path
) -> None:
    from sage_prefect.examples import QUESTIONS_PATH

    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(QUESTIONS_PATH.read_text().splitlines(keepends=True)[:3]))
    out = benches["pipeline"](copies=1, questions=str(questions), max_tokens=4)
    (run,) = _runs("pipeline")
    metrics, params = run.data.metrics, run.data.params
    assert run.info.run_id == out["mlflow_run_id"]
    assert params["documents"] == "8" and params["cluster"] == "embedded LocalCluster"
    assert metrics["qa_questions"] == 3 and metrics["index_chunks"] > 8
    assert metrics["index_chunks_per_s"] > 0 and metrics["qa_questions_per_s"] > 0
    for stage in ("retrieve", "rerank", "generate"):
        assert metrics[f"latency_{stage}_ms_p90"] >= metrics[f"latency_{stage}_ms_p50"] > 0
    per_question = json.loads((_artifacts(run) / "raw" / "per_question_latency.json").read_text())
    assert len(per_question) == 3 and all("latency_generate_ms" in q for q in per_question)
    assert (_artifacts(run) / "plots" / "stage_latency.png").read_bytes()[:4] == b"\x89PNG"


def test_agent_flow_scores_every_task_on_the_shipped_sample(
    benches: dict[str, Any], prefect_api: str, controlplane_env: str, home: Path
) -> None:
    out = benches["agent"](
        selectors=["keyword", "embedding"], planners=["retrieval"], timing_methods=["rule"]
    )
    (run,) = _runs("agent")
    metrics, params = run.data.metrics, run.data.params
    assert run.info.run_id == out["mlflow_run_id"] and params["holdout_fraction"] == "0.2"
    assert json.loads(params["selectors.embedding"]) == {"method": "embedding"}
    # every metric is named after the file it was scored on
    assert 0 <= metrics["selection.metatool.selection_test.embedding.top1_accuracy"] <= 1
    assert metrics["selection.metatool.selection_test.keyword.n"] > 0
    assert "selection.bfcl.BFCL_v4_multiple.embedding.mrr" in metrics
    assert "planning.metatool.multi_tool_dev_holdout.retrieval.f1" in metrics
    assert "timing.metatool.timing_dev_holdout.rule.accuracy" in metrics
    assert "timing.bfcl.BFCL_v4_irrelevance.rule.accuracy" in metrics
    rows = json.loads((_artifacts(run) / "results.json").read_text())
    assert {(r["task"], r["dataset"]) for r in rows} == {
        ("selection", "metatool"),
        ("selection", "bfcl"),
        ("planning", "metatool"),
        ("timing", "metatool"),
        ("timing", "bfcl"),
        ("bfcl_calls", "bfcl"),
    }
    plots = sorted(p.name for p in (_artifacts(run) / "plots").iterdir())
    assert any(p.startswith("selection-metatool") for p in plots) and any(
        p.startswith("timing-") for p in plots
    )


def test_agent_flow_names_unknown_methods_and_empty_data(
    benches: dict[str, Any], prefect_api: str, home: Path, tmp_path: Path
) -> None:
    from sage_prefect.common.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown selector 'magic'"):
        benches["agent"](selectors=["magic"])
    with pytest.raises(ConfigError, match="holds neither MetaTool data"):
        benches["agent"](data_dir=str(tmp_path))
