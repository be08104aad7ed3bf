"""The ``sage-prefect`` command as a user runs it: a subprocess, a real Prefect API, real clusters."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import sigint_as_in_a_terminal

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "sage_prefect.cli.main"]

pytestmark = pytest.mark.timeout(240)


def _env(prefect_api: str, home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(SAGE_HOME=str(home), PREFECT_API_URL=prefect_api, COLUMNS="200")
    return env


def test_run_demo_pipeline_writes_lance_table(prefect_api: str, tmp_path: Path) -> None:
    text = (ROOT / "examples" / "demo.yaml").read_text()
    pipeline = tmp_path / "demo.yaml"
    pipeline.write_text(
        text.replace("count: 10000", "count: 600").replace("batch_size: 2000", "batch_size: 200")
    )
    result = subprocess.run(
        [*CLI, "run", str(pipeline)],
        cwd=tmp_path,
        env=_env(prefect_api, tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "600 in 3 partitions" in result.stdout and "300 rows" in result.stdout

    import lancedb

    table = lancedb.connect(str(tmp_path / "out" / "lancedb")).open_table("demo_docs").to_arrow()
    assert table.num_rows == 300 and len(table["vector"][0]) == 64


def test_run_reports_a_malformed_file_with_its_line(prefect_api: str, tmp_path: Path) -> None:
    pipeline = tmp_path / "bad.yaml"
    pipeline.write_text(
        "name: bad\nsource:\n  class: sage_prefect.examples.demo.SyntheticDocs\noperators:\n  - mapp: x\n"
    )
    result = subprocess.run(
        [*CLI, "run", str(pipeline)], env=_env(prefect_api, tmp_path / "home"), capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "bad.yaml:5" in result.stderr and "operators.0.mapp" in result.stderr


def test_doctor_reports_prefect_and_gpus(prefect_api: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "doctor"],
        env=_env(prefect_api, tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Prefect API" in result.stdout and "GPUs" in result.stdout and prefect_api in result.stdout


def test_cluster_up_serves_labelled_workers_until_interrupted(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [*CLI, "cluster", "up", "--port", str(port), "--cpu-workers", "1", "--gpu-workers", "1"],
        env={**os.environ, "SAGE_HOME": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=sigint_as_in_a_terminal,
    )
    try:
        deadline = time.monotonic() + 90
        assert proc.stdout is not None
        line = ""
        while "Dask scheduler at" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, "cluster up did not come up"
            line = proc.stdout.readline()
        from distributed import Client

        with Client(f"tcp://127.0.0.1:{port}", timeout=30) as client:
            info = client.scheduler_info(n_workers=-1)["workers"].values()
            assert sorted(w["name"] for w in info) == ["cpu-0", "gpu-0"]
            assert {w["name"]: w["resources"] for w in info}["gpu-0"] == {"GPU": 1}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 0


def test_flow_run_indexes_and_answers_then_says_where_to_look(
    prefect_api: str, controlplane: str, tmp_path: Path
) -> None:
    """The README's first quickstart command (on the session's control plane instead of an embedded one)."""
    env = _env(prefect_api, tmp_path / "home")
    env.update(SAGE_CONTROLPLANE_URL=controlplane, SAGE_N_CPU_WORKERS="1")
    result = subprocess.run(
        [*CLI, "flow", "run", "rag_index", "rag_qa", "-p", "top_k=2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lance = tmp_path / "home" / "lancedb"
    assert "Where to look" in result.stdout and str(lance) in result.stdout
    assert "distributed.worker" not in result.stdout + result.stderr  # Dask's INFO logs stay quiet

    import lancedb

    answers = lancedb.connect(str(lance)).open_table("answers").to_arrow()
    assert answers.num_rows == 16 and all(len(ids) == 2 for ids in answers["retrieved_ids"].to_pylist())


def test_flow_run_names_a_parameter_no_flow_takes(tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "flow", "run", "rag_qa", "-p", "topk=2"],
        cwd=ROOT,
        env={**os.environ, "SAGE_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "parameter 'topk' is not a parameter of rag_qa" in result.stderr


def test_flow_list_shows_the_three_flows(tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "flow", "list"],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for name in ("rag_index", "rag_qa", "agent_tools"):
        assert name in result.stdout
