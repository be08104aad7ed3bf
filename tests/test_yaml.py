"""Pipelines written as YAML: running them, and errors that name file, line and field."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from sage_prefect import ConfigError, DaskEnvironment, UnknownOperatorError
from sage_prefect.kernel.yaml_spec import load_pipeline

GOOD = """\
name: yaml-demo
batch_size: 20
source:
  class: kernel_ops.Counter
  config: {n: 50}
operators:
  - map: kernel_ops.Upper
    retries: 1
  - map: kernel_ops.WhereAmI
    config: {tag: gpu}
    resources: {GPU: 1}
    parallelism: 1
  - filter: sage_prefect.examples.demo.even_id
  - sink: CollectSink
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("prefect_api", "sage_home")
def test_yaml_pipeline_runs(tmp_path: Path, fake_gpu_cluster: Any) -> None:
    env = DaskEnvironment(
        "yaml-demo", address=fake_gpu_cluster.scheduler_address, batch_size=20, progress=False
    )
    load_pipeline(_write(tmp_path, GOOD), env=env)
    ops = env.plan.operators()
    assert [op.name for op in ops] == ["Upper", "WhereAmI", "even_id", "CollectSink"]
    assert ops[0].retries == 1 and ops[1].resources == {"GPU": 1} and ops[1].parallelism == 1
    rows = env.submit().to_pylist()
    assert [r["id"] for r in rows] == list(range(0, 50, 2))
    assert {r["worker_gpu"] for r in rows} == {"gpu-0"} and rows[0]["text"] == "DOC 0"


def test_yaml_builds_a_local_environment_with_its_options(tmp_path: Path) -> None:
    env = load_pipeline(
        _write(tmp_path, GOOD.replace("batch_size: 20", "batch_size: 7\nallow_cpu_fallback: false"))
    )
    assert env.name == "yaml-demo" and env.settings.batch_size == 7 and env.allow_cpu_fallback is False


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ("name: x\nsource: [\n", ConfigError, r"pipeline.yaml:\d+: invalid YAML"),
        ("", ConfigError, r"pipeline.yaml:1: the pipeline file is empty"),
        (
            GOOD.replace("parallelism: 1", "parallelism: two"),
            ConfigError,
            r"pipeline.yaml:12: field 'operators.1.parallelism'",
        ),
        (
            GOOD.replace("    retries: 1", "    retrys: 1"),
            ConfigError,
            r"pipeline.yaml:8: field 'operators.0.retrys'",
        ),
        (
            GOOD.replace("kernel_ops.Upper", "kernel_ops.Lower"),
            UnknownOperatorError,
            r"pipeline.yaml:7: field 'operators.0.map': module 'kernel_ops' has no attribute 'Lower'",
        ),
        (
            GOOD.replace("kernel_ops.Counter", "no_such_module.Counter"),
            UnknownOperatorError,
            r"pipeline.yaml:4: field 'source.class': cannot import module 'no_such_module'",
        ),
        (
            GOOD.replace("  - sink: CollectSink", "  - sink: CollectSink\n    map: kernel_ops.Upper"),
            ConfigError,
            r"field 'operators.3': .*exactly one operator kind",
        ),
        (GOOD.replace("operators:", "operators: []\nx:"), ConfigError, r"field"),
    ],
)
def test_malformed_files_name_file_line_and_field(tmp_path: Path, text: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        load_pipeline(_write(tmp_path, text))


def test_jsonl_source_errors_name_the_data_line(tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text('{"id": 1, "text": "a"}\n{"id": 2,\n')
    pipeline = _write(tmp_path, "name: j\nsource:\n  path: docs.jsonl\noperators:\n  - sink: CollectSink\n")
    env = load_pipeline(pipeline)
    assert env.plan.source is not None
    with pytest.raises(ConfigError, match=r"docs.jsonl:2: invalid JSON"):
        list(env.plan.source.data)
    with pytest.raises(ConfigError, match=r"field 'source.path': no such file"):
        load_pipeline(
            _write(tmp_path, "name: j\nsource:\n  path: nope.jsonl\noperators:\n  - sink: CollectSink\n")
        )
