"""``sage-prefect flow run|list`` and ``sage-prefect deploy``: the project's flows and deployments.

The flows live in ``flows/`` of a checkout (a Prefect project: ``deployments/prefect.yaml``
points at ``flows/<name>.py:<name>``). They are found in the current directory first, then
in the checkout this package was installed from (``pip install -e .``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from sage_prefect.common.errors import ConfigError, SageError

flow_app = typer.Typer(help="The project's flows (flows/*.py): run and list them.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)

PREFECT_FILE = Path("deployments") / "prefect.yaml"


def project_root() -> Path:
    """The directory holding ``flows/`` and ``deployments/``: the cwd, else this package's checkout."""
    for candidate in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (candidate / "flows").is_dir() and (candidate / PREFECT_FILE).is_file():
            return candidate
    raise ConfigError(
        "no sage-prefect project here: run from a checkout that has flows/ and deployments/prefect.yaml"
    )


def flow_names(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "flows").glob("*.py") if not p.stem.startswith("_"))


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are JSON when they parse (numbers, booleans, lists), else strings.

    >>> parse_params(["top_k=3", "mode=vector", "evaluate=true"])
    {'top_k': 3, 'mode': 'vector', 'evaluate': True}
    """
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"parameter {pair!r} is not key=value", field=pair)
        try:
            params[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            params[key.strip()] = raw
    return params


def _fail(exc: BaseException) -> typer.Exit:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


@flow_app.command("list")
def list_flows() -> None:
    """The flows of this project and their parameters."""
    from prefect.flows import load_flow_from_entrypoint

    try:
        root = project_root()
    except SageError as exc:
        raise _fail(exc) from None
    table = Table("flow", "parameters", "description")
    for name in flow_names(root):
        flow: Any = load_flow_from_entrypoint(f"{root / 'flows' / name}.py:{name}")
        params = ", ".join(flow.parameters.properties)
        table.add_row(name, params, (flow.description or "").split("\n")[0])
    console.print(table)


@flow_app.command("run")
def run_flows(
    names: Annotated[list[str], typer.Argument(help="Flows to run, in order (e.g. rag_index rag_qa).")],
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param", "-p", help="key=value parameter (JSON values), for every flow that takes it."
        ),
    ] = None,
) -> None:
    """Run flows from flows/ in this process, in order, sharing one control plane.

    Without SAGE_CONTROLPLANE_URL an embedded control plane is started once for all of them.
    Parameters go to each flow that declares them; a key no flow declares is an error.
    """
    from prefect.flows import load_flow_from_entrypoint

    from sage_prefect.common.settings import command_line_defaults
    from sage_prefect.controlplane.server import connect_or_start

    command_line_defaults()

    try:
        root = project_root()
        known = flow_names(root)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"no flow {unknown[0]!r} in {root / 'flows'} (flows: {', '.join(known)})")
        params = parse_params(param or [])
        flows: dict[str, Any] = {n: load_flow_from_entrypoint(f"{root / 'flows' / n}.py:{n}") for n in names}
        declared = {k for f in flows.values() for k in f.parameters.properties}
        stray = sorted(set(params) - declared)
        if stray:
            raise ConfigError(
                f"parameter {stray[0]!r} is not a parameter of {', '.join(names)}", field=stray[0]
            )
        runs: list[tuple[str, str, dict[str, Any]]] = []
        with connect_or_start(while_starting=_start_prefect_ephemeral_api) as base_url:
            console.print(f"control plane: {base_url}")
            for name, flow in flows.items():
                mine = {k: v for k, v in params.items() if k in flow.parameters.properties}
                started = time.perf_counter()
                state = flow(**mine, return_state=True)
                summary = state.result(raise_on_failure=True)
                _print_summary(name, state, summary, time.perf_counter() - started)
                run_id = str(state.state_details.flow_run_id)
                runs.append((name, run_id, summary if isinstance(summary, dict) else {}))
    except SageError as exc:
        raise _fail(exc) from None
    _where_to_look(runs)


def _start_prefect_ephemeral_api() -> None:
    """Without a Prefect API URL, start Prefect's temporary API server now (what the first flow
    call would do), while the embedded control plane loads its models in its own process.

    Its first start creates the database; with the control plane loading beside it on a small
    machine that took longer than Prefect's default 20 s wait here, so this waits up to 120 s
    (or longer, if PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS says so).
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    )

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    timeout = max(120, int(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
    try:
        SubprocessASGIServer().start(timeout=timeout)  # the same singleton flows use; stopped at exit
    except RuntimeError as exc:
        raise SageError(
            f"Prefect's temporary API server did not start ({exc}). Start one with "
            "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api, or allow "
            "a slow machine more time with PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS."
        ) from exc


def _where_to_look(runs: list[tuple[str, str, dict[str, Any]]]) -> None:
    console.print("\n[bold]Where to look[/]")
    for name, run_id, summary in runs:
        uri = summary.get("lance_uri")
        tables = [summary[k] for k in ("table", "answers_table", "output_table") if summary.get(k)]
        console.print(f"  {name}: Prefect flow run {run_id}")
        for table in tables:
            console.print(
                f"    LanceDB table {table!r} in {uri}: "
                f"python -c \"import lancedb; print(lancedb.connect('{uri}').open_table('{table}').to_pandas())\"",
                soft_wrap=True,
            )
    console.print(
        "  Prefect UI: [bold]prefect server start[/], then http://127.0.0.1:4200/runs "
        "(runs on the ephemeral API are stored in the same local database)"
    )


def _print_summary(name: str, state: Any, summary: Any, seconds: float) -> None:
    table = Table(title=f"{name}: {state.name} in {seconds:.1f} s", show_header=False)
    table.add_row("flow run", str(state.state_details.flow_run_id))
    if isinstance(summary, dict):
        for key, value in summary.items():
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)


def deploy(
    names: Annotated[
        list[str] | None,
        typer.Argument(help="Deployment names to deploy (default: all of deployments/prefect.yaml)."),
    ] = None,
    pool: Annotated[str, typer.Option(help="Process work pool to create when missing.")] = "sage-process",
    serve: Annotated[
        bool, typer.Option(help="Serve the deployments from this process instead (no server-side work pool).")
    ] = False,
) -> None:
    """Deploy the project's flows: a thin wrapper over ``prefect deploy --all`` and ``prefect.serve``.

    Needs a Prefect API (PREFECT_API_URL of `prefect server start` or Cloud). Creates the
    process work pool if it does not exist, then runs `prefect deploy` on deployments/prefect.yaml
    from the project root; start a worker with `prefect worker start --pool sage-process`.
    With --serve, runs the same deployments (schedules included) in this process instead.
    """
    try:
        root = project_root()
        if serve:
            _serve(root, names or [])
            return
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise ConfigError(
                "deploy needs a Prefect API to deploy to: start one (prefect server start) and set "
                "PREFECT_API_URL=http://127.0.0.1:4200/api, or log in to Prefect Cloud; "
                "or use --serve to serve the deployments from this process"
            )
        prefect = [sys.executable, "-m", "prefect"]
        env = {**os.environ, "PWD": str(root)}
        inspect = subprocess.run(
            [*prefect, "work-pool", "inspect", pool], cwd=root, env=env, capture_output=True, text=True
        )
        if inspect.returncode != 0:
            console.print(f"creating process work pool {pool!r}")
            _check(
                subprocess.run(
                    [*prefect, "work-pool", "create", pool, "--type", "process"], cwd=root, env=env
                )
            )
        targets = [arg for n in names for arg in ("--name", n)] if names else ["--all"]
        _check(
            subprocess.run(
                [*prefect, "--no-prompt", "deploy", *targets, "--prefect-file", str(PREFECT_FILE)],
                cwd=root,
                env=env,
            )
        )
    except SageError as exc:
        raise _fail(exc) from None
    console.print(f"Start a worker: [bold]prefect worker start --pool {pool}[/]")


def _check(result: subprocess.CompletedProcess[Any]) -> None:
    if result.returncode != 0:
        raise typer.Exit(code=result.returncode)


def deployment_specs(root: Path) -> list[dict[str, Any]]:
    """The ``deployments`` entries of deployments/prefect.yaml."""
    path = root / PREFECT_FILE
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    specs = data.get("deployments")
    if not isinstance(specs, list):
        raise ConfigError(f"{path}: no 'deployments' list", file=str(path), field="deployments")
    return specs


def _serve(root: Path, names: list[str]) -> None:
    from prefect import serve
    from prefect.flows import load_flow_from_entrypoint

    specs = [s for s in deployment_specs(root) if not names or s["name"] in names]
    if not specs:
        raise ConfigError(f"no deployment named {', '.join(names)} in {root / PREFECT_FILE}")
    os.chdir(root)
    deployments: list[Any] = []
    for spec in specs:
        flow: Any = load_flow_from_entrypoint(str(root / spec["entrypoint"]))
        crons = [s["cron"] for s in spec.get("schedules") or [] if "cron" in s]
        deployments.append(
            flow.to_deployment(
                name=spec["name"],
                parameters=spec.get("parameters") or {},
                description=spec.get("description"),
                tags=spec.get("tags"),
                cron=crons or None,
            )
        )
    console.print(f"serving {', '.join(s['name'] for s in specs)} (Ctrl-C to stop)")
    serve(*deployments)
