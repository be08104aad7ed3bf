"""The control plane as users meet it: a real server in a subprocess, driven by the real
``openai`` client (and raw HTTP for malformed requests)."""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from sage_prefect.controlplane.metrics import sample_sum
from sage_prefect.controlplane.server import Background, start_background

pytestmark = pytest.mark.timeout(300)

EMBED_MODEL = "all-MiniLM-L6-v2"


def write_config(path: Path, **extra: object) -> Path:
    config = {
        "policy": "slo",
        "classes": {
            "interactive": {"ttft_ms": 1000, "e2e_ms": 10000, "max_queue": 256},
            "batch": {"e2e_ms": 600000, "max_queue": 2},
        },
        "batching": {"max_batch_size": 32, "max_wait_ms": 20},
        "limits": {"max_inputs": 8, "max_body_bytes": 65536},
        "models": [{"name": EMBED_MODEL, "kind": "embedding", "engine": "sentence-transformers"}],
        **extra,
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Background]:
    tmp = tmp_path_factory.mktemp("cp")
    with start_background(write_config(tmp / "cp.yaml"), log=tmp / "cp.log") as bg:
        yield bg


@pytest.fixture(scope="module")
def direct() -> object:
    from sage_prefect.controlplane.engines.sentence_transformers import SentenceTransformerEngine

    return SentenceTransformerEngine(EMBED_MODEL)


def client(bg: Background, key: str = "none") -> object:
    import openai

    return openai.OpenAI(base_url=bg.base_url, api_key=key, max_retries=0)


def test_models_and_health(server: Background) -> None:
    models = client(server).models.list()  # type: ignore[attr-defined]
    assert [m.id for m in models.data] == [EMBED_MODEL]
    health = httpx.get(f"{server.url}/health").json()
    assert health == {"status": "ok", "replicas": {f"{EMBED_MODEL}#0": True}}


def test_embeddings_equal_the_engines_direct_output(server: Background, direct: object) -> None:
    texts = ["LanceDB stores vectors", "Prefect runs flows", "Dask places tasks"]
    response = client(server).embeddings.create(model=EMBED_MODEL, input=texts)  # type: ignore[attr-defined]
    expected = direct.embed(texts)  # type: ignore[attr-defined]
    got = [d.embedding for d in sorted(response.data, key=lambda d: d.index)]
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-5)
    assert response.usage.prompt_tokens == sum(direct.count_tokens(texts))  # type: ignore[attr-defined]
    single = client(server).embeddings.create(model=EMBED_MODEL, input="Prefect runs flows")  # type: ignore[attr-defined]
    np.testing.assert_allclose(single.data[0].embedding, expected[1], atol=1e-5)


def test_base64_encoding(server: Background, direct: object) -> None:
    raw = httpx.post(
        f"{server.base_url}/embeddings",
        json={"model": EMBED_MODEL, "input": ["arrow batches"], "encoding_format": "base64"},
    ).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    vector = struct.unpack(f"<{len(packed) // 4}f", packed)
    np.testing.assert_allclose(vector, direct.embed(["arrow batches"])[0], atol=1e-5)  # type: ignore[attr-defined]


def test_truncate_prompt_tokens_keeps_the_last_tokens(server: Background, direct: object) -> None:
    # vLLM's field: -1 cuts to the model's limit, k keeps the last k tokens (specials included)
    words = [f"word{i}" if i % 7 else "alpha" for i in range(400)]
    long_text = " ".join(words)
    api = client(server)
    whole = api.embeddings.create(
        model=EMBED_MODEL, input=[long_text, "short"], extra_body={"truncate_prompt_tokens": -1}
    )  # type: ignore[attr-defined]
    assert whole.usage.prompt_tokens == 256 + direct.count_tokens(["short"])[0]  # type: ignore[attr-defined]
    np.testing.assert_allclose(whole.data[1].embedding, direct.embed(["short"])[0], atol=1e-5)  # type: ignore[attr-defined]
    # whole words of one token each ("alpha", "the", ...): the last 8 words are the last 10 tokens less [CLS] [SEP]
    plain = " ".join(["the", "river", "and", "alpha", "city"] * 40)
    assert direct.count_tokens([plain])[0] == 202  # type: ignore[attr-defined]
    cut = api.embeddings.create(model=EMBED_MODEL, input=plain, extra_body={"truncate_prompt_tokens": 10})  # type: ignore[attr-defined]
    assert cut.usage.prompt_tokens == 10
    tail = " ".join(plain.split()[-8:])
    np.testing.assert_allclose(cut.data[0].embedding, direct.embed([tail])[0], atol=1e-5)  # type: ignore[attr-defined]
    # inputs within k are left alone
    same = api.embeddings.create(
        model=EMBED_MODEL, input="Prefect runs flows", extra_body={"truncate_prompt_tokens": 64}
    )  # type: ignore[attr-defined]
    np.testing.assert_allclose(same.data[0].embedding, direct.embed(["Prefect runs flows"])[0], atol=1e-5)  # type: ignore[attr-defined]


