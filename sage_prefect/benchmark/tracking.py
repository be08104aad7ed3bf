"""MLflow logging for the benchmark flows, and side-by-side comparison of their runs.

One MLflow experiment per benchmark (``controlplane``, ``agent``, ``pipeline``, or any name).
A benchmark run records, through `BenchmarkRun`:

- parameters: the benchmark's own (policy, rates, models, batch settings, ...) plus
  ``git_commit``, ``git_dirty`` and the machine (``machine.*``: platform, CPU model and count,
  memory, GPUs, Python and package versions); nested values are flattened to dotted keys;
- metrics, optionally per step (one step per rate of a sweep, so MLflow draws the sweep);
- artifacts: JSON documents (the raw per-request records) and matplotlib figures (PNG);
- tags: the Prefect flow run it ran in (``prefect.flow_run_id``/``prefect.flow_run_name``) and
  ``sage.headline_metrics``, the metrics `runs_table` shows by default.

Where runs go: ``MLFLOW_TRACKING_URI`` when set (an MLflow server, ``databricks``, a SQLite
URI ...); otherwise a SQLite store at ``<SAGE_HOME>/mlflow.db`` with artifacts under
``<SAGE_HOME>/mlartifacts/<experiment>`` — see them with
``mlflow ui --backend-store-uri sqlite:///<SAGE_HOME>/mlflow.db``.

Everything goes through `mlflow.MlflowClient` with an explicit tracking URI (no global
"active run"), so flows running side by side in one process never log into each other's run.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sage_prefect.common.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

__all__ = [
    "BenchmarkRun",
    "benchmark_run",
    "git_info",
    "machine_info",
    "metric_key",
    "publish_table",
    "runs_table",
    "tracking_uri",
]

_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")
HEADLINE_TAG = "sage.headline_metrics"
PARAM_MAX = 6000  # MLflow's limit on a parameter value


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


def _home() -> Path:
    from sage_prefect.common.settings import load_settings

    return load_settings().home


def tracking_uri(home: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the SQLite store ``<home>/mlflow.db`` (created on use)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = Path(home).expanduser() if home is not None else _home()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


def metric_key(*parts: str) -> str:
    """An MLflow-safe key from ``parts`` joined by ``.`` (MLflow allows ``A-Za-z0-9_-. /``).

    >>> metric_key("selection", "selection_dev.csv[held-out 20%]", "top1_accuracy")
    'selection.selection_dev.csv_held-out 20__.top1_accuracy'
    """
    return ".".join(_KEY_BAD.sub("_", p) for p in parts if p)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys; lists and other values as JSON (strings stay as they are).

    >>> flatten({"policy": "slo", "load": {"rates": [1, 2], "seed": 0}})
    {'policy': 'slo', 'load.rates': '[1, 2]', 'load.seed': '0'}
    """
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif value is None:
            continue
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text if len(text) <= PARAM_MAX else text[: PARAM_MAX - 3] + "..."
    return out


def git_info(root: str | Path | None = None) -> dict[str, str]:
    """``git_commit`` (full hash, or "unknown" outside a checkout) and ``git_dirty`` of ``root``."""
    cwd = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit or "unknown", "git_dirty": str(bool(status)).lower()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> str:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "none"
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
    return ", ".join(names) if names else "none"


