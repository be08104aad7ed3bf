"""The ``vllm`` extra, its constraints file and the in-process vLLM engine, checked without vLLM.

vLLM cannot be installed here (CUDA wheels, no GPU), so nothing below runs vLLM. The first tests
check the packaging facts docs/vllm.md rests on (pins, the extra, which base pins block a shared
environment); the engine tests use a stand-in ``vllm`` module shaped like vLLM 0.22.1's API as read
from its source: they check this project's mapping (deltas, token counts, aborts, errors,
response_format, refusals), not that vLLM really behaves so.
"""

from __future__ import annotations

import asyncio
import enum
import importlib.util
import re
import sys
import tomllib
import types
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from sage_prefect.controlplane.engines.base import EngineError, GenerationRequest, RequestFailed, TokenEvent
from sage_prefect.controlplane.structured import InvalidRequest

ROOT = Path(__file__).resolve().parents[1]

# vllm 0.22.1's own requirements on packages this project also pins (its wheel's METADATA, as
# `pip install --dry-run --report` returned it; docs/vllm.md lists the run)
VLLM_0_22_1_REQUIRES = [
    "torch==2.11.0",
    "torchvision==0.26.0",
    "torchaudio==2.11.0",
    "llguidance<1.8.0,>=1.7.0",
    "transformers!=5.0.*,!=5.1.*,!=5.2.*,!=5.3.*,!=5.4.*,!=5.5.0,>=4.56.0",
    "tokenizers>=0.21.1",
    "fastapi[standard]>=0.115.0",
    "aiohttp>=3.13.3",
    "openai>=2.0.0",
    "pydantic>=2.12.0",
    "prometheus_client>=0.18.0",
    "gguf>=0.17.0",
]
# what pip's resolver chose for the whole project (test extra included) + vllm==0.22.1 under
# constraints-vllm.txt, with the base pins relaxed as docs/vllm.md proposes
RESOLVED = {
    "vllm": "0.22.1",
    "torch": "2.11.0",
    "torchvision": "0.26.0",
    "torchaudio": "2.11.0",
    "llguidance": "1.7.6",
    "transformers": "5.24.0",
    "tokenizers": "0.23.3",
    "prefect": "3.8.8",
    "fastapi": "0.150.0",
    "sqlalchemy": "2.0.58",
    "starlette": "1.10.0",
    "pydantic": "2.14.4",
    "openai": "3.57.0",
    "aiohttp": "3.14.5",
    "sentence-transformers": "6.3.0",
    "huggingface-hub": "2.4.0",
    "accelerate": "1.16.0",
    "gguf": "0.19.0",
    "lancedb": "0.40.0",
    "mlflow": "3.17.2",
    "prometheus-client": "0.26.0",
    "langchain-openai": "1.7.3",
    "langchain-core": "1.7.2",
    "pytest-xdist": "3.8.0",
}
# the pins constraints-vllm.txt sets differently from constraints.txt (vLLM 0.22.1's)
VLLM_PINS = {"torch", "llguidance"}


def _requirements(path: Path) -> dict[str, Requirement]:
    reqs: dict[str, Requirement] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)  # raises on anything pip would not parse either
            name = canonicalize_name(req.name)
            assert name not in reqs, f"{path.name}: {req.name} appears twice"
            reqs[name] = req
    return reqs


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _by_name(lines: list[str]) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


def _admits(req: Requirement, version: str) -> bool:
    return req.specifier.contains(Version(version), prereleases=True)


# ---------------------------------------------------------------------------- packaging facts


def test_the_constraints_file_pins_vllm_and_its_torch_not_the_cpu_build() -> None:
    pins = _requirements(ROOT / "constraints-vllm.txt")
    assert str(pins["vllm"].specifier) == "==0.22.1"
    assert str(pins["torch"].specifier) == "==2.11.0"
    assert not _admits(pins["torch"], "2.13.0")
    lines = [
        line.split("#", 1)[0].replace(" ", "")
        for line in (ROOT / "constraints-vllm.txt").read_text().splitlines()
    ]
    assert "torch==2.13.0" not in lines


def test_the_constraints_file_keeps_every_other_pin_of_constraints_txt() -> None:
    base = _requirements(ROOT / "constraints.txt")
    gpu = _requirements(ROOT / "constraints-vllm.txt")
    drift = {
        name: (str(req), str(gpu[name]) if name in gpu else None)
        for name, req in base.items()
        if name not in VLLM_PINS and (name not in gpu or str(gpu[name]) != str(req))
    }
    assert not drift, f"constraints-vllm.txt differs from constraints.txt: {drift}"


