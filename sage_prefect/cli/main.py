"""The ``sage-prefect`` command: ``run``, ``flow run|list``, ``bench run|compare|list``, ``deploy``, ``cluster up``, ``controlplane serve``, ``doctor``."""

from __future__ import annotations

import importlib.metadata
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from sage_prefect.cli.bench import bench_app
from sage_prefect.cli.flows import deploy, flow_app
from sage_prefect.cli.models import models_app
from sage_prefect.common.errors import SageError

app = typer.Typer(
    help="SAGE-style LLM/AI pipelines as Prefect flows on a Dask GPU/CPU cluster.", no_args_is_help=True
)
cluster_app = typer.Typer(help="Dask clusters with GPU/CPU resource labels.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")
controlplane_app = typer.Typer(
    help="The OpenAI-compatible control plane for LLM and embedding traffic.", no_args_is_help=True
)
app.add_typer(controlplane_app, name="controlplane")
app.add_typer(flow_app, name="flow")
app.add_typer(bench_app, name="bench")
app.add_typer(models_app, name="models")
app.command()(deploy)
console = Console()
err = Console(stderr=True)


def _fail(exc: BaseException) -> typer.Exit:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


@app.command()
def run(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML file.")],
    address: Annotated[
        str | None, typer.Option(help="Dask scheduler address; default: a local cluster on 127.0.0.1.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Rows per partition.")] = None,
    cpu_workers: Annotated[int | None, typer.Option(min=0, help="Local CPU workers.")] = None,
    gpu_workers: Annotated[int | None, typer.Option(min=0, help="Local GPU workers.")] = None,
) -> None:
    """Run a pipeline written as YAML, as one Prefect flow run."""
    from sage_prefect.kernel.environment import DaskEnvironment
    from sage_prefect.kernel.yaml_spec import load_pipeline

    kwargs: dict[str, Any] = {}
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    try:
        remote = DaskEnvironment(pipeline.stem, address=address, **kwargs) if address else None
        local = {"n_cpu_workers": cpu_workers, "n_gpu_workers": gpu_workers, **kwargs}
        env = load_pipeline(pipeline, env=remote, **({} if remote else local))
        started = time.perf_counter()
        with console.status(f"running {env.name} ..."):
            result = env.submit(autostop=True)
    except SageError as exc:
        raise _fail(exc) from None
    wall = time.perf_counter() - started
    table = Table(title=f"pipeline {env.name!r}: {result.state}", show_header=False)
    table.add_row("flow run", result.flow_run_id)
    table.add_row("rows in", f"{result.rows_in:,} in {result.partitions} partitions ({result.tasks} tasks)")
    for sink, rows in result.sinks.items():
        table.add_row(f"sink {sink}", f"{rows:,} rows")
    table.add_row("time", f"{wall:.1f} s ({result.rows_in / max(wall, 1e-9):,.0f} rows/s)")
    console.print(table)
    console.print(
        "See the run in the Prefect UI: [bold]prefect server start[/] then http://127.0.0.1:4200/runs "
        f"(flow run {result.flow_run_id})."
    )


@cluster_app.command("up")
def cluster_up(
    host: Annotated[str, typer.Option(help="Address to listen on (default loopback only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Scheduler port.")] = 8786,
    gpu_workers: Annotated[
        int | None, typer.Option(min=0, help="GPU workers (default: one per GPU).")
    ] = None,
    cpu_workers: Annotated[int | None, typer.Option(min=0, help="CPU workers (default: cores left).")] = None,
    threads: Annotated[int, typer.Option(min=1, help="Threads per CPU worker.")] = 1,
) -> None:
    """Start a standalone scheduler + GPU/CPU workers for other processes to join (Ctrl-C stops it)."""
    from sage_prefect.dask_gpu import serve_cluster

    def ready(address: str) -> None:
        console.print(f"Dask scheduler at [bold]{address}[/] — join with SAGE_DASK_ADDRESS={address}")

    try:
        serve_cluster(
            host=host,
            scheduler_port=port,
            n_gpu_workers=gpu_workers,
            n_cpu_workers=cpu_workers,
            threads_per_worker=threads,
            on_ready=ready,
        )
    except KeyboardInterrupt:
        pass
    except (SageError, OSError) as exc:
        raise _fail(exc) from None


@controlplane_app.command("serve")
def controlplane_serve(
    config: Annotated[
        Path | None, typer.Option(help="controlplane.yaml (default: the embedded models on 127.0.0.1:8100).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (non-loopback requires API keys).")] = None,
    port: Annotated[int | None, typer.Option(min=0, max=65535, help="Port.")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, /health, /metrics."""
    from sage_prefect.controlplane.config import load_config
    from sage_prefect.controlplane.server import prepare_models, serve

    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    try:
        cfg = load_config(config, **overrides)
        prepare_models(config)  # pull the store models it names, with progress, before serving
    except SageError as exc:
        raise _fail(exc) from None
    typer.echo(f"control plane on http://{cfg.host}:{cfg.port}/v1 (policy {cfg.policy})", err=True)
    serve(cfg, log_level=log_level)


@app.command()
def doctor(
    address: Annotated[
        str | None, typer.Option(help="Dask scheduler to check (default SAGE_DASK_ADDRESS).")
    ] = None,
) -> None:
    """What is installed, which GPUs are seen, whether the Prefect API and Dask are reachable."""
    from sage_prefect.common.settings import load_settings
    from sage_prefect.dask_gpu import cluster_address_reachable, detect_gpus

    ok = True
    table = Table(title="sage-prefect doctor", show_header=True)
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for package in ("sage-prefect", "prefect", "prefect-dask", "dask", "distributed", "pyarrow", "lancedb"):
        try:
            table.add_row(package, "[green]ok", importlib.metadata.version(package))
        except importlib.metadata.PackageNotFoundError:
            ok = False
            table.add_row(package, "[red]missing", "pip install -c constraints.txt -e .")
    try:
        settings = load_settings()
        table.add_row("settings", "[green]ok", f"home {settings.home}")
    except SageError as exc:
        ok = False
        table.add_row("settings", "[red]invalid", str(exc))
        settings = None
    gpus = detect_gpus()
    table.add_row(
        "GPUs", "[green]ok", ", ".join(f"{g.index}: {g.name}" for g in gpus) or "none seen (CPU only)"
    )
    prefect_ok, prefect_detail = _prefect_health()
    ok &= prefect_ok
    table.add_row("Prefect API", "[green]ok" if prefect_ok else "[red]unreachable", prefect_detail)
    address = address or (settings.dask_address if settings else None)
    if address:
        reachable = cluster_address_reachable(address)
        ok &= reachable
        table.add_row("Dask scheduler", "[green]ok" if reachable else "[red]unreachable", address)
    else:
        table.add_row(
            "Dask scheduler", "[green]ok", "local cluster started per run (set SAGE_DASK_ADDRESS to join one)"
        )
    console.print(table)
    if not ok:
        raise typer.Exit(code=1)


def _prefect_health() -> tuple[bool, str]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    configured = PREFECT_API_URL.value()
    try:
        with get_client(sync_client=True) as client:
            failure = client.api_healthcheck()
            url = str(client.api_url)
    except Exception as exc:  # the check reports any failure instead of raising it
        return False, f"{configured or 'ephemeral'}: {type(exc).__name__}: {exc}"
    mode = "server" if configured else "ephemeral (a temporary server per process)"
    if failure is not None:
        return False, f"{url}: {failure}"
    return True, f"{url} ({mode})"


def main() -> None:  # pragma: no cover - console script
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