def test_truncation_cuts_inside_words_until_the_text_fits(direct: object) -> None:
    # WordPiece continuations: a cut at "##piece" re-tokenises as a word start, maybe longer
    text = " ".join(["unbelievably", "tokenization", "heterogeneous", "antidisestablishmentarianism"] * 30)
    for keep in (5, 17, 64, 255):
        (cut,) = direct.truncate([text], keep)  # type: ignore[attr-defined]
        assert text.endswith(cut) and cut
        assert direct.count_tokens([cut])[0] <= keep  # type: ignore[attr-defined]


def test_upstream_engine_truncates_by_its_own_token_estimate() -> None:
    from sage_prefect.controlplane.engines.openai_upstream import OpenAIEmbeddingEngine

    engine = OpenAIEmbeddingEngine("http://127.0.0.1:9/v1", model="m", max_input_tokens=16)
    try:
        cut, short = engine.truncate(["abcd" * 30, "abcd"], 16)
        assert (cut, short) == ("abcd" * 16, "abcd")
        assert engine.count_tokens([cut]) == [16]
    finally:
        engine.close()


def _metric(text: str, name: str) -> float:
    return sample_sum(text, name) or 0.0


def test_vllm_queue_depth_is_read_from_its_metrics_page() -> None:
    from sage_prefect.controlplane.engines.openai_upstream import parse_vllm_waiting

    page = (
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{engine="0",model_name="m"} 3.0\n'
        'vllm:num_requests_waiting{engine="1",model_name="m"} 4.0\n'
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 9.0\n'
    )
    assert parse_vllm_waiting(page) == 7
    assert parse_vllm_waiting("# TYPE other gauge\nother 1.0\n") is None  # not vLLM: no queue depth
    assert sample_sum(page, "vllm:num_requests_running", engine="0") == 9.0
    assert sample_sum(page, "vllm:num_requests_waiting", engine="1") == 4.0


def test_concurrent_requests_are_coalesced_into_batches(server: Background) -> None:
    import openai

    before = httpx.get(f"{server.url}/metrics").text

    async def run() -> None:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0) as c:
            await asyncio.gather(
                *(c.embeddings.create(model=EMBED_MODEL, input=f"text number {i}") for i in range(48))
            )

    asyncio.run(run())
    after = httpx.get(f"{server.url}/metrics").text
    batches = _metric(after, "sage_embedding_batch_size_count") - _metric(
        before, "sage_embedding_batch_size_count"
    )
    inputs = _metric(after, "sage_embedding_batch_size_sum") - _metric(
        before, "sage_embedding_batch_size_sum"
    )
    assert inputs == 48
    assert inputs / batches > 1, f"48 concurrent requests ran in {batches:.0f} batches"
    assert "sage_queue_depth" in after and "sage_e2e_request_latency_seconds_bucket" in after


