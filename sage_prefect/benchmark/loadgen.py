"""Open-loop load generation against any OpenAI-compatible endpoint, with `vllm bench serve` semantics.

The same spec drives the project's control plane, a bare vLLM server or any other server that
speaks ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings``:

>>> spec = LoadSpec(
...     workloads=[
...         Workload(name="chat", kind="chat", model="sage-tiny-random-lm", slo_class="interactive",
...                  input_tokens=LengthDist(mean=64), output_tokens=LengthDist(mean=16)),
...         Workload(name="embed", kind="embedding", model="all-MiniLM-L6-v2", weight=3.0,
...                  texts_per_request=8, input_tokens=32),
...     ],
...     rate=20.0,
...     num_requests=200,
... )
>>> len(plan_requests(spec))
200
>>> # result = run_load_sync("http://127.0.0.1:8100/v1", spec, progress=True)

Semantics (those of vLLM's ``vllm/benchmarks/serve.py``):

- Arrivals are open loop: request *i* is launched at its scheduled offset whatever the state of
  earlier requests. Inter-arrival gaps are gamma distributed with shape ``burstiness`` and
  scale ``1 / (rate * burstiness)`` (``burstiness=1`` is a Poisson process, ``<1`` is burstier);
  ``rate=inf`` sends everything at once. With ``num_requests`` the offsets are rescaled so the
  last one falls at ``num_requests / rate``, as vLLM does to steady throughput across seeds.
- ``max_concurrency`` caps requests in flight with a semaphore: a request keeps its scheduled
  arrival but waits for a slot; like vLLM, its TTFT and latency are measured from the moment it
  is *sent* (``start_s``), so the wait for a slot shows in ``start_s - scheduled_s``, not in TTFT.
- The client never retries (``max_retries=0``): a 429 is recorded as ``rejected``, any other
  failure as ``error``; nothing a request does ever ends the run.
- Streamed TTFT is the first chunk carrying content; ITL the gaps between content chunks;
  latency ends when the stream does. Token counts come from the ``usage`` the server reports
  (``stream_options.include_usage``); without it, content chunks are counted.
- Prompts are synthetic English-like text, one short common word per requested token (close to
  one token per word for BPE, SentencePiece and WordPiece tokenizers; chat templates add a few
  more, which the server's ``usage`` reports). They are drawn from the seed, distinct per request,
  so no two requests share a cacheable prefix.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    import openai

__all__ = [
    "SLO",
    "LengthDist",
    "LoadResult",
    "LoadSpec",
    "PlannedRequest",
    "Probe",
    "ProgressCallback",
    "RequestResult",
    "Workload",
    "arrival_offsets",
    "plan_requests",
    "progress_bar",
    "run_load",
    "run_load_sync",
    "sweep",
    "sweep_sync",
    "synthetic_text",
]

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each main request finishes (and once with 0 at start)."""

# Independent random streams derived from the one seed: changing one part of a spec (the warm-up
# count, a probe) never changes the requests another part draws.
_ARRIVALS, _MIX, _WARMUP, _PROBE, _TEXT = 0, 1, 2, 3, 4

_INF_STRINGS = {"inf", "+inf", "infinity", "+infinity"}


def _inf_string(value: Any) -> Any:
    """Accept ``"inf"`` / ``"Infinity"`` (how JSON carries ``math.inf``) for a float field."""
    if isinstance(value, str) and value.strip().lower() in _INF_STRINGS:
        return math.inf
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, ser_json_inf_nan="strings")