def test_the_vllm_extra_matches_the_constraints_and_the_engine() -> None:
    from sage_prefect.controlplane.engines.vllm_engine import VLLM_VERSION

    extra = _by_name(_pyproject()["project"]["optional-dependencies"]["vllm"])
    assert list(extra) == ["vllm"]
    assert str(extra["vllm"].specifier) == f"=={VLLM_VERSION}"
    assert str(_requirements(ROOT / "constraints-vllm.txt")["vllm"].specifier) == f"=={VLLM_VERSION}"


def test_the_resolved_set_meets_vllm_and_the_gpu_constraints() -> None:
    vllm_reqs = _by_name(VLLM_0_22_1_REQUIRES)
    gpu = _requirements(ROOT / "constraints-vllm.txt")
    for name, version in RESOLVED.items():
        for source, reqs in (("vllm 0.22.1", vllm_reqs), ("constraints-vllm.txt", gpu)):
            if name in reqs:
                assert _admits(reqs[name], version), f"{source}: {reqs[name]} excludes {name} {version}"
    # every package both vllm and the GPU constraints name has a version they share
    for name in set(vllm_reqs) & set(gpu):
        assert name in RESOLVED, f"{name}: no resolved version recorded"


def test_the_base_dependencies_admit_the_vllm_set() -> None:
    """pyproject.toml's own requirements admit every version of the resolved vLLM set (a base
    pin cannot be relaxed by an extra: `torch==2.13.0` there made the extra uninstallable)."""
    base = _by_name(_pyproject()["project"]["dependencies"])
    excluded = {
        name: str(base[name])
        for name, version in RESOLVED.items()
        if name in base and not _admits(base[name], version)
    }
    assert not excluded, f"base pins exclude the vLLM set: {excluded} (docs/vllm.md)"


def test_engine_vllm_is_an_llm_engine_of_the_config() -> None:
    from pydantic import ValidationError

    from sage_prefect.controlplane.config import ModelConfig

    ModelConfig(
        name="llama", kind="llm", engine="vllm", params={"model": "meta-llama/Meta-Llama-3-8B-Instruct"}
    )
    with pytest.raises(ValidationError, match="engine 'vllm' serves kind 'llm'"):
        ModelConfig(name="e5", kind="embedding", engine="vllm")


# ---------------------------------------------------------------------------- the engine without vLLM


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_without_vllm_the_engine_names_the_install_command() -> None:
    from sage_prefect.controlplane.engines.vllm_engine import VLLMEngine

    with pytest.raises(ImportError, match=re.escape("pip install -c constraints-vllm.txt -e '.[vllm]'")):
        VLLMEngine("Qwen/Qwen2.5-0.5B-Instruct")
    # and so does a config's `engine: vllm` (the gateway's engine factory)
    from sage_prefect.controlplane.config import ModelConfig
    from sage_prefect.controlplane.service import build_engine

    model = ModelConfig(
        name="qwen", kind="llm", engine="vllm", params={"model": "Qwen/Qwen2.5-0.5B-Instruct"}
    )
    with pytest.raises(ImportError, match=re.escape("-e '.[vllm]'")):
        build_engine(model, 0)


# ---------------------------------------------------------------------------- a stand-in for vLLM 0.22.1


class _Tokenizer:
    """One token per character; BOS is "^" (id 1), added unless asked not to."""

    bos_token = "^"
    chat_template = "{{ messages }}"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [2 + ord(c) % 50 for c in text]

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tokenize: bool, add_generation_prompt: bool
    ) -> str:
        assert tokenize is False and add_generation_prompt is True
        return "^" + "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class _Params:
    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("temperature", 1.0) < 0:
            raise ValueError("temperature must be non-negative")
        self.kwargs = kwargs


class _Structured:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


class _Kind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


class _EngineDead(Exception):
    pass


class _EngineGenerate(Exception):
    pass