@functools.cache
def machine_info() -> dict[str, str]:
    """The machine a benchmark ran on: platform, CPU, memory, GPUs, Python and key package versions
    (read once per process: every run and child run logs it; callers copy the dict)."""
    import importlib.metadata

    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        memory = f"{mem:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        memory = "unknown"
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": str(os.cpu_count() or 0),
        "memory": memory,
        "gpus": _gpus(),
        "python": platform.python_version(),
    }
    for dist in ("sage-prefect", "prefect", "mlflow", "torch", "transformers", "openai"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {f"machine.{k}": v for k, v in info.items()}


def _prefect_tags() -> dict[str, str]:
    try:
        from prefect.context import FlowRunContext
    except ImportError:  # pragma: no cover - prefect is a dependency
        return {}
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return {}
    return {"prefect.flow_run_id": str(ctx.flow_run.id), "prefect.flow_run_name": str(ctx.flow_run.name)}


def _client(uri: str) -> MlflowClient:
    _quiet_mlflow()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(client: MlflowClient, name: str, uri: str, home: Path | None = None) -> str:
    """The id of experiment ``name``, created (with artifacts under the project home for a local
    store) when missing."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return str(found.experiment_id)
    location = None
    if _is_local(uri):
        root = (home or _home()) / "mlartifacts" / metric_key(name).replace(" ", "_").replace("/", "_")
        root.mkdir(parents=True, exist_ok=True)
        location = root.resolve().as_uri()
    return str(client.create_experiment(name, artifact_location=location))


class BenchmarkRun:
    """One MLflow run of a benchmark (use `benchmark_run` to open one)."""

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str, experiment: str) -> None:
        self.client, self.run_id, self.experiment_id, self.experiment = (
            client,
            run_id,
            experiment_id,
            experiment,
        )

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Parameters (nested dicts flattened to dotted keys; ``None`` values left out)."""
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, v) for k, v in flat.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float | int | None], step: int | None = None) -> None:
        """Numeric metrics (keys made MLflow-safe; ``None`` left out; NaN kept as NaN), at ``step``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            if value is None or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            items.append(Metric(metric_key(key), float(value), now, step or 0))
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value if isinstance(value, str) else json.dumps(value))

    def set_headline(self, metrics: Sequence[str]) -> None:
        """The metrics `runs_table` shows for this run when no ``metrics`` are asked for."""
        self.set_tags({HEADLINE_TAG: ",".join(metric_key(m) for m in metrics)})

    def log_json(self, obj: Any, artifact_file: str) -> None:
        """``obj`` as a JSON artifact (written to a temp file first: large documents are fine)."""
        with tempfile.TemporaryDirectory(prefix="sage-mlflow-") as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(json.dumps(obj, indent=1, default=str, allow_nan=True), encoding="utf-8")
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(self.run_id, str(path), None if parent == "." else parent)

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        """A matplotlib figure as a PNG artifact."""
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    @contextmanager
    def child(self, run_name: str, params: Mapping[str, Any] | None = None) -> Iterator[BenchmarkRun]:
        """A nested run (one policy, one selector ...) under this one, in the same experiment."""
        context = {**(params or {}), **git_info(), **machine_info()}  # each run compares on its own
        with _open_run(
            self.client, self.experiment, self.experiment_id, run_name, context, self.run_id
        ) as run:
            yield run

    @property
    def artifact_uri(self) -> str:
        return str(self.client.get_run(self.run_id).info.artifact_uri)


@contextmanager
def _open_run(
    client: MlflowClient,
    experiment: str,
    exp_id: str,
    run_name: str | None,
    params: Mapping[str, Any] | None,
    parent: str | None,
) -> Iterator[BenchmarkRun]:
    tags = {"sage.benchmark": experiment, **_prefect_tags()}
    if parent:
        tags["mlflow.parentRunId"] = parent
    info = client.create_run(exp_id, run_name=run_name, tags=tags)
    run = BenchmarkRun(client, info.info.run_id, exp_id, experiment)
    try:
        if params:
            run.log_params(params)
        yield run
    except BaseException:
        client.set_terminated(run.run_id, status="FAILED")
        raise
    client.set_terminated(run.run_id, status="FINISHED")


@contextmanager
def benchmark_run(
    experiment: str,
    params: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    uri: str | None = None,
    home: str | Path | None = None,
) -> Iterator[BenchmarkRun]:
    """Open an MLflow run in experiment ``experiment`` (created when missing) that logs ``params``,
    the git commit and the machine; it ends FINISHED, or FAILED when the block raises."""
    if not experiment.strip():
        raise ConfigError("benchmark_run: the experiment name is empty", field="experiment")
    home_path = Path(home).expanduser() if home is not None else None
    uri = uri or tracking_uri(home_path)
    client = _client(uri)
    exp_id = experiment_id(client, experiment, uri, home_path)
    context = {**git_info(), **machine_info()}
    with _open_run(client, experiment, exp_id, run_name, {**(params or {}), **context}, None) as run:
        yield run


# -- comparison -------------------------------------------------------------------------------------


def _search(experiment: str, uri: str, max_runs: int, filter_string: str) -> pd.DataFrame:
    _quiet_mlflow()
    import mlflow

    # mlflow.search_runs reads the global tracking URI (mirrored in MLFLOW_TRACKING_URI): set it
    # for the call, then put back what was there, so tracking_uri() keeps following the settings.
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        if mlflow.get_experiment_by_name(experiment) is None:
            names = ", ".join(sorted(e.name for e in mlflow.search_experiments())) or "none"
            raise ConfigError(
                f"no MLflow experiment {experiment!r} in {uri} (experiments: {names})", field="experiment"
            )
        df = mlflow.search_runs(
            experiment_names=[experiment],
            filter_string=filter_string,
            max_results=max_runs,
            order_by=["attributes.start_time DESC"],
        )
    finally:
        mlflow.set_tracking_uri(previous)  # None unsets it (mlflow >= 2)
    assert not isinstance(df, list)
    return df


def runs_table(
    experiment: str,
    metrics: Sequence[str] | None = None,
    params: Sequence[str] | None = None,
    max_runs: int = 20,
    filter_string: str = "",
    uri: str | None = None,
    finished_only: bool = True,
) -> pd.DataFrame:
    """The runs of ``experiment`` side by side (newest first), from ``mlflow.search_runs``.

    Columns: ``run_id`` (8 characters), ``run``, ``started``, then the parameters (default: those
    that differ between the runs shown, machine and commit details left out unless asked for),
    then the metrics (default: the union of the runs' headline metrics; a metric name may be a
    prefix ending in ``*`` to take every metric under it). Runs that have none of the metrics
    are dropped (a parent run that only holds plots, for instance).
    """
    import pandas as pd

    uri = uri or tracking_uri()
    query = filter_string
    if finished_only:
        query = (
            f"{filter_string} and attributes.status = 'FINISHED'"
            if filter_string
            else "attributes.status = 'FINISHED'"
        )
    df = _search(experiment, uri, max_runs, query)
    if df.empty:
        return pd.DataFrame(columns=["run_id", "run", "started"])
    metric_cols = [c for c in df.columns if c.startswith("metrics.")]
    if metrics:
        chosen: list[str] = []
        for m in metrics:
            if m.endswith("*"):
                chosen += [c[8:] for c in metric_cols if c[8:].startswith(m[:-1]) and c[8:] not in chosen]
            elif f"metrics.{metric_key(m)}" in df.columns:
                chosen.append(metric_key(m))
            else:
                known = ", ".join(sorted(c[8:] for c in metric_cols)[:40])
                raise ConfigError(
                    f"no metric {m!r} in the runs of experiment {experiment!r} (metrics: {known})",
                    field="metric",
                )
    else:
        chosen = []
        tag_col = f"tags.{HEADLINE_TAG}"
        for value in df[tag_col].dropna() if tag_col in df.columns else []:
            chosen += [m for m in str(value).split(",") if m and m not in chosen]
        chosen = [m for m in chosen if f"metrics.{m}" in df.columns] or [c[8:] for c in metric_cols][:8]
    df = df[df[[f"metrics.{m}" for m in chosen]].notna().any(axis=1).to_numpy()].reset_index(drop=True)
    param_cols = [c for c in df.columns if c.startswith("params.")]
    if params:
        wanted = [f"params.{p}" for p in params]
        missing = [w[7:] for w in wanted if w not in df.columns]
        if missing:
            raise ConfigError(f"no parameter {missing[0]!r} in experiment {experiment!r}", field="param")
    else:
        skip = ("params.machine.", "params.git_")
        wanted = [
            c
            for c in param_cols
            if not c.startswith(skip) and df[c].notna().any() and df[c].astype(str).nunique(dropna=False) > 1
        ]
    out = pd.DataFrame(
        {
            "run_id": df["run_id"].str[:8],
            "run": df.get("tags.mlflow.runName", pd.Series([""] * len(df))).fillna(""),
            "started": pd.to_datetime(df["start_time"]).dt.strftime("%Y-%m-%d %H:%M:%S"),
        }
    )
    for col in wanted:
        out[col[7:]] = df[col]
    for m in chosen:
        out[m] = df[f"metrics.{m}"]
    return out


def publish_table(table: pd.DataFrame, key: str, description: str = "") -> str | None:
    """Publish ``table`` as a Prefect table artifact on the current flow run (None outside a flow run)."""
    from prefect.artifacts import create_table_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return None
    clean = re.sub(r"[^a-z0-9-]+", "-", key.lower()).strip("-") or "benchmark"

    def cell(value: Any) -> Any:
        if isinstance(value, float):
            return None if math.isnan(value) else round(value, 6)
        return value

    rows = [{str(k): cell(v) for k, v in row.items()} for row in table.to_dict(orient="records")]
    artifact = create_table_artifact(table=rows, key=clean, description=description)
    return str(artifact)