class LengthDist(_Strict):
    """A distribution of token counts, sampled as integers clipped to ``[min, max]``.

    ``fixed``: always ``mean``. ``uniform``: integers in ``[floor(mean*(1-r)), ceil(mean*(1+r))]``
    with ``r = range_ratio`` (vLLM's random dataset). ``normal``: ``N(mean, std)``. ``lognormal``:
    log-normal whose own mean and standard deviation are ``mean`` and ``std``.

    >>> LengthDist(kind="uniform", mean=100, range_ratio=0.5).sample(np.random.default_rng(0), 3)
    array([135, 114, 101])
    """

    kind: Literal["fixed", "uniform", "normal", "lognormal"] = "fixed"
    mean: float = Field(gt=0, allow_inf_nan=False)
    std: float = Field(0.0, ge=0, allow_inf_nan=False, description="spread of normal / lognormal")
    range_ratio: float = Field(0.0, ge=0, lt=1, description="spread of uniform, as in vLLM")
    min: int = Field(1, ge=0)
    max: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> LengthDist:
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) must be at least min ({self.min})")
        if self.std and self.kind not in ("normal", "lognormal"):
            raise ValueError(f"std applies to kind normal or lognormal, not {self.kind!r}")
        if self.range_ratio and self.kind != "uniform":
            raise ValueError(f"range_ratio applies to kind uniform, not {self.kind!r}")
        return self

    def sample(self, rng: np.random.Generator, n: int) -> npt.NDArray[np.int64]:
        """``n`` integer lengths drawn from ``rng``."""
        values: npt.NDArray[Any]
        if self.kind == "fixed":
            values = np.full(n, self.mean)
        elif self.kind == "uniform":
            low = math.floor(self.mean * (1 - self.range_ratio))
            high = math.ceil(self.mean * (1 + self.range_ratio))
            values = rng.integers(low, high + 1, size=n)
        elif self.kind == "normal":
            values = rng.normal(self.mean, self.std, size=n)
        else:
            sigma2 = math.log1p((self.std / self.mean) ** 2)
            values = rng.lognormal(math.log(self.mean) - sigma2 / 2, math.sqrt(sigma2), size=n)
        out = np.rint(values).astype(np.int64)
        return np.clip(out, self.min, self.max if self.max is not None else np.iinfo(np.int64).max)


def _length(value: Any) -> Any:
    """``input_tokens: 128`` is short for ``{kind: fixed, mean: 128}``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {"mean": float(value)}
    return value


class Workload(_Strict):
    """One kind of request in the mix.

    >>> Workload(name="rag", kind="chat", model="llama-3-8b", slo_class="interactive",
    ...          input_tokens=512, output_tokens=LengthDist(kind="uniform", mean=128, range_ratio=0.5))
    ... # doctest: +ELLIPSIS
    Workload(name='rag', kind='chat', ...)

    LLM requests are sent with ``max_tokens`` from ``output_tokens`` and ``temperature=0``; the
    OpenAI API has no ``ignore_eos``, so a model may stop earlier (pass ``extra_body:
    {ignore_eos: true}`` to a vLLM server to force the length). ``slo_class`` and ``priority``
    travel as the ``x-slo-class`` and ``x-priority`` headers.
    """

    name: str = Field(min_length=1)
    kind: Literal["chat", "completion", "embedding"] = "chat"
    model: str = Field(min_length=1)
    weight: float = Field(1.0, gt=0, allow_inf_nan=False, description="share of the request mix")
    slo_class: str | None = Field(None, min_length=1)
    priority: int | None = None
    input_tokens: LengthDist = LengthDist(mean=128)
    output_tokens: LengthDist = LengthDist(mean=128)
    texts_per_request: int = Field(1, ge=1, description="embedding inputs per request")
    stream: bool = True
    extra_body: dict[str, Any] = Field(default_factory=dict)

    @field_validator("input_tokens", "output_tokens", mode="before")
    @classmethod
    def _lengths(cls, value: Any) -> Any:
        return _length(value)

    @model_validator(mode="after")
    def _consistent(self) -> Workload:
        if self.texts_per_request != 1 and self.kind != "embedding":
            raise ValueError(f"texts_per_request applies to kind embedding, not {self.kind!r}")
        return self

    def headers(self) -> dict[str, str]:
        """The class and priority headers this workload's requests carry."""
        out: dict[str, str] = {}
        if self.slo_class is not None:
            out["x-slo-class"] = self.slo_class
        if self.priority is not None:
            out["x-priority"] = str(self.priority)
        return out


