"""``sage-prefect bench list|run|compare``: the benchmark flows of ``benchmarks/flows/`` and their
MLflow runs.

``bench run <benchmark> -p key=value ...`` runs one benchmark flow in this process (a Prefect
flow run; each logs an MLflow run in the experiment named after the benchmark, or the flow's
``experiment`` parameter) and then shows the experiment's recent runs side by side.
``bench compare <experiment>`` shows that table for any experiment, from ``mlflow.search_runs``,
and writes a comparison plot.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from sage_prefect.cli.flows import parse_params, project_root
from sage_prefect.common.errors import ConfigError, SageError

bench_app = typer.Typer(
    help="Benchmarks as Prefect flows logged to MLflow: run them, compare their runs.", no_args_is_help=True
)
console = Console()
err = Console(stderr=True)

# benchmark name -> flow function in benchmarks/flows/<name>.py
BENCHMARKS = {"controlplane": "controlplane_bench", "agent": "agent_bench", "pipeline": "pipeline_bench"}


def _fail(exc: BaseException) -> typer.Exit:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


def load_benchmark(name: str) -> Any:
    """The Prefect flow of benchmark ``name`` from ``benchmarks/flows/<name>.py``."""
    from prefect.flows import load_flow_from_entrypoint

    if name not in BENCHMARKS:
        raise ConfigError(f"no benchmark {name!r} (benchmarks: {', '.join(BENCHMARKS)})", field="benchmark")
    path = project_root() / "benchmarks" / "flows" / f"{name}.py"
    if not path.is_file():
        raise ConfigError(f"benchmark {name!r}: {path} is missing", file=str(path))
    return load_flow_from_entrypoint(f"{path}:{BENCHMARKS[name]}")


@bench_app.command("list")
def list_benchmarks() -> None:
    """The benchmarks and their parameters."""
    table = Table("benchmark", "parameters", "description")
    try:
        for name in BENCHMARKS:
            flow = load_benchmark(name)
            params = ", ".join(flow.parameters.properties)
            table.add_row(name, params, (flow.description or "").split("\n")[0])
    except SageError as exc:
        raise _fail(exc) from None
    console.print(table)


@bench_app.command("run")
def run_benchmark(
    benchmark: Annotated[str, typer.Argument(help=f"One of: {', '.join(BENCHMARKS)}.")],
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param", "-p", help='key=value flow parameter (JSON values), e.g. -p experiments=["slo"]'
        ),
    ] = None,
) -> None:
    """Run a benchmark flow (a Prefect flow run that logs to MLflow), then compare its experiment's runs."""
    from sage_prefect.common.settings import command_line_defaults

    command_line_defaults()
    try:
        flow = load_benchmark(benchmark)
        params = parse_params(param or [])
        stray = sorted(set(params) - set(flow.parameters.properties))
        if stray:
            known = ", ".join(flow.parameters.properties)
            raise ConfigError(
                f"{stray[0]!r} is not a parameter of benchmark {benchmark!r} (parameters: {known})",
                field=stray[0],
            )
        started = time.perf_counter()
        state = flow(**params, return_state=True)
        summary = state.result(raise_on_failure=True)
    except SageError as exc:
        raise _fail(exc) from None
    seconds = time.perf_counter() - started
    summary = summary if isinstance(summary, dict) else {}
    console.print(
        f"[bold]{benchmark}[/]: {state.name} in {seconds:.1f} s, Prefect flow run "
        f"{state.state_details.flow_run_id}, MLflow run {summary.get('mlflow_run_id', '?')}"
    )
    experiment = summary.get("experiment", benchmark)
    try:
        _show_table(experiment, None, None, 10, "", None)
    except SageError as exc:
        raise _fail(exc) from None
    _where_to_look(summary)


def _where_to_look(summary: dict[str, Any]) -> None:
    from sage_prefect.benchmark.tracking import tracking_uri

    uri = tracking_uri()
    console.print("\n[bold]Where to look[/]")
    if summary.get("artifact_uri"):
        console.print(f"  artifacts (raw JSON, plots): {summary['artifact_uri']}", soft_wrap=True)
    if uri.startswith("sqlite:"):
        console.print(
            f"  MLflow UI: [bold]mlflow ui --backend-store-uri {uri}[/] (http://127.0.0.1:5000)",
            soft_wrap=True,
        )
    else:
        console.print(f"  MLflow: {uri}")
    console.print("  Prefect UI: [bold]prefect server start[/], then http://127.0.0.1:4200/runs")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def _show_table(
    experiment: str,
    metrics: list[str] | None,
    params: list[str] | None,
    max_runs: int,
    filter_string: str,
    plot: Path | None,
) -> Any:
    from sage_prefect.benchmark.tracking import runs_table

    table = runs_table(experiment, metrics, params, max_runs=max_runs, filter_string=filter_string)
    if table.empty:
        console.print(f"experiment {experiment!r} has no finished runs yet")
        return table
    title = f"MLflow experiment {experiment!r}: {len(table)} runs, newest first"
    if len(table.columns) <= 7:
        out = Table(title=title)
        for column in table.columns:
            out.add_column(str(column), overflow="fold")
        for row in table.itertuples(index=False):
            out.add_row(*(_fmt(v) for v in row))
    else:  # many metrics: one row per field, one column per run
        out = Table(title=title)
        out.add_column("field", overflow="fold")
        for run, run_id in zip(table["run"], table["run_id"], strict=True):
            out.add_column(f"{run}\n{run_id}" if run else str(run_id), overflow="fold")
        for column in table.columns:
            if column not in ("run", "run_id"):
                out.add_row(str(column), *(_fmt(v) for v in table[column]))
    console.print(out)
    if plot is not None:
        from sage_prefect.benchmark.plots import comparison, save

        shown = [
            c for c in table.columns if c not in ("run_id", "run", "started") and table[c].dtype.kind == "f"
        ]
        save(comparison(table, shown, f"experiment {experiment}"), str(plot))
        console.print(f"comparison plot: {plot}")
    return table


@bench_app.command("compare")
def compare(
    experiment: Annotated[str, typer.Argument(help="MLflow experiment (benchmark name, e.g. controlplane).")],
    metric: Annotated[
        list[str] | None,
        typer.Option(
            "--metric",
            "-m",
            help="Metric to show (repeatable; 'prefix*' for a group). Default: headline metrics.",
        ),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", help="Parameter column (repeatable). Default: those that differ."),
    ] = None,
    max_runs: Annotated[int, typer.Option(min=1, help="Newest runs to show.")] = 20,
    filter_string: Annotated[
        str, typer.Option("--filter", help="MLflow search filter, e.g. \"params.policy = 'slo'\".")
    ] = "",
    plot: Annotated[
        Path | None,
        typer.Option(help="Comparison plot (PNG). Default: <SAGE_HOME>/results/compare-<experiment>.png"),
    ] = None,
) -> None:
    """The runs of an MLflow experiment side by side (mlflow.search_runs), and a comparison plot."""
    from sage_prefect.common.settings import load_settings

    if plot is None:
        results = load_settings().results_dir
        results.mkdir(parents=True, exist_ok=True)
        plot = results / f"compare-{''.join(c if c.isalnum() or c in '-_' else '_' for c in experiment)}.png"
    try:
        _show_table(experiment, metric, param, max_runs, filter_string, plot)
    except SageError as exc:
        raise _fail(exc) from None
