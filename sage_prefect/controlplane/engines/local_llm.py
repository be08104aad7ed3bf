"""The local LLM engine: a Hugging Face ``transformers`` causal LM with iteration-level batching.

Approach
--------
One background thread per engine owns the model and runs an *iteration-level* (continuous)
batching loop of its own; the asyncio side only tokenizes, validates and reads events.

* The running batch is a set of sequences sharing one ``DynamicCache`` whose rows are
  left-padded (right-aligned) to a common length, with a 2-D attention mask and explicit
  per-row ``position_ids`` (so padding never shifts a sequence's positions).
* At every step boundary the loop (1) drops cancelled sequences, (2) admits waiting requests
  into free slots: they are prefilled in batched forward passes of similar-length prompts
  (``_prefill_groups``: padding costs as much as a real token on a CPU), their first
  token sampled, and their KV cache is left-padded and concatenated onto the running
  batch's cache (no re-prefill of the running sequences), (3) runs one batched decode
  forward for all running sequences, samples each row with its own settings, and
  (4) removes finished rows (``index_select`` on the cache, then trims columns that became
  pure padding). New requests therefore join at the next step and finished ones leave at
  once; ``slots = max_batch_size`` bounds the rows.
* Sampling is per row: temperature 0 is greedy (argmax); otherwise temperature, top-p and a
  per-request ``torch.Generator`` (seeded from ``request.seed`` when given). A seeded request
  draws from its own generator, so it does not depend on what else is in the batch (the
  logits themselves may differ in the last bits between batch compositions, padding and
  BLAS blocking, which can only flip a token at a near-exact tie; the same request run alone
  always repeats exactly).
* Text is decoded cumulatively (the whole completion, special tokens skipped, no
  clean-up of spaces) and each event carries what is new since the last one. A trailing
  U+FFFD (a multi-byte character cut between tokens) and any suffix that could be the start
  of a stop string are held back until resolved, so the deltas always join to the final text
  and a stop string never leaks into the output.
* Events go to the asyncio side with ``loop.call_soon_threadsafe`` (one call per loop per
  step). A client that stops iterating (``aclose()`` / cancellation) marks its sequence
  cancelled; the loop frees the slot at the next step boundary.
* ``step_batch_sizes`` counts decode forward passes by batch size (``prefill_batch_sizes``
  the prefill passes), so tests and metrics can see the batching.

Why not transformers' own continuous batching (``model.init_continuous_batching``)?
It was evaluated with transformers 5.23 on CPU (sdpa and eager): it runs and streams, and
once warm it batches well (about 2.8-3.4 k tok/s at 16 requests on the tiny model, against
about 0.5 k tok/s one at a time), but: ``do_sample`` is one switch for the whole manager, so
greedy (temperature 0) and sampled requests cannot share a batch; sampling draws from the
global torch RNG (``torch.multinomial`` without a generator), so a request ``seed`` cannot
make its output deterministic; per-request temperature/top-p only exist when the manager was
created with non-default values; stop strings are not supported; the first batch paid about
6 s of cache set-up on CPU; and the API is marked experimental and changes between minor
releases (deprecations in 5.11 and 5.13). The loop here is small, depends only on the
stable ``model(...)`` / ``DynamicCache`` interfaces, and honours every field of
`GenerationRequest` per request.

Limits: the model must be a decoder-only ``AutoModelForCausalLM`` whose cache is a plain
``DynamicCache`` of per-layer key/value tensors (Llama, Mistral, Qwen2, Phi, GPT-NeoX-style
models; not state-space or hybrid caches). Prompts are never truncated: a prompt plus
``max_tokens`` beyond ``max_context_tokens`` is a ``ValueError``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import inspect
import logging
import secrets
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from sage_prefect.controlplane.engines.base import (
    EngineError,
    GenerationRequest,
    LLMEngine,
    RequestFailed,
    TokenEvent,
)
from sage_prefect.controlplane.structured import (
    InvalidRequest,
    TokenConstraint,
    ToolCallReader,
    check_context_length,
    content_text,
    messages_for_template,
    output_grammar,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

GREEDY_TEMPERATURE = 1e-5  # temperatures at or below this decode greedily
PREFILL_TOKEN_BUDGET = 8192  # padded prompt tokens admitted in one prefill pass (at least one request)
PREFILL_PADDING_SLACK = 1.25  # a prefill pass may hold at most this many padded tokens per prompt token
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes
_REPLACEMENT = "\ufffd"


def _prefill_groups(seqs: list[_Sequence]) -> list[list[_Sequence]]:
    """Split admitted requests into prefill passes of similar prompt length.

    A batched prefill pads every prompt to the longest one, and on a CPU a forward pass costs
    about the same per token, padding included (SmolLM2-135M, 1 thread: 16 prompts of 25-163
    tokens padded into one pass took 10.3 s, the same prompts one by one about 4 s). Prompts are
    sorted by length and cut into passes holding at most ``PREFILL_PADDING_SLACK`` padded tokens
    per real one, so similar prompts still share a pass and a long one does not pad the rest.
    """
    groups: list[list[_Sequence]] = []
    group: list[_Sequence] = []
    tokens = 0
    for seq in sorted(seqs, key=lambda s: len(s.prompt_ids)):
        n = len(seq.prompt_ids)  # the longest so far: the group pads to it
        if group and n * (len(group) + 1) > PREFILL_PADDING_SLACK * (tokens + n):
            groups.append(group)
            group, tokens = [], 0
        group.append(seq)
        tokens += n
    if group:
        groups.append(group)
    return groups


def _deliver(
    items: list[tuple[asyncio.Queue[TokenEvent | BaseException], TokenEvent | BaseException]],
) -> None:
    """Runs on the client's event loop: hand the step's events to their requests."""
    for queue, item in items:
        queue.put_nowait(item)


@dataclass(eq=False)
class _Sequence:
    """One request inside the engine (owned by the worker thread once submitted)."""

    request: GenerationRequest
    prompt_ids: list[int]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenEvent | BaseException]
    stops: list[str]
    greedy: bool
    generator: Any = None  # torch.Generator for sampled requests, made on the worker thread
    constraint: TokenConstraint | None = None  # the grammar its tokens must follow
    reader: ToolCallReader | None = None  # turns the text into tool calls (requests with tools)
    generated: list[int] = field(default_factory=list)
    text: str = ""  # text already sent to the client
    cancelled: bool = False  # set by the client side; the worker frees the slot
    done: bool = False

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stops), default=0)


class _Tokenizer:
    """Thread-safe encode/decode: the Rust ``tokenizers`` backend when there is one (a private
    copy, never reconfigured), else the transformers tokenizer under a lock."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        self._lock = threading.Lock()
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        self._backend: Any = None
        if backend is not None:
            from tokenizers import Tokenizer

            copy = Tokenizer.from_str(backend.to_str())
            copy.no_truncation()
            copy.no_padding()
            self._backend = copy
        bos = getattr(hf_tokenizer, "bos_token", None)
        self.bos_token: str | None = bos if isinstance(bos, str) and bos else None
        self.bos_token_id: int | None = getattr(hf_tokenizer, "bos_token_id", None)

    def encode(self, text: str) -> list[int]:
        # A prompt rendered by a chat template usually starts with BOS already: don't add a second one.
        add_special = not (self.bos_token is not None and text.startswith(self.bos_token))
        if self._backend is not None:
            return list(self._backend.encode(text, add_special_tokens=add_special).ids)
        with self._lock:
            return list(self.hf.encode(text, add_special_tokens=add_special))

    def decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return str(self._backend.decode(ids, skip_special_tokens=True))
        with self._lock:
            return str(self.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


def _resolve_dtype(dtype: str, device: torch.device) -> Any:
    import torch

    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else "auto"
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype not in names:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


class TransformersLLMEngine(LLMEngine):
    """A local ``transformers`` causal LM with continuous (iteration-level) batching; see the module docstring.

    ``model`` is a model-store name (``smollm2-135m-instruct``: pulled into ``$SAGE_HOME/models``
    on first use), a local Hugging Face model directory, a ``.gguf`` file (converted once into
    the store), or ``"tiny"`` for the random-weight test model built by `build_tiny_model`.
    ``threads`` sets torch's thread count for this engine's forward passes (None: torch's
    default, every core; on a shared CPU one or two threads per engine is faster).

    >>> engine = TransformersLLMEngine("smollm2-135m-instruct", threads=1)  # doctest: +SKIP
    """

    max_context_tokens: int  # always known here (the model's config, or the setting)

    def __init__(
        self,
        model: str,
        *,
        device: str = "cpu",
        max_batch_size: int = 16,
        max_context_tokens: int | None = None,
        dtype: str = "auto",
        threads: int | None = None,
        name: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self._threads = threads
        if threads is not None:
            torch.set_num_threads(threads)  # loading too; the worker thread sets it again for itself
        if model == "tiny":
            from sage_prefect.controlplane.engines.tiny_model import build_tiny_model, default_tiny_model_dir

            path = build_tiny_model(default_tiny_model_dir())
        else:
            from sage_prefect.controlplane.modelstore import resolve

            path = resolve(model)
        self._device = torch.device(device)
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        torch_dtype = _resolve_dtype(dtype, self._device)

        hf_tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self._tok = _Tokenizer(hf_tokenizer)
        self._model: Any = cast(
            Any, AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, local_files_only=True)
        )
        self._model.to(self._device)
        self._model.eval()
        forward_params = inspect.signature(self._model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in forward_params
        # transformers 5.24 renamed the forward's ``past_key_values`` to ``cache`` (the old name
        # warns, and goes in 5.40); earlier releases only know the old one
        self._cache_kw = "cache" if "cache" in forward_params else "past_key_values"

        config = self._model.config
        self.path = path
        self.name = name or getattr(config, "sage_model_name", None) or path.name
        self.slots = max_batch_size
        self.max_batch_size = max_batch_size
        model_ctx = getattr(config.get_text_config(), "max_position_embeddings", None)
        self.max_context_tokens = int(max_context_tokens or model_ctx or 2048)
        if self.max_context_tokens < 2:
            raise ValueError(f"max_context_tokens must be at least 2, got {self.max_context_tokens}")
        self._eos_ids = self._collect_eos_ids(hf_tokenizer)
        pad = hf_tokenizer.pad_token_id
        if pad is None:
            pad = next(iter(sorted(self._eos_ids)), 0)
        self._pad_id = int(pad)
        eos = hf_tokenizer.eos_token_id
        self._eos_token_id = int(eos) if isinstance(eos, int) else next(iter(sorted(self._eos_ids)), None)
        self._vocab_size = int(self._model.get_output_embeddings().weight.shape[0])

        # Grammar-constrained decoding (llguidance): a tokenizer made on first use, an executor
        # that computes a batch's masks in parallel with the GIL released, and a thread that
        # computes them while the model's forward pass runs.
        self._max_token_bytes = _max_token_bytes(self._tok._backend)
        self._llg_lock = threading.Lock()
        self._llg_tokenizer: Any = None
        self._llg_executor: Any = None
        self._mask_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"llm-masks-{self.name}"
        )

        # Counters (written by the worker thread, read anywhere).
        self.step_batch_sizes: collections.Counter[int] = collections.Counter()
        self.prefill_batch_sizes: collections.Counter[int] = collections.Counter()
        self.generated_tokens = 0

        # Shared with the worker: guarded by _cond.
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._closing = False
        self._error: BaseException | None = None

        # Worker-thread-only state: the running batch.
        self._rows: list[_Sequence] = []
        self._cache: Any = None  # DynamicCache, rows right-aligned
        self._mask: Any = None  # [rows, T] attention mask
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[_Sequence, TokenEvent | BaseException]]] = {}

        self._thread = threading.Thread(target=self._run, name=f"llm-engine-{self.name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API (asyncio side)

    def count_tokens(self, text: str) -> int:
        return len(self._tok.encode(text))

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        normalised = [{**m, "content": content_text(m.get("content"))} for m in messages]
        if getattr(self._tok.hf, "chat_template", None):
            rendered = self._tok.hf.apply_chat_template(
                messages_for_template(normalised, tools), tokenize=False, add_generation_prompt=True
            )
            return str(rendered)
        return super().render_chat(normalised, tools)

    def queue_depth(self) -> int | None:
        with self._cond:
            return sum(1 for s in self._waiting if not s.cancelled)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream one completion; ``ValueError`` (at the first ``__anext__``) for an invalid request."""
        self._raise_if_unavailable()
        seq = self._prepare(request)
        with self._cond:
            self._raise_if_unavailable()
            self._waiting.append(seq)
            self._cond.notify()
        finished = False
        try:
            while True:
                try:
                    async with asyncio.timeout(1.0):
                        item = await seq.queue.get()
                except TimeoutError:
                    if not self._thread.is_alive():
                        finished = True
                        raise EngineError(
                            f"LLM engine {self.name!r}: its worker thread is gone"
                        ) from self._error
                    continue
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                seq.cancelled = True
                with self._cond:
                    self._cond.notify()

    async def aclose(self) -> None:
        self._signal_close()
        await asyncio.to_thread(self._thread.join, 60)
        self._mask_pool.shutdown(wait=False)

    def close(self) -> None:
        """Synchronous `aclose` (for non-async owners)."""
        self._signal_close()
        self._thread.join(60)
        self._mask_pool.shutdown(wait=False)

    # ------------------------------------------------------------------ helpers (asyncio side)

    def _signal_close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def _raise_if_unavailable(self) -> None:
        if self._error is not None:
            raise EngineError(f"LLM engine {self.name!r} failed: {self._error!r}") from self._error
        if self._closing:
            raise EngineError(f"LLM engine {self.name!r} is closed")

    def prepare(self, request: GenerationRequest) -> None:
        """Validate and tokenise ``request``, compile its grammar (off the event loop; see
        `LLMEngine.prepare`): everything that could fail for this request alone fails here."""
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {request.max_tokens}")
        if request.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {request.temperature}")
        if not 0 < request.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {request.top_p}")
        if request.seed is not None and not SEED_MIN <= request.seed <= SEED_MAX:
            raise InvalidRequest(
                f"seed must be between {SEED_MIN} and {SEED_MAX}, got {request.seed}", "seed"
            )
        ctx = self.max_context_tokens
        floor = self._fewest_tokens(request.prompt)
        if floor >= ctx:  # certainly too long: refused without tokenising it
            raise InvalidRequest(
                f"the prompt is at least {floor} tokens ({len(request.prompt)} characters), more than the "
                f"model's context of {ctx} tokens (model {self.name!r}); shorten the prompt",
                "messages" if request.messages is not None else "prompt",
            )
        if request.prompt_ids is None:
            request.prompt_ids = self.tokenize(request.prompt)
        self._check_length(len(request.prompt_ids), request.max_tokens)
        if request.constrained:
            request.prepared = self._constraint(request)  # a bad schema fails here, not in the batch

    def tokenize(self, text: str) -> list[int]:
        """The prompt's token ids (a prompt with none starts from BOS)."""
        ids = self._tok.encode(text)
        if not ids:
            if self._tok.bos_token_id is None:
                raise ValueError(
                    "the prompt is empty (no tokens) and the model has no BOS token to start from"
                )
            ids = [int(self._tok.bos_token_id)]
        return ids

    def _check_length(self, n: int, max_tokens: int) -> None:
        assert self.max_context_tokens is not None
        check_context_length(n, max_tokens, self.max_context_tokens, self.name)

    def _fewest_tokens(self, text: str) -> int:
        """A lower bound on ``text``'s token count without tokenising it: a byte-level BPE
        tokenizer without a normalizer covers every byte, at most ``_max_token_bytes`` a token."""
        if self._max_token_bytes is None:
            return 0
        return -(-len(text.encode("utf-8", "surrogatepass")) // self._max_token_bytes)

    def _constraint(self, request: GenerationRequest) -> TokenConstraint | None:
        grammar = output_grammar(
            request.tools, request.tool_choice, request.parallel_tool_calls, request.response_format
        )
        if grammar is None:
            return None
        calling = bool(request.tools) and request.tool_choice != "none"
        param = "tools" if calling else "response_format.json_schema.schema"
        return TokenConstraint(self._grammar_tokenizer(), grammar, param)

    def _prepare(self, request: GenerationRequest) -> _Sequence:
        if request.prompt_ids is None:  # not prepared by the gateway (a direct caller)
            self.prepare(request)
        else:  # token ids given: still within the context
            self._check_length(len(request.prompt_ids), request.max_tokens)
        prompt_ids = list(request.prompt_ids or ())
        constraint = None
        if request.constrained:
            # the gateway's compiled constraint serves the first attempt; a retry starts afresh
            constraint, request.prepared = request.prepared or self._constraint(request), None
        reader = ToolCallReader() if request.tools and request.tool_choice != "none" else None
        return _Sequence(
            request=request,
            prompt_ids=prompt_ids,
            loop=asyncio.get_running_loop(),
            queue=asyncio.Queue(),
            stops=[s for s in request.stop if s],
            greedy=request.temperature <= GREEDY_TEMPERATURE,
            constraint=constraint,
            reader=reader,
        )

    def _grammar_tokenizer(self) -> Any:
        """The tokenizer as llguidance sees it (built once, ~0.5 s, on first use)."""
        with self._llg_lock:
            if self._llg_tokenizer is None:
                import llguidance.hf

                try:
                    self._llg_tokenizer = llguidance.hf.from_tokenizer(
                        self._tok.hf, n_vocab=self._vocab_size, eos_token=self._eos_token_id
                    )
                except ValueError as exc:  # a slow (non-Rust) tokenizer
                    raise InvalidRequest(
                        f"model {self.name!r} cannot constrain its output (tools, response_format): {exc}"
                    ) from None
            return self._llg_tokenizer

    def _collect_eos_ids(self, hf_tokenizer: Any) -> set[int]:
        ids: set[int] = set()
        for source in (
            getattr(self._model, "generation_config", None),
            self._model.config.get_text_config(),
            hf_tokenizer,
        ):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        return ids

    # ------------------------------------------------------------------ worker thread

    def _run(self) -> None:
        import torch

        try:
            if self._threads is not None:
                torch.set_num_threads(self._threads)
            with torch.inference_mode():
                while self._wait_for_work():
                    self._iteration()
        except BaseException as exc:  # the thread dies: every pending request gets EngineError
            logger.exception("LLM engine %r: worker thread died", self.name)
            self._error = exc
        finally:
            reason = (
                EngineError(f"LLM engine {self.name!r}: worker thread died: {self._error!r}")
                if self._error is not None
                else EngineError(f"LLM engine {self.name!r} was closed before the request finished")
            )
            with self._cond:
                self._closing = True
                pending = list(self._waiting)
                self._waiting.clear()
            for seq in [*self._rows, *pending]:
                self._fail(seq, reason)
            self._rows, self._cache, self._mask = [], None, None
            self._flush()

    def _wait_for_work(self) -> bool:
        with self._cond:
            while not self._closing and not self._waiting and not self._rows:
                self._cond.wait()
            return not self._closing

    def _iteration(self) -> None:
        self._drop_cancelled()
        admitted = self._seed(self._take_waiting())
        try:
            for group in _prefill_groups(admitted):
                self._prefill(group)
            if self._rows:
                self._decode_step()
        except Exception as exc:  # a failed step fails the sequences in it; the engine keeps serving
            logger.exception("LLM engine %r: generation step failed", self.name)
            error = EngineError(f"LLM engine {self.name!r}: generation step failed: {exc!r}")
            for seq in [*self._rows, *admitted]:
                self._fail(seq, error)
            self._rows, self._cache, self._mask = [], None, None
        finally:
            self._flush()

    def _take_waiting(self) -> list[_Sequence]:
        free = self.max_batch_size - len(self._rows)
        taken: list[_Sequence] = []
        longest = 0
        with self._cond:
            while self._waiting and len(taken) < free:
                seq = self._waiting[0]
                if seq.cancelled:
                    self._waiting.popleft()
                    continue
                new_longest = max(longest, len(seq.prompt_ids))
                if taken and new_longest * (len(taken) + 1) > PREFILL_TOKEN_BUDGET:
                    break
                self._waiting.popleft()
                taken.append(seq)
                longest = new_longest
        return taken

    def _seed(self, seqs: list[_Sequence]) -> list[_Sequence]:
        """Give each sampled request its generator; a request whose seed torch refuses fails
        alone (the gateway refuses such seeds already: this guards direct callers)."""
        import torch

        ready = []
        for seq in seqs:
            if not seq.greedy:
                try:
                    seq.generator = torch.Generator(device=self._device)
                    seed = seq.request.seed if seq.request.seed is not None else secrets.randbits(63)
                    seq.generator.manual_seed(int(seed))
                except (RuntimeError, OverflowError, ValueError, TypeError) as exc:
                    self._fail(
                        seq, RequestFailed(f"seed {seq.request.seed!r} cannot seed a generator: {exc}")
                    )
                    continue
            ready.append(seq)
        return ready

    def _drop_cancelled(self) -> None:
        keep = [i for i, seq in enumerate(self._rows) if not seq.cancelled]
        if len(keep) < len(self._rows):
            self._select_rows(keep)

    def _prefill(self, seqs: list[_Sequence]) -> None:
        import torch
        from transformers import DynamicCache

        device = self._device
        longest = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), longest), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for i, seq in enumerate(seqs):
            n = len(seq.prompt_ids)
            ids[i, longest - n :] = torch.tensor(seq.prompt_ids, dtype=torch.long)
            mask[i, longest - n :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache: Any = cast(Any, DynamicCache())
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._logits_to_keep else {}
        masks = self._start_masks(seqs)  # computed while the forward pass runs
        out = self._model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kw: cache},
            **kwargs,
        )
        self.prefill_batch_sizes[len(seqs)] += 1
        tokens = self._sample(out.logits[:, -1, :], seqs, masks)
        for seq, token in zip(seqs, tokens, strict=True):
            self._advance_one(seq, token)

        # Padding positions hold whatever the model computed for pad tokens: zero them so a
        # stray NaN can never leak through a masked (weight 0) attention entry later.
        pad = (mask == 0)[:, None, :, None]
        layers = [
            (layer.keys.masked_fill(pad, 0.0), layer.values.masked_fill(pad, 0.0)) for layer in cache.layers
        ]
        keep = [i for i, seq in enumerate(seqs) if not seq.done]
        if not keep:
            return
        if len(keep) < len(seqs):
            index = torch.tensor(keep, device=device)
            layers = [(k.index_select(0, index), v.index_select(0, index)) for k, v in layers]
            mask = mask.index_select(0, index)
        self._merge([seqs[i] for i in keep], layers, mask)

    def _merge(self, seqs: list[_Sequence], layers: list[tuple[Any, Any]], mask: Any) -> None:
        """Append prefilled rows to the running batch: left-pad both to a common length, concatenate."""
        import torch
        import torch.nn.functional as F
        from transformers import DynamicCache

        if self._cache is None or not self._rows:
            self._cache, self._mask, self._rows = DynamicCache(ddp_cache_data=layers), mask, list(seqs)
            return
        running = [(layer.keys, layer.values) for layer in self._cache.layers]
        t_old, t_new = self._mask.shape[1], mask.shape[1]
        length = max(t_old, t_new)

        def lpad(x: torch.Tensor, n: int) -> torch.Tensor:
            return x if n == 0 else F.pad(x, (0, 0, n, 0))

        merged = [
            (
                torch.cat([lpad(k_old, length - t_old), lpad(k_new, length - t_new)], dim=0),
                torch.cat([lpad(v_old, length - t_old), lpad(v_new, length - t_new)], dim=0),
            )
            for (k_old, v_old), (k_new, v_new) in zip(running, layers, strict=True)
        ]
        self._mask = torch.cat(
            [F.pad(self._mask, (length - t_old, 0)), F.pad(mask, (length - t_new, 0))], dim=0
        )
        self._cache = DynamicCache(ddp_cache_data=merged)
        self._rows = [*self._rows, *seqs]

    def _decode_step(self) -> None:
        import torch

        rows, device = self._rows, self._device
        ids = torch.tensor([[seq.generated[-1]] for seq in rows], dtype=torch.long, device=device)
        positions = torch.tensor(
            [[len(seq.prompt_ids) + len(seq.generated) - 1] for seq in rows], dtype=torch.long, device=device
        )
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        masks = self._start_masks(rows)  # computed while the forward pass runs
        out = self._model(
            input_ids=ids,
            attention_mask=self._mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kw: self._cache},
        )  # the DynamicCache grows in place
        self.step_batch_sizes[len(rows)] += 1
        tokens = self._sample(out.logits[:, -1, :], rows, masks)
        for seq, token in zip(rows, tokens, strict=True):
            self._advance_one(seq, token)
        keep = [i for i, seq in enumerate(rows) if not seq.done and not seq.cancelled]
        if len(keep) < len(rows):
            self._select_rows(keep)

    def _select_rows(self, keep: list[int]) -> None:
        """Keep only these rows of the running batch; trim columns that are padding in every row."""
        import torch

        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        self._rows = [self._rows[i] for i in keep]
        index = torch.tensor(keep, device=self._device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask.index_select(0, index)
        used = self._mask.any(dim=0).nonzero()
        start = int(used[0].item()) if used.numel() else 0
        if start > 0:
            self._mask = self._mask[:, start:]
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, start:, :]
                layer.values = layer.values[:, :, start:, :]

    def _start_masks(self, seqs: list[_Sequence]) -> concurrent.futures.Future[tuple[list[int], Any]] | None:
        """Start computing the token masks of the constrained rows (None: no row is constrained)."""
        rows = [
            (i, seq.constraint) for i, seq in enumerate(seqs) if seq.constraint is not None and not seq.done
        ]
        if not rows:
            return None
        return self._mask_pool.submit(self._fill_masks, rows)

    def _fill_masks(self, rows: list[tuple[int, TokenConstraint]]) -> tuple[list[int], Any]:
        import llguidance
        import llguidance.torch as llg_torch

        if self._llg_executor is None:
            self._llg_executor = llguidance.LLExecutor()
        bitmask = llg_torch.allocate_token_bitmask(len(rows), self._vocab_size)
        llg_torch.fill_next_token_bitmask_par(
            self._llg_executor, [(c.matcher, k) for k, (_, c) in enumerate(rows)], bitmask
        )
        return [i for i, _ in rows], bitmask

    def _apply_masks(self, logits: torch.Tensor, masks: tuple[list[int], Any]) -> None:
        """Set the logits of tokens a row's grammar forbids to -inf (in place)."""
        import torch

        index, bitmask = masks
        n, words = bitmask.shape
        shifts = torch.arange(32, dtype=torch.int32)
        allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().reshape(n, words * 32)
        vocab = logits.shape[1]
        if vocab > words * 32:
            allowed = torch.nn.functional.pad(allowed, (0, vocab - words * 32), value=False)
        allowed = allowed[:, :vocab].to(logits.device)
        rows = torch.tensor(index, device=logits.device)
        logits.index_copy_(0, rows, logits.index_select(0, rows).masked_fill(~allowed, float("-inf")))

    def _sample(
        self,
        logits: torch.Tensor,
        seqs: list[_Sequence],
        masks: concurrent.futures.Future[tuple[list[int], Any]] | None = None,
    ) -> list[int | None]:
        logits = logits.float()
        if masks is not None:
            self._apply_masks(logits, masks.result())
        greedy = logits.argmax(dim=-1).tolist()
        tokens: list[int | None] = []
        for i, seq in enumerate(seqs):
            if seq.greedy:
                tokens.append(int(greedy[i]))
                continue
            try:
                tokens.append(self._sample_row(logits[i], seq))
            except RuntimeError as exc:  # e.g. a row of NaN or -inf: this request alone fails
                self._fail(seq, RequestFailed(f"sampling failed for this request: {exc}", status=500))
                tokens.append(None)
        return tokens

    @staticmethod
    def _sample_row(logits: torch.Tensor, seq: _Sequence) -> int:
        import torch

        row = logits / seq.request.temperature
        if seq.request.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            outside = (probs.cumsum(dim=-1) - probs) > seq.request.top_p  # the first token always stays
            sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
            pick = torch.multinomial(torch.softmax(sorted_logits, dim=-1), 1, generator=seq.generator)
            return int(order[pick].item())
        pick = torch.multinomial(torch.softmax(row, dim=-1), 1, generator=seq.generator)
        return int(pick.item())

    def _advance_one(self, seq: _Sequence, token: int | None) -> None:
        """`_advance`, failing this sequence alone if its own step goes wrong (``token`` None:
        its sampling failed already)."""
        if token is None:
            return
        try:
            self._advance(seq, token)
        except Exception as exc:
            logger.exception("LLM engine %r: request %s failed", self.name, seq.request.id)
            self._fail(seq, RequestFailed(f"generation failed for this request: {exc!r}", status=500))

    def _advance(self, seq: _Sequence, token: int) -> None:
        """Record one generated token; send the new text (and the end, if this token ends the request)."""
        if seq.cancelled:
            seq.done = True
            return
        seq.generated.append(token)
        self.generated_tokens += 1
        if seq.constraint is not None:
            try:
                seq.constraint.consume(token)
            except RuntimeError as exc:  # this request's grammar state: fail it alone
                self._fail(seq, exc)
                return
        full = self._tok.decode(seq.generated)
        finish: str | None = None
        end = len(full)
        if seq.stops:
            start = max(0, len(seq.text) - seq.max_stop_len)
            hits = [k for k in (full.find(s, start) for s in seq.stops) if k != -1]
            if hits:
                finish, end = "stop", max(min(hits), len(seq.text))
        if finish is None:
            if token in self._eos_ids or (seq.constraint is not None and seq.constraint.finished):
                finish = "stop"
            elif len(seq.generated) >= seq.request.max_tokens:
                finish = "length"
            else:
                end = self._safe_end(full, seq)
        delta = full[len(seq.text) : end] if end > len(seq.text) else ""
        if delta:
            seq.text += delta
            if seq.reader is None:
                self._send(seq, TokenEvent(text=delta))
            else:
                self._send_parts(seq, *seq.reader.feed(delta))
        if finish is not None:
            seq.done = True
            if seq.reader is not None:
                self._send_parts(seq, *seq.reader.finish())
                if seq.reader.calls and finish == "stop":
                    finish = "tool_calls"
            self._send(
                seq,
                TokenEvent(
                    text="",
                    finish_reason=finish,
                    prompt_tokens=len(seq.prompt_ids),
                    completion_tokens=len(seq.generated),
                ),
            )

    @staticmethod
    def _safe_end(full: str, seq: _Sequence) -> int:
        """How much of ``full`` can be sent now: hold back a cut multi-byte character and any
        suffix that may still grow into a stop string."""
        end = len(full)
        while end > len(seq.text) and full[end - 1] == _REPLACEMENT:
            end -= 1
        if seq.stops:
            for k in range(min(seq.max_stop_len - 1, end - len(seq.text)), 0, -1):
                tail = full[end - k : end]
                if any(s.startswith(tail) for s in seq.stops):
                    return end - k
        return end

    def _send_parts(self, seq: _Sequence, content: str, calls: list[dict[str, Any]]) -> None:
        if content or calls:
            self._send(seq, TokenEvent(text=content, tool_calls=calls or None))

    def _send(self, seq: _Sequence, item: TokenEvent | BaseException) -> None:
        self._outbox.setdefault(seq.loop, []).append((seq, item))

    def _fail(self, seq: _Sequence, error: BaseException) -> None:
        if not seq.done:
            seq.done = True
            self._send(seq, error)

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for loop, entries in outbox.items():
            items = [(seq.queue, item) for seq, item in entries if not seq.cancelled]
            if not items:
                continue
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the client's loop is closed: nobody is listening
                for seq, _ in entries:
                    seq.cancelled = True


def _max_token_bytes(backend: Any) -> int | None:
    """The longest token in bytes, for a byte-level BPE tokenizer without a normalizer (each
    vocabulary entry is then one character per byte); None for any other tokenizer."""
    import json

    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    if spec.get("normalizer") is not None or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        return None
    longest = max((len(token) for token in backend.get_vocab(with_added_tokens=True)), default=0)
    return longest or None