class SLO(_Strict):
    """Latency objectives in milliseconds; a request meets them when every given bound holds.

    As vLLM's ``--goodput``: only completed requests can meet it, and an LLM request with at most
    one output token has TPOT 0. Embedding requests are judged on ``e2el_ms`` alone.

    >>> SLO(ttft_ms=500, tpot_ms=50)
    SLO(ttft_ms=500.0, tpot_ms=50.0, e2el_ms=None)
    """

    ttft_ms: float | None = Field(None, gt=0)
    tpot_ms: float | None = Field(None, gt=0)
    e2el_ms: float | None = Field(None, gt=0)

    def met_by(self, result: RequestResult) -> bool:
        """Whether ``result`` completed within every given bound (compared in seconds, as vLLM)."""
        if result.status != "ok" or result.latency_s is None:
            return False
        if self.e2el_ms is not None and not result.latency_s <= self.e2el_ms / 1000:
            return False
        if result.kind == "embedding":
            return True
        if self.ttft_ms is not None and not (
            result.ttft_s is not None and result.ttft_s <= self.ttft_ms / 1000
        ):
            return False
        return self.tpot_ms is None or (result.tpot_s or 0.0) <= self.tpot_ms / 1000


class Probe(_Strict):
    """An interference probe: tiny requests (1-token chat, or one short embedding text) at a
    Poisson ``rate`` beside the main load, from its start until its last request finishes.

    >>> Probe(rate=2.0, model="sage-tiny-random-lm", slo_class="interactive")
    ... # doctest: +ELLIPSIS
    Probe(rate=2.0, model='sage-tiny-random-lm', ...)

    Probes bypass ``max_concurrency``, are marked ``probe=True`` and stay out of `summarize`.
    """

    rate: float = Field(gt=0, allow_inf_nan=False)
    model: str = Field(min_length=1)
    kind: Literal["chat", "embedding"] = "chat"
    slo_class: str | None = Field(None, min_length=1)
    priority: int | None = None

    def workload(self) -> Workload:
        return Workload(
            name="probe",
            kind=self.kind,
            model=self.model,
            slo_class=self.slo_class,
            priority=self.priority,
            input_tokens=LengthDist(mean=4),
            output_tokens=LengthDist(mean=1),
        )


class LoadSpec(_Strict):
    """What to send, how fast, and for how long (``num_requests`` or ``duration_s``).

    >>> LoadSpec(workloads=[Workload(name="w", model="m")], rate=5.0, duration_s=60).burstiness
    1.0
    """

    workloads: list[Workload] = Field(min_length=1)
    rate: float = Field(math.inf, gt=0, description="requests/s; inf sends all at once (vLLM's default)")
    burstiness: float = Field(1.0, gt=0, allow_inf_nan=False, description="gamma shape; 1 = Poisson")
    num_requests: int | None = Field(None, ge=1)
    duration_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    max_concurrency: int | None = Field(None, ge=1)
    warmup_requests: int = Field(0, ge=0, description="sent first, one at a time, not measured")
    seed: int = 0
    probe: Probe | None = None
    request_timeout_s: float = Field(120.0, gt=0, allow_inf_nan=False)
    text_salt: int = Field(
        0, description="varies prompt text only (not arrivals, mix or lengths); `sweep` sets the step index"
    )

    @field_validator("rate", mode="before")
    @classmethod
    def _rate(cls, value: Any) -> Any:
        return _inf_string(value)

    @model_validator(mode="after")
    def _consistent(self) -> LoadSpec:
        if (self.num_requests is None) == (self.duration_s is None):
            raise ValueError("give exactly one of num_requests and duration_s")
        if self.duration_s is not None and math.isinf(self.rate):
            raise ValueError("duration_s needs a finite rate (rate=inf sends every request at once)")
        names = [w.name for w in self.workloads]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"workload names must be unique; repeated: {', '.join(dupes)}")
        return self

    def with_rate(self, rate: float) -> LoadSpec:
        """A validated copy at another rate (a sweep step)."""
        return LoadSpec.model_validate({**self.model_dump(), "rate": rate})


