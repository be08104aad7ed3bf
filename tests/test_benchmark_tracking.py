"""MLflow logging and run comparison: a real MLflow SQLite store in a temp dir, the real CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sage_prefect.common.errors import ConfigError


@pytest.fixture
def mlflow_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("SAGE_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


def _two_policy_runs() -> list[str]:
    from sage_prefect.benchmark.plots import latency_cdf
    from sage_prefect.benchmark.tracking import benchmark_run

    ids = []
    for policy, ttft in (("fifo", 40.0), ("hybrid", 20.0)):
        params = {"policy": policy, "load": {"rates": [1, 2], "seed": 0}, "models": None}
        with benchmark_run("sched", params, run_name=policy) as run:
            for step, rate in enumerate((1, 2)):
                run.log_metrics(
                    {"p99_ttft_ms": ttft * rate, "slo_attainment_interactive": 1 / rate}, step=step
                )
            run.log_metrics({"flag": True, "skipped": None, "nan": math.nan})  # bool/None are not metrics
            run.set_headline(["p99_ttft_ms", "slo_attainment_interactive"])
            run.log_json([{"request_id": "r0", "ttft_s": 0.02}], "raw/requests.json")
            run.log_figure(latency_cdf({policy: [ttft, ttft * 2]}, "ttft"), "plots/ttft.png")
            ids.append(run.run_id)
    return ids


def test_a_run_logs_params_commit_machine_metrics_per_step_and_artifacts(mlflow_home: Path) -> None:
    from mlflow import MlflowClient

    from sage_prefect.benchmark.tracking import tracking_uri

    fifo, _ = _two_policy_runs()
    uri = tracking_uri()
    assert uri == f"sqlite:///{(mlflow_home / 'mlflow.db').resolve()}"
    client = MlflowClient(uri)
    run = client.get_run(fifo)
    assert run.info.status == "FINISHED" and run.info.run_name == "fifo"
    params = run.data.params
    assert params["policy"] == "fifo" and params["load.rates"] == "[1, 2]" and "models" not in params
    assert len(params["git_commit"]) == 40 and params["git_dirty"] in ("true", "false")
    assert int(params["machine.cpu_count"]) >= 1 and params["machine.gpus"]
    history = client.get_metric_history(fifo, "p99_ttft_ms")
    assert [(m.step, m.value) for m in history] == [(0, 40.0), (1, 80.0)]
    assert "flag" not in run.data.metrics and "skipped" not in run.data.metrics
    assert math.isnan(run.data.metrics["nan"])
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(mlflow_home / "mlartifacts" / "sched")
    assert json.loads((artifacts / "raw" / "requests.json").read_text())[0]["request_id"] == "r0"
    assert (artifacts / "plots" / "ttft.png").read_bytes()[:4] == b"\x89PNG"


def test_a_failing_block_marks_the_run_failed_and_runs_table_skips_it(mlflow_home: Path) -> None:
    from mlflow import MlflowClient

    from sage_prefect.benchmark.tracking import benchmark_run, runs_table, tracking_uri

    with pytest.raises(RuntimeError, match="engine died"), benchmark_run("broken", {"policy": "slo"}) as run:
        run.log_metrics({"x": 1.0})
        raise RuntimeError("engine died")
    assert MlflowClient(tracking_uri()).get_run(run.run_id).info.status == "FAILED"
    assert runs_table("broken").empty
    assert len(runs_table("broken", finished_only=False)) == 1


def test_runs_table_shows_runs_side_by_side_and_names_what_is_missing(mlflow_home: Path) -> None:
    from sage_prefect.benchmark.tracking import runs_table

    _two_policy_runs()
    table = runs_table("sched")
    assert list(table["run"]) == ["hybrid", "fifo"]  # newest first
    assert list(table.columns) == [
        "run_id",
        "run",
        "started",
        "policy",
        "p99_ttft_ms",
        "slo_attainment_interactive",
    ]
    assert list(table["p99_ttft_ms"]) == [40.0, 80.0]  # the last step's value
    only = runs_table("sched", metrics=["slo_*"], params=["load.seed"])
    assert list(only.columns) == ["run_id", "run", "started", "load.seed", "slo_attainment_interactive"]
    with pytest.raises(ConfigError, match=r"no metric 'goodput'.*p99_ttft_ms"):
        runs_table("sched", metrics=["goodput"])
    with pytest.raises(ConfigError, match=r"no MLflow experiment 'nope'.*sched"):
        runs_table("nope")
    filtered = runs_table("sched", filter_string="params.policy = 'fifo'")
    assert list(filtered["run"]) == ["fifo"]


def test_bench_compare_prints_the_table_and_writes_a_plot(mlflow_home: Path, tmp_path: Path) -> None:
    from sage_prefect.cli.main import app

    _two_policy_runs()
    plot = tmp_path / "cmp.png"
    result = CliRunner().invoke(
        app,
        ["bench", "compare", "sched", "--metric", "p99_ttft_ms", "--plot", str(plot)],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "MLflow experiment 'sched': 2 runs" in result.output
    lines = [line for line in result.output.splitlines() if "fifo" in line or "hybrid" in line]
    assert any("fifo" in line and "80" in line for line in lines)
    assert any("hybrid" in line and "40" in line for line in lines)
    assert plot.read_bytes()[:4] == b"\x89PNG"

    missing = CliRunner().invoke(app, ["bench", "compare", "sched", "--metric", "goodput"])
    assert missing.exit_code == 1 and "no metric 'goodput'" in missing.output


def test_bench_run_names_an_unknown_benchmark_and_parameter(mlflow_home: Path) -> None:
    from sage_prefect.cli.main import app

    unknown = CliRunner().invoke(app, ["bench", "run", "nosuch"])
    assert (
        unknown.exit_code == 1
        and "no benchmark 'nosuch'" in unknown.output
        and "controlplane" in unknown.output
    )
    stray = CliRunner().invoke(app, ["bench", "run", "pipeline", "-p", "copiez=2"], env={"COLUMNS": "200"})
    assert stray.exit_code == 1 and "'copiez' is not a parameter of benchmark 'pipeline'" in stray.output


def test_metric_keys_and_params_are_made_mlflow_safe() -> None:
    from sage_prefect.benchmark.tracking import PARAM_MAX, flatten, metric_key

    assert metric_key("timing", "BFCL_v4_irrelevance.jsonl", "f1") == "timing.BFCL_v4_irrelevance.jsonl.f1"
    assert metric_key("sel", "a[b]:c%") == "sel.a_b__c_"
    long = flatten({"text": "x" * (PARAM_MAX + 10)})["text"]
    assert len(long) == PARAM_MAX and long.endswith("...")