def test_overload_is_answered_with_429_and_retry_after(server: Background) -> None:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(
                *(
                    c.post(
                        f"{server.base_url}/embeddings",
                        json={"model": EMBED_MODEL, "input": [f"bulk text {i} " * 40] * 8},
                        headers={"X-SLO-Class": "batch"},
                    )
                    for i in range(30)
                )
            )

    responses = asyncio.run(run())
    rejected = [r for r in responses if r.status_code == 429]
    assert rejected and any(r.status_code == 200 for r in responses)
    assert int(rejected[0].headers["retry-after"]) >= 1
    error = rejected[0].json()["error"]
    assert error["code"] == "queue_full" and "'batch' queue is full" in error["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200


BAD_REQUESTS = [
    (b"{not json", 400, None, "invalid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    ({"input": "x"}, 400, "model", "'model' is required"),
    ({"model": EMBED_MODEL}, 400, "input", "'input' is required"),
    ({"model": EMBED_MODEL, "input": []}, 400, "input", "empty list"),
    ({"model": EMBED_MODEL, "input": ""}, 400, "input[0]", "is empty"),
    ({"model": EMBED_MODEL, "input": 42}, 400, "input", "string or a list"),
    ({"model": EMBED_MODEL, "input": ["ok", 3]}, 400, "input[1]", "should be a valid string"),
    ({"model": EMBED_MODEL, "input": ["x"] * 9}, 400, "input", "at most 8"),
    ({"model": EMBED_MODEL, "input": "word " * 400}, 400, "input[0]", "tokens; the maximum"),
    ({"model": EMBED_MODEL, "input": "x", "encoding_format": "hex"}, 400, "encoding_format", "float"),
    ({"model": EMBED_MODEL, "input": "x", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens", "-1"),
    ({"model": EMBED_MODEL, "input": "x", "truncate_prompt_tokens": -2}, 400, "truncate_prompt_tokens", "-1"),
    (
        {"model": EMBED_MODEL, "input": "x", "truncate_prompt_tokens": True},
        400,
        "truncate_prompt_tokens",
        "-1",
    ),
    (
        {"model": EMBED_MODEL, "input": "x", "truncate_prompt_tokens": 9999},
        400,
        "truncate_prompt_tokens",
        "limit of 256",
    ),
    ({"model": EMBED_MODEL, "input": "x", "priority": "high"}, 400, "priority", "integer"),
    ({"model": EMBED_MODEL, "input": "x", "slo_class": "gold"}, 400, "slo_class", "unknown SLO class"),
    ({"model": "no-such-model", "input": "x"}, 404, None, "does not exist"),
    ({"model": EMBED_MODEL, "input": "y" * 70000}, 413, None, "exceeds the limit"),
]


@pytest.mark.parametrize(("body", "status", "param", "message"), BAD_REQUESTS)
def test_bad_input_gets_the_openai_error_envelope(
    server: Background, body: object, status: int, param: str | None, message: str
) -> None:
    url = f"{server.base_url}/embeddings"
    if isinstance(body, bytes):
        response = httpx.post(url, content=body, headers={"content-type": "application/json"})
    else:
        response = httpx.post(url, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param and error["type"]


def test_unknown_routes_and_the_sdk_see_the_envelope(server: Background) -> None:
    import openai

    response = httpx.get(f"{server.base_url}/nothing-here")
    assert response.status_code == 404 and "error" in response.json()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(server).embeddings.create(model="missing", input="x")  # type: ignore[attr-defined]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_api_keys_are_required_when_configured(tmp_path: Path) -> None:
    import openai

    keys = tmp_path / "keys.txt"
    keys.write_text("# name key\npipelines s3cret-key\n")
    cfg = write_config(
        tmp_path / "cp.yaml",
        api_keys_file=str(keys),
        keys={"pipelines": {"default_class": "batch", "rate_limit_rps": 2, "burst": 2}},
    )
    with start_background(cfg, log=tmp_path / "cp.log") as bg:
        with pytest.raises(openai.AuthenticationError):
            client(bg, "wrong").models.list()  # type: ignore[attr-defined]
        assert httpx.get(f"{bg.base_url}/models").status_code == 401
        good = client(bg, "s3cret-key")
        assert good.models.list().data  # type: ignore[attr-defined]
        statuses = [
            httpx.get(f"{bg.base_url}/models", headers={"Authorization": "Bearer s3cret-key"}).status_code
            for _ in range(4)
        ]
        assert 429 in statuses  # 2 requests/s with a burst of 2


def test_a_non_loopback_bind_without_keys_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from sage_prefect.controlplane.app import create_app
    from sage_prefect.controlplane.config import load_config
    from sage_prefect.controlplane.service import ServiceError

    monkeypatch.delenv("SAGE_CONTROLPLANE_API_KEYS", raising=False)
    with pytest.raises(ServiceError, match="refusing to bind 0.0.0.0 without API keys"):
        create_app(load_config(host="0.0.0.0"))
    monkeypatch.setenv("SAGE_CONTROLPLANE_API_KEYS", "ops:abc")
    app = create_app(load_config(host="0.0.0.0"))  # keys given: it serves, with 401s (nothing binds here)

    async def call(key: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cp") as c:
            return await c.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": "x"}, headers=headers)

    for key in (None, "wrong"):
        response = asyncio.run(call(key))
        assert response.status_code == 401 and response.json()["error"]["type"], response.text


def test_config_errors_name_file_line_and_field(tmp_path: Path) -> None:
    from sage_prefect.common.errors import ConfigError
    from sage_prefect.controlplane.config import load_config

    bad = tmp_path / "cp.yaml"
    bad.write_text("policy: slo\nmodels:\n  - name: m\n    kind: llm\n    engine: sentence-transformers\n")
    with pytest.raises(ConfigError, match=r"cp.yaml:3: field 'models.0': .*serves kind 'embedding'"):
        load_config(bad)
    bad.write_text("policy: lifo\n")
    with pytest.raises(ConfigError, match=r"cp.yaml:1: .*unknown policy 'lifo'"):
        load_config(bad)


def test_cli_serve(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys
    import time

    from typer.testing import CliRunner

    from sage_prefect.cli.main import app
    from sage_prefect.controlplane.server import free_port

    bad = tmp_path / "bad.yaml"
    bad.write_text("port: -1\n")
    result = CliRunner().invoke(app, ["controlplane", "serve", "--config", str(bad)])
    assert result.exit_code == 1 and "bad.yaml:1: field 'port'" in result.output.replace("\n", "")

    port = free_port()
    exe = shutil.which("sage-prefect", path=str(Path(sys.executable).parent)) or "sage-prefect"
    cmd = [
        exe,
        "controlplane",
        "serve",
        "--config",
        str(write_config(tmp_path / "cp.yaml")),
        "--port",
        str(port),
    ]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            pytest.fail("sage-prefect controlplane serve did not come up")
    finally:
        process.terminate()
        process.wait(20)