# -- arrivals and plan ----------------------------------------------------------------------------


def _gaps(rng: np.random.Generator, rate: float, burstiness: float, n: int) -> npt.NDArray[np.float64]:
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def arrival_offsets(
    rate: float, n: int, burstiness: float = 1.0, seed: int = 0, *, normalize: bool = False
) -> npt.NDArray[np.float64]:
    """Start offsets (s, cumulative) of ``n`` requests: gamma gaps of shape ``burstiness`` and scale
    ``1 / (rate * burstiness)``, so the mean rate is ``rate`` and the gaps' coefficient of
    variation is ``1 / sqrt(burstiness)``. ``rate=inf`` gives zeros. ``normalize`` rescales the
    offsets so the last is ``n / rate``, as ``vllm bench serve`` does.

    >>> arrival_offsets(10.0, 3, seed=1).round(3)
    array([0.107, 0.138, 0.676])
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not rate > 0 or not burstiness > 0:
        raise ValueError(f"rate and burstiness must be > 0, got {rate} and {burstiness}")
    if math.isinf(rate) or n == 0:
        return np.zeros(n)
    offsets = np.cumsum(_gaps(np.random.default_rng([seed, _ARRIVALS]), rate, burstiness, n))
    if normalize and offsets[-1] > 0:
        offsets *= (n / rate) / offsets[-1]
    return offsets


def _offsets_within(rate: float, duration_s: float, burstiness: float, seed: int) -> npt.NDArray[np.float64]:
    """Offsets of the same gamma process as `arrival_offsets`, up to ``duration_s`` inclusive."""
    rng = np.random.default_rng([seed, _ARRIVALS])
    chunk = max(16, math.ceil(rate * duration_s * 1.1))
    parts: list[npt.NDArray[np.float64]] = []
    last = 0.0
    while last <= duration_s:
        offsets = last + np.cumsum(_gaps(rng, rate, burstiness, chunk))
        parts.append(offsets)
        last = float(offsets[-1])
    offsets = np.concatenate(parts)
    return offsets[offsets <= duration_s]


@dataclass(frozen=True)
class PlannedRequest:
    """One request of a plan: what to send and when (offset from the run's start)."""

    index: int
    request_id: str
    workload: Workload
    scheduled_s: float
    input_lens: tuple[int, ...]  # one per text: a single prompt for LLM kinds
    max_tokens: int  # 0 for embeddings
    text_stream: int = _TEXT  # the random stream its text is drawn from
    probe: bool = False


def _assign(
    workloads: Sequence[Workload],
    offsets: npt.NDArray[np.float64],
    rng: np.random.Generator,
    prefix: str,
    text_stream: int,
) -> list[PlannedRequest]:
    n = len(offsets)
    weights = np.array([w.weight for w in workloads])
    choice = rng.choice(len(workloads), size=n, p=weights / weights.sum())
    inputs: list[tuple[int, ...]] = [()] * n
    outputs = np.zeros(n, dtype=np.int64)
    for k, w in enumerate(workloads):
        idx = np.flatnonzero(choice == k)
        per = w.texts_per_request if w.kind == "embedding" else 1
        lens = w.input_tokens.sample(rng, len(idx) * per).reshape(len(idx), per)
        for i, row in zip(idx, lens, strict=True):
            inputs[i] = tuple(int(x) for x in row)
        if w.kind != "embedding":
            outputs[idx] = np.maximum(w.output_tokens.sample(rng, len(idx)), 1)
    width = len(str(max(n - 1, 0)))
    return [
        PlannedRequest(
            index=i,
            request_id=f"{prefix}{i:0{width}d}",
            workload=workloads[choice[i]],
            scheduled_s=float(offsets[i]),
            input_lens=inputs[i],
            max_tokens=int(outputs[i]),
            text_stream=text_stream,
        )
        for i in range(n)
    ]


def plan_requests(spec: LoadSpec) -> list[PlannedRequest]:
    """The main requests of ``spec`` (no warm-up, no probes), in arrival order; deterministic."""
    if spec.num_requests is not None:
        offsets = arrival_offsets(spec.rate, spec.num_requests, spec.burstiness, spec.seed, normalize=True)
    else:
        assert spec.duration_s is not None
        offsets = _offsets_within(spec.rate, spec.duration_s, spec.burstiness, spec.seed)
    return _assign(spec.workloads, offsets, np.random.default_rng([spec.seed, _MIX]), "r", _TEXT)


def _warmup_plan(spec: LoadSpec) -> list[PlannedRequest]:
    offsets = np.zeros(spec.warmup_requests)
    return _assign(spec.workloads, offsets, np.random.default_rng([spec.seed, _WARMUP]), "w", _WARMUP)


_WORDS = (  # common short English words: about one token each in BPE, SentencePiece, WordPiece
    "the of and to in is was for on are as with his they at be this from have or by one had not but "
    "what all were when we there can an your which their said if do will each about how up out them "
    "then she many some so these would other into has more her two like him see time could no make "
    "than first been its who now people my made over did down only way find use may water long little "
    "very after words called just where most know get through back much go good new write our me man "
    "too any day same right look think also around another came come work three word must because does "
    "part even place well such here take why things help put years different away again off went old "
    "number great tell men say small every found still between name should home big give air line set "
    "own under read last never us left end along while might next sound below saw something thought "
    "both few those always looked show large often together asked house world going want school "
    "important until form food keep children feet land side without boy once animals life enough took "
    "four head above kind began almost live page got earth need far hand high year mother light parts "
    "country father let night picture being study second eyes soon times story boys since white days "
    "ever paper hard near better best across during today others sure means knew try told young miles "
    "sun ways thing whole hear example heard several change answer room sea against top turned learn "
    "point city play toward five using himself usually river music color stand question fish area mark "
    "dog horse birds problem complete ship half rock order fire south piece pass farm draw map rain rule "
    "plan cold notice voice power town fine drive stood contain front teach week final gave green quick"
)
_VOCAB = np.array(_WORDS.split())


def synthetic_text(n_tokens: int, *, seed: int = 0, key: Sequence[int] = ()) -> str:
    """About ``n_tokens`` tokens of English-like text (one short common word per token), drawn
    from ``seed`` and ``key``: the same arguments give the same text, different keys differ.

    >>> synthetic_text(5, seed=0, key=(1,))
    'got quick line must any'
    """
    rng = np.random.default_rng([seed, _TEXT, *key])
    return " ".join(_VOCAB[rng.integers(0, len(_VOCAB), size=max(n_tokens, 1))])


# -- results --------------------------------------------------------------------------------------

Status = Literal["ok", "error", "rejected"]


@dataclass(kw_only=True)
class RequestResult:
    """What one request did. Times are seconds; ``scheduled_s`` and ``start_s`` are offsets from
    the run's start, ``ttft_s`` and ``latency_s`` durations from ``start_s`` (the send)."""

    request_id: str
    workload: str
    kind: Literal["chat", "completion", "embedding"]
    model: str
    slo_class: str | None = None
    probe: bool = False
    scheduled_s: float = 0.0
    start_s: float = 0.0
    ttft_s: float | None = None  # first content chunk; the whole latency when not streamed
    itl_s: list[float] = field(default_factory=list)  # gaps between content chunks
    latency_s: float | None = None  # end to end (until the error, for a failed request)
    prompt_tokens: int = 0
    output_tokens: int = 0
    chunks: int = 0  # content chunks received (1 for a non-streamed answer with content)
    status: Status = "ok"
    http_status: int | None = None
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """vLLM's time per output token, ``(latency - ttft) / (output_tokens - 1)``; None unless a
        completed LLM request produced more than one token."""
        if (
            self.status != "ok"
            or self.kind == "embedding"
            or self.output_tokens <= 1
            or self.latency_s is None
            or self.ttft_s is None
        ):
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestResult:
        return cls(**data)


@dataclass
class LoadResult:
    """One run: every main and probe request (``probe=True``), the warm-up, and the duration from
    the first arrival until the last main request finished (vLLM's benchmark duration)."""

    results: list[RequestResult]
    duration_s: float
    warmup: list[RequestResult]
    spec: LoadSpec

    @property
    def main(self) -> list[RequestResult]:
        return [r for r in self.results if not r.probe]

    @property
    def probes(self) -> list[RequestResult]:
        return [r for r in self.results if r.probe]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (``rate=inf`` becomes ``"Infinity"``)."""
        return {
            "spec": json.loads(self.spec.model_dump_json()),
            "duration_s": self.duration_s,
            "results": [r.to_dict() for r in self.results],
            "warmup": [r.to_dict() for r in self.warmup],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadResult:
        return cls(
            results=[RequestResult.from_dict(r) for r in data["results"]],
            duration_s=float(data["duration_s"]),
            warmup=[RequestResult.from_dict(r) for r in data["warmup"]],
            spec=LoadSpec.model_validate(data["spec"]),
        )


# -- sending --------------------------------------------------------------------------------------


def _message(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 500 else text[:497] + "..."


async def _send(
    client: openai.AsyncOpenAI, planned: PlannedRequest, spec: LoadSpec, t0: float
) -> RequestResult:
    import openai

    w = planned.workload
    texts = [
        synthetic_text(n, seed=spec.seed, key=(spec.text_salt, planned.text_stream, planned.index, j))
        for j, n in enumerate(planned.input_lens)
    ]
    result = RequestResult(
        request_id=planned.request_id,
        workload=w.name,
        kind=w.kind,
        model=w.model,
        slo_class=w.slo_class,
        probe=planned.probe,
        scheduled_s=planned.scheduled_s,
        prompt_tokens=sum(planned.input_lens),  # replaced by the server's usage when it reports one
    )
    start = time.perf_counter()
    result.start_s = start - t0
    try:
        if w.kind == "embedding":
            await _embed(client, w, texts, result, start)
        elif w.stream:
            await _stream(client, w, texts[0], planned.max_tokens, result, start)
        else:
            await _whole(client, w, texts[0], planned.max_tokens, result, start)
        result.http_status = 200
    except openai.APIStatusError as exc:
        result.status = "rejected" if exc.status_code == 429 else "error"
        result.http_status = exc.status_code
        result.error = _message(exc)
    except openai.APITimeoutError:
        result.status, result.error = "error", f"timed out after {spec.request_timeout_s:g} s"
    except Exception as exc:  # every failure is a result, never the end of the run
        result.status, result.error = "error", f"{type(exc).__name__}: {_message(exc)}"
    if result.status != "ok":
        result.latency_s = time.perf_counter() - start
        result.ttft_s, result.itl_s = None, []
    return result


def _extra(w: Workload) -> dict[str, Any]:
    return {"extra_headers": w.headers() or None, "extra_body": w.extra_body or None}


async def _embed(
    client: openai.AsyncOpenAI, w: Workload, texts: list[str], result: RequestResult, start: float
) -> None:
    response = await client.embeddings.create(model=w.model, input=texts, **_extra(w))
    result.latency_s = result.ttft_s = time.perf_counter() - start
    if len(response.data) != len(texts):
        raise ValueError(f"asked for {len(texts)} embeddings, got {len(response.data)}")
    if response.usage is not None:
        result.prompt_tokens = response.usage.prompt_tokens


async def _stream(
    client: openai.AsyncOpenAI, w: Workload, text: str, max_tokens: int, result: RequestResult, start: float
) -> None:
    common: dict[str, Any] = {
        "model": w.model,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **_extra(w),
    }
    if w.kind == "chat":
        stream: Any = await client.chat.completions.create(
            messages=[{"role": "user", "content": text}], **common
        )
    else:
        stream = await client.completions.create(prompt=text, **common)
    last: float | None = None
    usage = None
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content = choice.delta.content if w.kind == "chat" else choice.text
        if not content:
            continue
        result.chunks += 1
        if last is None:
            result.ttft_s = now - start
        else:
            result.itl_s.append(now - last)
        last = now
    end = time.perf_counter()
    result.latency_s = end - start
    if result.ttft_s is None:  # an empty answer: its first (and only) response is the end
        result.ttft_s = result.latency_s
    _take_usage(result, usage)


async def _whole(
    client: openai.AsyncOpenAI, w: Workload, text: str, max_tokens: int, result: RequestResult, start: float
) -> None:
    common: dict[str, Any] = {"model": w.model, "max_tokens": max_tokens, "temperature": 0.0, **_extra(w)}
    content: str | None
    if w.kind == "chat":
        chat = await client.chat.completions.create(messages=[{"role": "user", "content": text}], **common)
        content, usage = chat.choices[0].message.content, chat.usage
    else:
        completion = await client.completions.create(prompt=text, **common)
        content, usage = completion.choices[0].text, completion.usage
    result.latency_s = result.ttft_s = time.perf_counter() - start
    result.chunks = 1 if content else 0
    _take_usage(result, usage)


def _take_usage(result: RequestResult, usage: Any) -> None:
    if usage is not None:
        result.prompt_tokens = int(usage.prompt_tokens)
        result.output_tokens = int(usage.completion_tokens)
    else:
        result.output_tokens = result.chunks


# -- running --------------------------------------------------------------------------------------


@contextmanager
def progress_bar(description: str = "requests") -> Iterator[ProgressCallback]:
    """A rich progress bar on stderr, as a `ProgressCallback`; ``progress=True`` uses it.

    >>> with progress_bar("sweep step 1") as update:  # doctest: +SKIP
    ...     result = run_load_sync(url, spec, progress=update)
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


async def _probe_loop(
    client: openai.AsyncOpenAI, spec: LoadSpec, t0: float, stop: asyncio.Event
) -> list[RequestResult]:
    assert spec.probe is not None
    workload = spec.probe.workload()
    rng = np.random.default_rng([spec.seed, _PROBE])
    tasks: list[asyncio.Task[RequestResult]] = []
    offset = 0.0
    while True:
        offset += float(rng.exponential(1.0 / spec.probe.rate))
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
        if stop.is_set():
            break
        i = len(tasks)
        planned = PlannedRequest(
            index=i,
            request_id=f"p{i:05d}",
            workload=workload,
            scheduled_s=offset,
            input_lens=(4,),
            max_tokens=1 if workload.kind == "chat" else 0,
            text_stream=_PROBE,
            probe=True,
        )
        tasks.append(asyncio.create_task(_send(client, planned, spec, t0)))
    return list(await asyncio.gather(*tasks))


async def _execute(
    base_url: str,
    spec: LoadSpec,
    plan: list[PlannedRequest],
    api_key: str | None,
    progress: ProgressCallback | None,
) -> LoadResult:
    import openai

    # No client-side connection cap (the SDK's default is 1000): open loop means a request goes out
    # when scheduled, as vLLM's unlimited aiohttp connector does; max_concurrency is the only cap.
    # (The limits class is taken from the SDK's own default: httpx or httpx2, by SDK version.)
    limits = type(openai.DEFAULT_CONNECTION_LIMITS)(
        max_connections=None, max_keepalive_connections=spec.max_concurrency or 1024
    )
    client = openai.AsyncOpenAI(
        base_url=base_url,
        api_key=api_key or "EMPTY",
        max_retries=0,
        timeout=spec.request_timeout_s,
        http_client=openai.DefaultAsyncHttpxClient(limits=limits, timeout=spec.request_timeout_s),
    )
    _ = (client.chat.completions, client.completions, client.embeddings)  # load the SDK's lazy modules now
    try:
        warmup = [await _send(client, p, spec, time.perf_counter()) for p in _warmup_plan(spec)]
        total, done = len(plan), 0
        if progress is not None:
            progress(0, total)
        slots = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None

        async def one(planned: PlannedRequest) -> RequestResult:
            nonlocal done
            if slots is None:
                result = await _send(client, planned, spec, t0)
            else:
                async with slots:
                    result = await _send(client, planned, spec, t0)
            done += 1
            if progress is not None:
                progress(done, total)
            return result

        stop = asyncio.Event()
        t0 = time.perf_counter()
        probes = asyncio.create_task(_probe_loop(client, spec, t0, stop)) if spec.probe else None
        tasks: list[asyncio.Task[RequestResult]] = []
        for planned in plan:
            delay = t0 + planned.scheduled_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(planned)))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - t0
        stop.set()
        if probes is not None:
            results += await probes
    finally:
        await client.close()
    return LoadResult(results=results, duration_s=duration, warmup=warmup, spec=spec)


