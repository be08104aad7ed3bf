"""deployments/prefect.yaml against a real `prefect server start`: deploy, trigger, a worker runs it.

The server (SQLite) and a process worker run as subprocesses on 127.0.0.1; the run is triggered
through the API and checked by its output table and by the task runs the API recorded.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import sigint_as_in_a_terminal

from sage_prefect.controlplane.server import free_port
from sage_prefect.examples import DOCS_DIR

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(420)


def _stop(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Send ``sig`` to the process group, then SIGKILL it if it has not exited in 30 s."""
    os.killpg(process.pid, sig)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """``prefect server start`` on a free loopback port with its own home; yields (api url, env)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prefect server did not start in 120 s"
            time.sleep(0.5)
        yield url, {**env, "PREFECT_API_URL": url}
    finally:
        _stop(server, signal.SIGTERM)
        log.close()


def test_deploy_trigger_and_run_rag_index(
    prefect_server: tuple[str, dict[str, str]], controlplane: str, tmp_path: Path
) -> None:
    url, env = prefect_server
    env.update(
        SAGE_HOME=str(tmp_path / "home"),
        SAGE_CONTROLPLANE_URL=controlplane,
        SAGE_N_CPU_WORKERS="1",
        SAGE_N_GPU_WORKERS="0",
        PWD=str(ROOT),
    )
    deployed = subprocess.run(
        [sys.executable, "-m", "sage_prefect.cli.main", "deploy"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    docs = tmp_path / "docs"
    shutil.copytree(DOCS_DIR, docs)
    lance = tmp_path / "lance"
    worker_log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "sage-process"],
        cwd=tmp_path,  # the deployment's pull step, not the worker's directory, finds flows/
        env=env,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=sigint_as_in_a_terminal,
    )
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            names = {d.name: d for d in client.read_deployments()}
            assert {"rag-index-nightly", "rag-qa", "agent-tools"} <= set(names)
            nightly = names["rag-index-nightly"]
            assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]  # type: ignore[union-attr]
            assert nightly.work_pool_name == "sage-process"

            run = client.create_flow_run_from_deployment(
                nightly.id, parameters={"docs_dir": str(docs), "lance_uri": str(lance), "table": "deployed"}
            )
            deadline = time.monotonic() + 300
            while True:
                state = client.read_flow_run(run.id).state
                if state is not None and state.is_final():
                    break
                assert time.monotonic() < deadline, f"flow run still {state} after 300 s"
                time.sleep(1)
            log_text = (tmp_path / "worker.log").read_text(errors="replace")[-4000:]
            assert state.is_completed(), f"{state}\n{log_text}"

            # Task runs are named "<operator>[p<partition>]" by the kernel.
            task_names = {t.name.split("[")[0] for t in client.read_task_runs()}
            flow_runs = client.read_flow_runs()
    finally:
        _stop(worker, signal.SIGINT)  # the process worker stops on SIGINT, not SIGTERM
        worker_log.close()

    import lancedb

    table = lancedb.connect(str(lance)).open_table("deployed").to_arrow()
    assert table.num_rows > 8 and set(table["doc_id"].to_pylist()) == {p.name for p in docs.glob("*.md")}
    assert {"SkipIndexed", "CharacterChunker", "Embedder", "LanceIndexer"} <= task_names
    # The deployment's run and the pipeline it ran as a subflow.
    assert any(f.parent_task_run_id is not None for f in flow_runs) and any(f.id == run.id for f in flow_runs)


def test_deploy_serve_registers_the_deployments_with_their_schedule(
    prefect_server: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """``sage-prefect deploy --serve``: the same deployments, served from one process (no work pool)."""
    url, env = prefect_server
    env.update(SAGE_HOME=str(tmp_path / "home"))
    log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "sage_prefect.cli.main", "deploy", "--serve", "rag-index-nightly", "rag-qa"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=sigint_as_in_a_terminal,
    )
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while True:
                names = {d.name: d for d in client.read_deployments()}
                if {"rag-index-nightly", "rag-qa"} <= set(names):
                    break
                assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "deploy --serve registered nothing in 120 s"
                time.sleep(1)
            assert "agent-tools" not in names  # only the deployments named on the command line
            nightly = names["rag-index-nightly"]
            assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]  # type: ignore[union-attr]
            assert nightly.work_pool_name is None  # served, not on a work pool
    finally:
        _stop(serve, signal.SIGINT)
        log.close()


def test_deploy_without_a_prefect_api_says_what_to_do(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"))
    result = subprocess.run(
        [sys.executable, "-m", "sage_prefect.cli.main", "deploy"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "deploy needs a Prefect API" in result.stderr and "PREFECT_API_URL" in result.stderr