class _AsyncLLM:
    def __init__(self, args: types.SimpleNamespace) -> None:
        self.args = args
        self.model_config = types.SimpleNamespace(max_model_len=args.max_model_len or 64)
        self.vllm_config = types.SimpleNamespace(
            scheduler_config=types.SimpleNamespace(max_num_seqs=args.max_num_seqs or 8)
        )
        self.script: list[tuple[str, int, str | None]] = [("Hel", 2, None), ("lo", 1, None), ("!", 1, "stop")]
        self.error: Exception | None = None
        self.calls: list[tuple[Any, Any, str, int]] = []
        self.aborted: list[str] = []
        self.shut_down = False

    def get_tokenizer(self) -> _Tokenizer:
        return _Tokenizer()

    async def generate(self, prompt: Any, params: Any, request_id: str, *, priority: int = 0) -> Any:
        self.calls.append((prompt, params, request_id, priority))
        if self.error is not None:
            raise self.error
        try:
            for text, n, finish in self.script:
                await asyncio.sleep(0)
                choice = types.SimpleNamespace(text=text, token_ids=list(range(n)), finish_reason=finish)
                yield types.SimpleNamespace(outputs=[choice], finished=finish is not None)
        except (GeneratorExit, asyncio.CancelledError):
            self.aborted.append(request_id)
            raise

    def shutdown(self) -> None:
        self.shut_down = True


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    engines: list[_AsyncLLM] = []

    def from_engine_args(args: types.SimpleNamespace) -> _AsyncLLM:
        engines.append(_AsyncLLM(args))
        return engines[-1]

    vllm = types.ModuleType("vllm")
    vllm.__version__ = "0.22.1"  # type: ignore[attr-defined]
    vllm.AsyncEngineArgs = lambda **kwargs: types.SimpleNamespace(**kwargs)  # type: ignore[attr-defined]
    vllm.AsyncLLMEngine = types.SimpleNamespace(from_engine_args=from_engine_args)  # type: ignore[attr-defined]
    vllm.SamplingParams = _Params  # type: ignore[attr-defined]
    vllm.engines = engines  # type: ignore[attr-defined]
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.RequestOutputKind = _Kind  # type: ignore[attr-defined]
    sampling.StructuredOutputsParams = _Structured  # type: ignore[attr-defined]
    exceptions = types.ModuleType("vllm.v1.engine.exceptions")
    exceptions.EngineDeadError = _EngineDead  # type: ignore[attr-defined]
    exceptions.EngineGenerateError = _EngineGenerate  # type: ignore[attr-defined]
    modules = {
        "vllm": vllm,
        "vllm.sampling_params": sampling,
        "vllm.v1": types.ModuleType("vllm.v1"),
        "vllm.v1.engine": types.ModuleType("vllm.v1.engine"),
        "vllm.v1.engine.exceptions": exceptions,
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return vllm


def _engine(fake_vllm: types.ModuleType, **kwargs: Any) -> tuple[Any, _AsyncLLM]:
    from sage_prefect.controlplane.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine("org/model", **kwargs)
    return engine, fake_vllm.engines[-1]


def _request(prompt: str = "hi", **kwargs: Any) -> GenerationRequest:
    return GenerationRequest(id="r1", prompt=prompt, max_tokens=kwargs.pop("max_tokens", 8), **kwargs)


async def _collect(engine: Any, request: GenerationRequest) -> list[TokenEvent]:
    return [event async for event in engine.generate(request)]


def test_engine_args_limits_and_priority_reach_vllm(fake_vllm: types.ModuleType) -> None:
    engine, llm = _engine(
        fake_vllm,
        max_context_tokens=32,
        slots=4,
        scheduling_policy="priority",
        engine_args={"enforce_eager": True},
    )
    assert (engine.max_context_tokens, engine.slots) == (32, 4)
    assert llm.args.max_model_len == 32 and llm.args.max_num_seqs == 4 and llm.args.enforce_eager is True
    assert llm.args.scheduling_policy == "priority" and llm.args.model == "org/model"
    asyncio.run(_collect(engine, _request(priority=-3)))
    assert llm.calls[0][3] == -3
    with pytest.raises(ValueError, match="engine_args repeats"):
        _engine(fake_vllm, engine_args={"max_model_len": 8})


def test_deltas_join_and_the_last_event_has_the_counts(fake_vllm: types.ModuleType) -> None:
    engine, llm = _engine(fake_vllm)
    request = _request("hi", temperature=0.0, stop=["\n"], seed=7)
    engine.prepare(request)
    assert request.prompt_ids == [1, 2 + ord("h") % 50, 2 + ord("i") % 50]
    events = asyncio.run(_collect(engine, request))
    assert "".join(e.text for e in events) == "Hello!"
    assert [e.finish_reason for e in events] == [None, None, None, "stop"]
    assert (events[-1].prompt_tokens, events[-1].completion_tokens) == (3, 4)
    prompt, params, request_id, _ = llm.calls[0]
    assert prompt == {"prompt_token_ids": request.prompt_ids}
    assert params.kwargs["output_kind"] is _Kind.DELTA
    assert params.kwargs["stop"] == ["\n"] and params.kwargs["seed"] == 7 and params.kwargs["max_tokens"] == 8
    assert request_id.startswith("r1-") and llm.aborted == []


def test_closing_the_stream_aborts_the_request_in_vllm(fake_vllm: types.ModuleType) -> None:
    engine, llm = _engine(fake_vllm)

    async def first_then_close() -> TokenEvent:
        stream = engine.generate(_request())
        event = await stream.__anext__()
        await stream.aclose()
        return event

    assert asyncio.run(first_then_close()).text == "Hel"
    assert llm.aborted == [llm.calls[0][2]]


def test_a_chat_prompt_that_starts_with_bos_gets_no_second_one(fake_vllm: types.ModuleType) -> None:
    engine, _ = _engine(fake_vllm)
    prompt = engine.render_chat([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert prompt == "^<user>hi<assistant>"
    assert engine.count_tokens(prompt) == len(prompt)  # "^" encoded as text, no BOS added
    assert engine.count_tokens("hi") == 3


def test_response_formats_map_as_vllms_server_maps_them(fake_vllm: types.ModuleType) -> None:
    engine, _ = _engine(fake_vllm)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    request = _request(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )
    engine.prepare(request)
    assert request.prepared.kwargs["structured_outputs"].kwargs == {"json": schema}
    request = _request(response_format={"type": "json_object"})
    engine.prepare(request)
    assert request.prepared.kwargs["structured_outputs"].kwargs == {"json_object": True}
    request = _request(response_format={"type": "text"})
    engine.prepare(request)
    assert "structured_outputs" not in request.prepared.kwargs


def test_tool_calls_are_refused_naming_tools(fake_vllm: types.ModuleType) -> None:
    engine, llm = _engine(fake_vllm)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(InvalidRequest, match="not supported by the in-process 'vllm' engine") as info:
        engine.prepare(_request(tools=tools, tool_choice="auto"))
    assert info.value.param == "tools"
    with pytest.raises(InvalidRequest):
        engine.render_chat([{"role": "user", "content": "hi"}], tools)
    engine.prepare(_request(tools=tools, tool_choice="none"))  # tools left out: plain text is fine
    assert llm.calls == []


def test_requests_vllm_would_reject_are_400s_before_queueing(fake_vllm: types.ModuleType) -> None:
    engine, llm = _engine(fake_vllm, max_context_tokens=10)
    with pytest.raises(InvalidRequest, match="more than the model's context of 10") as info:
        engine.prepare(_request("abcdef", max_tokens=4))  # 7 prompt tokens + 4
    assert info.value.param == "max_tokens"
    with pytest.raises(ValueError, match="temperature"):
        engine.prepare(_request(temperature=-1.0, max_tokens=2))
    with pytest.raises(InvalidRequest, match="logit_bias"):
        engine.prepare(_request(extra={"logit_bias": {"not-a-token": 1}}, max_tokens=2))
    request = _request(extra={"presence_penalty": 0.5, "logit_bias": {"5": 300}, "user": "u"}, max_tokens=2)
    engine.prepare(request)
    assert request.prepared.kwargs["presence_penalty"] == 0.5
    assert request.prepared.kwargs["logit_bias"] == {5: 100.0}
    assert llm.calls == []


def test_vllm_errors_map_to_the_request_or_the_replica(fake_vllm: types.ModuleType) -> None:
    engine, llm = _engine(fake_vllm)
    llm.error = ValueError("schema not supported")
    with pytest.raises(RequestFailed, match="schema not supported") as info:
        asyncio.run(_collect(engine, _request()))
    assert info.value.status == 400
    llm.error = _EngineDead("gone")
    with pytest.raises(EngineError, match="gone"):
        asyncio.run(_collect(engine, _request()))
    llm.error = None
    llm.script = [("x", 1, "abort")]
    with pytest.raises(EngineError, match="'abort'"):
        asyncio.run(_collect(engine, _request()))
    asyncio.run(engine.aclose())
    assert llm.shut_down
    with pytest.raises(EngineError, match="closed"):
        asyncio.run(_collect(engine, _request()))
