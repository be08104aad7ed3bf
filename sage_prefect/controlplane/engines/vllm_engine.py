"""An in-process vLLM engine: vLLM's ``AsyncLLM`` (``AsyncLLMEngine``) inside the replica's process.

UNTESTED. There is no GPU in development or CI, so this module has never run against a real
vLLM: it was written against vLLM 0.22.1's API, read from that release's source
(``vllm/v1/engine/async_llm.py``, ``vllm/sampling_params.py``, ``vllm/engine/arg_utils.py``), and
only its behaviour without vLLM installed is tested (tests/test_vllm_engine.py). Another vLLM
release may differ; a warning is logged when the installed one is not 0.22.x.

Install on a GPU host: ``pip install -c constraints-vllm.txt -e '.[vllm]'``. That only resolves once
the project's base pins admit vLLM 0.22.1's (``torch==2.11.0``, ``llguidance>=1.7,<1.8``):
docs/vllm.md has the resolver runs and the two-line change. The tested way to use vLLM is its own
server, next to the project: ``engine: command`` with ``vllm serve``, or ``engine: openai``.

How the contract maps onto vLLM 0.22.1
--------------------------------------
* Construction builds ``AsyncEngineArgs`` and ``AsyncLLM.from_engine_args``: it loads the model
  and starts vLLM's engine-core process, blocking (minutes). The service makes engines in a
  worker thread; vLLM starts its asyncio side (output handler, socket reader) lazily on the
  first request, on the serving loop, a start it supports ("call __init__ before the event
  loop"). Use one engine from one event loop.
* ``slots`` is vLLM's ``max_num_seqs`` and ``max_context_tokens`` its ``max_model_len`` (both as
  vLLM resolved them, unless given).
* ``prepare`` (off the event loop) tokenises the prompt with vLLM's tokenizer (no second BOS when
  the rendered chat prompt starts with one, as the local engine does), checks prompt plus
  ``max_tokens`` against ``max_model_len`` and builds the ``SamplingParams`` once, so values vLLM
  rejects are a 400 before the request is queued. ``generate`` sends the token ids
  (``{"prompt_token_ids": ...}``), so usage counts the tokens that ran.
* ``generate`` asks for ``RequestOutputKind.DELTA`` (each output carries only the new text and
  token ids, as vLLM's own streaming server does), forwards ``priority`` (vLLM honours it with
  ``scheduling_policy="priority"``, lower runs first; under ``fcfs`` it is ignored) and ends with
  vLLM's ``finish_reason`` (``stop``/``length``) and the token counts. Stop strings are vLLM's
  (never in the output). ``presence_penalty``, ``frequency_penalty`` and ``logit_bias`` from the
  request's other OpenAI fields are passed on; ``user`` is ignored.
* Cancellation: closing or cancelling the stream closes vLLM's ``generate`` iterator, which
  aborts the request in the engine core (vLLM does so on ``GeneratorExit``/``CancelledError``).
* ``response_format``: ``json_object`` and ``json_schema`` become ``StructuredOutputsParams(
  json_object=True)`` / ``StructuredOutputsParams(json=schema)``, the mapping vLLM 0.22.1's own
  OpenAI server makes; a schema vLLM cannot compile is a 400 (``RequestFailed``).
* Tool calls are refused (``tools`` with a ``tool_choice`` other than ``"none"``: a 400 naming
  ``tools``): ``AsyncLLM`` produces text, and turning text into ``tool_calls`` is done by the
  tool parsers of vLLM's server. Serve such models with ``vllm serve --enable-auto-tool-choice
  --tool-call-parser ...`` through ``engine: command`` instead.
* Errors: a value vLLM rejects for this request alone (``ValueError``) is ``RequestFailed`` (400);
  a dead or failing engine (``EngineDeadError``, ``EngineGenerateError``, a ``finish_reason`` of
  ``error`` or ``abort`` we did not ask for) is ``EngineError`` (the replica's: retried elsewhere).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import AsyncIterator
from typing import Any

from sage_prefect.controlplane.engines.base import (
    EngineError,
    GenerationRequest,
    LLMEngine,
    RequestFailed,
    TokenEvent,
)
from sage_prefect.controlplane.structured import (
    InvalidRequest,
    check_context_length,
    content_text,
    messages_for_template,
)

logger = logging.getLogger(__name__)

VLLM_VERSION = "0.22.1"  # the release this module was written against (constraints-vllm.txt pins it)
INSTALL_HINT = (
    "the 'vllm' engine needs vLLM, which is not installed: on a GPU host run "
    "pip install -c constraints-vllm.txt -e '.[vllm]' (docs/vllm.md; it only resolves once the "
    "project's base pins admit torch 2.11 and llguidance 1.7), or run `vllm serve` in its own "
    "environment and use engine 'command' or 'openai'"
)
TOOLS_REFUSED = (
    "tool calls are not supported by the in-process 'vllm' engine (vLLM turns text into tool calls "
    "in its server's parsers, not in AsyncLLM): serve this model with `vllm serve "
    "--enable-auto-tool-choice --tool-call-parser ...` through engine 'command', or send "
    "tool_choice 'none'"
)
# explicit constructor parameters, which `engine_args` must not repeat
_NAMED_ARGS = (
    "model",
    "max_model_len",
    "max_num_seqs",
    "dtype",
    "gpu_memory_utilization",
    "tensor_parallel_size",
    "scheduling_policy",
)


class VLLMEngine(LLMEngine):
    """vLLM 0.22.1's ``AsyncLLM`` in this process; UNTESTED (see the module docstring).

    ``model`` is what ``vllm serve`` takes: a Hugging Face model id or a local model directory.
    ``max_context_tokens`` sets vLLM's ``max_model_len`` and ``slots`` its ``max_num_seqs``
    (None: vLLM's defaults, read back after start). ``engine_args`` holds any other
    ``AsyncEngineArgs`` field (``enforce_eager``, ``quantization``, ``seed``, ``enable_prefix_caching``,
    ``download_dir``, ...), passed unchanged.

    >>> engine = VLLMEngine("Qwen/Qwen2.5-0.5B-Instruct", gpu_memory_utilization=0.5)  # doctest: +SKIP
    """

    max_context_tokens: int

    def __init__(
        self,
        model: str,
        *,
        name: str | None = None,
        max_context_tokens: int | None = None,
        slots: int | None = None,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        scheduling_policy: str = "fcfs",
        engine_args: dict[str, Any] | None = None,
    ) -> None:
        try:
            import vllm
            from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
            from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError
        except ImportError as exc:
            raise ImportError(INSTALL_HINT) from exc

        extra = dict(engine_args or {})
        repeated = sorted(set(extra) & set(_NAMED_ARGS))
        if repeated:
            raise ValueError(
                f"engine_args repeats {repeated}: set them as the engine's own parameters "
                "(model, max_context_tokens, slots, dtype, gpu_memory_utilization, "
                "tensor_parallel_size, scheduling_policy)"
            )
        if max_context_tokens is not None and max_context_tokens < 2:
            raise ValueError(f"max_context_tokens must be at least 2, got {max_context_tokens}")
        if slots is not None and slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        if scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {scheduling_policy!r}")
        version = str(getattr(vllm, "__version__", "unknown"))
        if not version.startswith(VLLM_VERSION.rsplit(".", 1)[0] + "."):
            logger.warning(
                "vllm engine: vLLM %s is installed; this engine was written against %s and is untested "
                "with any release",
                version,
                VLLM_VERSION,
            )

        args = vllm.AsyncEngineArgs(
            model=model,
            max_model_len=max_context_tokens,
            max_num_seqs=slots,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            scheduling_policy=scheduling_policy,
            **extra,
        )
        self._engine: Any = vllm.AsyncLLMEngine.from_engine_args(args)
        self._SamplingParams: Any = vllm.SamplingParams
        self._StructuredOutputsParams: Any = StructuredOutputsParams
        self._delta: Any = RequestOutputKind.DELTA
        self._engine_errors: tuple[type[BaseException], ...] = (EngineDeadError, EngineGenerateError)

        self.name = name or model
        self.model = model
        self.max_context_tokens = int(self._engine.model_config.max_model_len)
        self.slots = int(self._engine.vllm_config.scheduler_config.max_num_seqs)
        self._tokenizer: Any = self._engine.get_tokenizer()
        bos = getattr(self._tokenizer, "bos_token", None)
        self._bos_token: str | None = bos if isinstance(bos, str) and bos else None
        self._tok_lock = threading.Lock()  # prepare runs in worker threads; HF tokenizers are not re-entrant
        self._closed = False

    # ------------------------------------------------------------------ tokens and prompts

    def tokenize(self, text: str) -> list[int]:
        """The prompt's token ids; a prompt rendered by a chat template that already starts
        with BOS does not get a second one."""
        add_special = not (self._bos_token is not None and text.startswith(self._bos_token))
        with self._tok_lock:
            ids = [int(i) for i in self._tokenizer.encode(text, add_special_tokens=add_special)]
        if not ids:
            raise ValueError("the prompt is empty (no tokens)")
        return ids

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        if tools:
            raise InvalidRequest(TOOLS_REFUSED, "tools")
        normalised = [{**m, "content": content_text(m.get("content"))} for m in messages]
        if getattr(self._tokenizer, "chat_template", None):
            with self._tok_lock:
                rendered = self._tokenizer.apply_chat_template(
                    messages_for_template(normalised, None), tokenize=False, add_generation_prompt=True
                )
            return str(rendered)
        return super().render_chat(normalised, None)

    # ------------------------------------------------------------------ requests

    def prepare(self, request: GenerationRequest) -> None:
        """Refuse what this engine cannot do, tokenise, check the length and build the sampling
        parameters (vLLM validates them), off the event loop; see `LLMEngine.prepare`."""
        self._refuse_tools(request)
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {request.max_tokens}")
        if request.prompt_ids is None:
            request.prompt_ids = self.tokenize(request.prompt)
        self._check_length(len(request.prompt_ids), request.max_tokens)
        request.prepared = self.sampling_params(request)

    def sampling_params(self, request: GenerationRequest) -> Any:
        """vLLM ``SamplingParams`` for ``request`` (``ValueError`` for values vLLM rejects)."""
        kwargs: dict[str, Any] = {
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": request.seed,
            "stop": list(request.stop) or None,
            "output_kind": self._delta,
        }
        extra = request.extra or {}
        for key in ("presence_penalty", "frequency_penalty"):
            if extra.get(key) is not None:
                kwargs[key] = float(extra[key])
        if extra.get("logit_bias"):
            try:  # OpenAI's keys are token ids as strings; values clamped to [-100, 100]
                kwargs["logit_bias"] = {
                    int(token): min(100.0, max(-100.0, float(bias)))
                    for token, bias in extra["logit_bias"].items()
                }
            except (AttributeError, TypeError, ValueError) as exc:
                raise InvalidRequest(
                    f"logit_bias must map token ids to numbers: {exc}", "logit_bias"
                ) from None
        structured = self._structured_outputs(request.response_format)
        if structured is not None:
            kwargs["structured_outputs"] = structured
        return self._SamplingParams(**kwargs)

    def _structured_outputs(self, response_format: dict[str, Any] | None) -> Any:
        if response_format is None or response_format.get("type") == "text":
            return None
        kind = response_format.get("type")
        if kind == "json_object":
            return self._StructuredOutputsParams(json_object=True)
        if kind == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise InvalidRequest(
                    "response_format.json_schema.schema must be an object",
                    "response_format.json_schema.schema",
                )
            return self._StructuredOutputsParams(json=schema)
        raise InvalidRequest(
            f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
            "response_format.type",
        )

    def _refuse_tools(self, request: GenerationRequest) -> None:
        if request.tools and request.tool_choice != "none":
            raise InvalidRequest(TOOLS_REFUSED, "tools")

    def _check_length(self, n: int, max_tokens: int) -> None:
        assert self.max_context_tokens is not None
        check_context_length(n, max_tokens, self.max_context_tokens, self.name)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream one completion from vLLM (see the module docstring for the mapping)."""
        if self._closed:
            raise EngineError(f"vllm engine {self.name!r} is closed")
        if request.prompt_ids is None:  # a direct caller, not the gateway
            self.prepare(request)
        else:
            self._refuse_tools(request)
            self._check_length(len(request.prompt_ids), request.max_tokens)
        prompt_ids = list(request.prompt_ids or ())
        # the parameters `prepare` built serve the first attempt (vLLM clones them); a retry builds afresh
        params, request.prepared = request.prepared or self.sampling_params(request), None
        # unique per attempt: a retry of the same request must not meet its aborted predecessor
        request_id = f"{request.id or 'request'}-{secrets.token_hex(6)}"
        stream = self._engine.generate(
            {"prompt_token_ids": prompt_ids}, params, request_id, priority=request.priority
        )
        finish: str | None = None
        completion_tokens = 0
        try:
            async for output in stream:
                for choice in output.outputs[:1]:  # n == 1
                    completion_tokens += len(choice.token_ids)
                    if choice.finish_reason is not None:
                        finish = str(choice.finish_reason)
                    if choice.text:
                        yield TokenEvent(choice.text)
            # run to vLLM's own end (it returns after the finished output): leaving earlier would
            # make the `aclose` below abort a request that already finished
        except self._engine_errors as exc:
            raise EngineError(f"vllm engine {self.name!r} failed: {exc!r}") from exc
        except ValueError as exc:  # vLLM's check of this request (a schema it cannot compile, ...)
            raise RequestFailed(f"vLLM refused the request: {exc}", 400) from exc
        finally:
            await stream.aclose()  # a request left unfinished is aborted in the engine core
        if finish not in ("stop", "length"):
            raise EngineError(
                f"vllm engine {self.name!r} ended request {request_id} with finish_reason {finish!r}"
            )
        yield TokenEvent(
            "", finish_reason=finish, prompt_tokens=len(prompt_ids), completion_tokens=completion_tokens
        )

    async def aclose(self) -> None:
        """Stop vLLM's engine-core process (on the serving loop, as vLLM's own server does)."""
        if self._closed:
            return
        self._closed = True
        self._engine.shutdown()