async def run_load(
    base_url: str,
    spec: LoadSpec,
    api_key: str | None = None,
    progress: ProgressCallback | bool | None = None,
) -> LoadResult:
    """Run ``spec`` against the OpenAI-compatible ``base_url`` (``.../v1``); never raises for a
    failed request. ``progress``: a `ProgressCallback`, or True for a rich bar on stderr."""
    plan = plan_requests(spec)
    if progress is True:
        rate = "inf" if math.isinf(spec.rate) else f"{spec.rate:g}"
        with progress_bar(f"{rate} req/s") as update:
            return await _execute(base_url, spec, plan, api_key, update)
    return await _execute(base_url, spec, plan, api_key, progress or None)


def run_load_sync(
    base_url: str,
    spec: LoadSpec,
    api_key: str | None = None,
    progress: ProgressCallback | bool | None = None,
) -> LoadResult:
    """`run_load` on a fresh event loop (for sync code: Prefect tasks, scripts)."""
    return asyncio.run(run_load(base_url, spec, api_key, progress))


async def sweep(
    base_url: str,
    spec: LoadSpec,
    rates: Sequence[float],
    api_key: str | None = None,
    progress: ProgressCallback | bool | None = None,
    cooldown_s: float = 0.0,
) -> list[LoadResult]:
    """One run per rate, in order, each with ``spec``'s seed: the same arrivals (scaled), mix and
    lengths at each rate; the prompt text differs per step (``text_salt``), so no step hits the
    prefix cache another one filled."""
    out: list[LoadResult] = []
    for i, rate in enumerate(rates):
        if i and cooldown_s > 0:
            await asyncio.sleep(cooldown_s)
        step = spec.with_rate(rate).model_copy(update={"text_salt": spec.text_salt + i})
        out.append(await run_load(base_url, step, api_key, progress))
    return out


def sweep_sync(
    base_url: str,
    spec: LoadSpec,
    rates: Sequence[float],
    api_key: str | None = None,
    progress: ProgressCallback | bool | None = None,
    cooldown_s: float = 0.0,
) -> list[LoadResult]:
    """`sweep` on a fresh event loop."""
    return asyncio.run(sweep(base_url, spec, rates, api_key, progress, cooldown_s))
