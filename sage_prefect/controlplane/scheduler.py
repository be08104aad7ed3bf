"""The scheduler: a pure state machine. Events in, actions out; no I/O, no clocks, no threads.

The service feeds it `Submit`, `Done`, `Cancel`, `Tick`, `ReplicaUp`/`ReplicaDown`, `Load`
and, for replicas it starts and stops, `ReplicaStarted`/`ReplicaStartFailed`/`ReplicaRemoved`
events (each carrying the time ``now``) and carries out what it returns: `Dispatch` (run
these requests on that replica), `Reject` (answer 429/503 with ``Retry-After``), `Fail` (a
request that cannot be served any more), `WakeAt` (send a `Tick` then), and, for models with
a `ScalePolicy`, `ScaleUp` (start replicas) and `StopReplica` (stop a drained one).

Policies decide the order of waiting requests (each a small `Policy` object, `POLICIES`):

* ``fifo``      arrival order.
* ``priority``  the request's ``priority`` (lower first, as vLLM), then arrival.
* ``slo``       earliest deadline first; the deadline is arrival + the class's TTFT
                objective for LLM requests, + its end-to-end objective for embeddings.
* ``hybrid``    ``slo`` order, plus co-scheduling of LLM and embedding work that share a
                device: while an interactive LLM request there is in prefill (dispatched,
                no first token yet) no new embedding batch starts on that device, and on an
                accelerator, while such requests decode, embedding batches are cut to what
                fits in half the class's TPOT budget at the measured embedding speed, so
                decode steps are never stuck behind a long batch. On the CPU the OS
                time-slices the engines' threads instead of running one kernel at a time, so
                a batch never holds a decode step back and cutting it only costs throughput:
                there the LLM goes first by OS priority instead (the embedding engine computes
                at background priority under ``hybrid``; see ``config.py``) and batches keep
                their full size.

Embedding requests from many clients are coalesced into batches bounded by
``max_batch_size`` inputs and ``max_batch_tokens`` tokens; a batch that is not full waits
at most ``max_wait_ms`` for more work (less when a deadline is closer).

Admission control (on `Submit`): a class whose queue or token budget is full, or whose
deadline cannot be met at the measured speed, gets `Reject` with ``Retry-After``, so the
queue, and the memory it holds, stays bounded however much load arrives.

Cost per event does not grow with the queue. Each model's waiting requests are a binary heap
in policy order (`_Queue`): a dispatch pops the requests it starts (``O(k log n)`` for ``k``
of them), a cancelled request leaves a stale heap entry that is dropped when it reaches the
top, and the heap is rebuilt without them once they outnumber the live entries (so it holds
at most twice the waiting requests, and rebuilding costs ``O(1)`` amortised per cancel).
Requests that cannot go to a free replica (each one already failed there, ``excluded``) are
set aside and pushed back; an embedding batch that is not due yet is pushed back whole (that
only happens when everything waiting fits in one batch). Counts and tokens of waiting
requests are kept per model, per class, per (model, class) and per priority, so admission,
wait estimates and `Scheduler.queue_depth` never walk the queue.

Wait estimates (admission with ``reject_when_late``, ``Retry-After``) are for the request at
hand (its model, kind, class, priority and tokens) and are a lower bound: they count only the
waiting requests the policy certainly serves first (`Policy.ahead`: every one under ``fifo``;
those of the same or a more urgent priority under ``priority``; those of classes with the same
or a tighter objective under ``slo``/``hybrid``, which arrived earlier and so have an earlier
deadline), so a request is rejected only when its objective is out of reach even then.

* LLM: the running requests of a model finish about ``slots / s`` requests per second, where
  ``s`` is the exponential moving average of a request's seconds from dispatch to `Done` and
  ``slots`` the slots of its healthy replicas. Of the ``n`` requests ahead, ``free`` start at
  once; the other ``n - free`` have all started after ``(n - free) * s / slots`` seconds, and
  the request starts at the next completion after that, within a further ``s / slots`` (the
  requests running now are partly done, so that share is left out): the estimate is
  ``max(0, n - free) * s / slots``. With 4 s per request, 5 ahead and 1 busy slot: 20 s.
* Embeddings: the tokens ahead plus the request's own, over the summed measured tokens per
  second of the model's healthy replicas.

Only *serving* replicas (healthy, not draining) take new work or count in estimates. A model
whose replicas are down but one is restarting (`ReplicaDown` with ``restarting``) or starting
(asked for by `ScaleUp`, not yet back) keeps its queue: requests wait for it, bounded by
admission as ever, instead of failing with 503.

Autoscaling (`Scheduler.set_scaling`; a model without a `ScalePolicy` is never scaled). A
model's scaling is evaluated after scheduling, at most once per 0.25 s of ``now``; an event
in between asks for a wake-up then, and a pending scale-down timer or backoff asks for one
when it falls due, so every decision is taken without further traffic.

* *ready* = serving + restarting replicas; *starting* = asked for, and neither
  `ReplicaStarted` nor `ReplicaStartFailed` yet.
* *pressure*: over the classes with waiting requests of the model, the largest estimated wait
  of a new request of that class (no tokens) over the class's objective (TTFT for LLM, end to
  end for embeddings, else end to end; a class with neither is skipped). With no estimate (no
  speed measured yet) while every serving replica's slots are busy: ``2 * up_ratio``. With
  ``queue_per_replica`` set, at least ``waiting / serving / queue_per_replica * up_ratio``.
  Nothing waiting, or no serving replica (capacity is on its way, or the queue has failed):
  0.
* Up: below ``min_replicas`` (ready + starting), the missing ones are asked for. When the
  pressure exceeds ``up_ratio``: ``ceil(max(ready, 1) * pressure / up_ratio)`` replicas, at
  least ready + 1 when none is starting (while some start, only a larger proportional target
  asks for more), never more than ``max_replicas``; the `ScaleUp` asks for the difference to
  ready + starting and names the pressure. For ``retry_s`` after a `ReplicaStartFailed`, no
  `ScaleUp` for that model.
* Down: a model is quiet when nothing waits, nothing starts, ready > ``min_replicas``, at
  least two replicas serve, pressure <= ``down_ratio`` and the busy slots (running LLM
  requests, running embedding batches) fit in one serving replica fewer at half load. Once
  it has been quiet for ``down_delay_s`` without a break, and ``down_delay_s`` have passed
  since its last `ScaleUp` or `ReplicaStarted`, the serving replica with the least running
  work (of equals, the most recently added) drains: it takes no new work, and when its last
  running work is done (at once if idle) `StopReplica` goes out, once; the runtime answers
  `ReplicaRemoved`. The quiet period starts again, so replicas go one per ``down_delay_s``.
  A draining replica that is the only healthy one left is taken back instead.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

Kind = Literal["llm", "embedding"]


def is_cpu(device: str | None) -> bool:
    """Whether a replica's ``device`` is the CPU (``cpu``, ``cpu:0``): there the OS time-slices
    the engines' threads, so work on it runs side by side instead of one kernel at a time."""
    return device is not None and device.split(":", 1)[0].strip().lower() == "cpu"


@dataclass(frozen=True)
class SLOClass:
    """A latency class: objectives in milliseconds (None: no objective) and queue bounds."""

    name: str
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    max_queue: int = 1024
    max_queued_tokens: int = 2_000_000
    reject_when_late: bool = False  # reject at admission when the objective is already out of reach
    priority: int = 0


DEFAULT_CLASSES = {
    "interactive": SLOClass(
        "interactive", ttft_ms=1000, tpot_ms=200, e2e_ms=2_000, max_queue=256, priority=-1
    ),
    "batch": SLOClass("batch", e2e_ms=600_000, max_queue=4096, max_queued_tokens=8_000_000, priority=1),
}


@dataclass(frozen=True)
class BatchLimits:
    """How embedding requests are coalesced."""

    max_batch_size: int = 64
    max_batch_tokens: int = 16_384
    max_wait_ms: float = 5.0
    hybrid_min_batch_tokens: int = 256  # hybrid never cuts a batch below this many tokens


@dataclass
class Request:
    id: str
    model: str
    kind: Kind
    slo: str
    arrival: float
    tokens: int  # prompt tokens (LLM) or input tokens of all inputs (embedding)
    inputs: int = 1
    max_tokens: int = 0
    priority: int = 0
    attempts: int = 0
    excluded: set[str] = field(default_factory=set)  # replicas that failed it
    started: float = 0.0  # when it was last dispatched
    first_token: bool = False  # LLM: the engine has produced its first token (prefill done)


@dataclass
class Replica:
    id: str
    model: str
    kind: Kind
    slots: int = 1  # LLM: sequences at once; embedding: batches at once
    device: str | None = None  # replicas on the same device share compute (hybrid)
    healthy: bool = True
    draining: bool = False  # chosen to scale down: takes no new work, its running work finishes
    restarting: bool = False  # down, and the runtime is starting it again (see `ReplicaDown`)
    supervised: bool = False  # the runtime restarts it whenever it goes down (a placed replica)
    running: dict[str, Request] = field(default_factory=dict)
    batches: dict[int, tuple[list[str], float, int]] = field(default_factory=dict)  # id -> (reqs, t0, tokens)
    queue_depth: int = 0  # requests waiting inside the engine (an upstream's own queue)

    @property
    def busy(self) -> int:
        return len(self.batches) if self.kind == "embedding" else len(self.running)

    @property
    def free(self) -> int:
        return self.slots - self.busy if self.healthy and not self.draining else 0

    @property
    def load(self) -> float:
        return (len(self.running) + self.queue_depth) / max(1, self.slots)


# ---- events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Submit:
    request: Request
    now: float


@dataclass(frozen=True)
class Done:
    replica: str
    requests: tuple[str, ...]
    now: float
    failed: bool = False
    reason: str = ""


@dataclass(frozen=True)
class FirstToken:
    replica: str
    request: str
    now: float


@dataclass(frozen=True)
class Cancel:
    request: str
    now: float


@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class ReplicaDown:
    """A replica is out; ``restarting``: the runtime is starting it again (its Dask worker died),
    so the model's requests queue for it instead of failing with 503."""

    replica: str
    now: float
    reason: str = ""
    restarting: bool = False


@dataclass(frozen=True)
class ReplicaUp:
    """A replica is healthy again (this ends a restart)."""

    replica: str
    now: float


@dataclass(frozen=True)
class ReplicaStarted:
    """A replica the runtime started (after a `ScaleUp`, or on its own) is ready: registered as
    `Scheduler.add_replica` does; one fewer of its model is starting."""

    replica: Replica
    now: float


@dataclass(frozen=True)
class ReplicaStartFailed:
    """The runtime could not start one of the replicas a `ScaleUp` asked for."""

    model: str
    now: float
    reason: str = ""


@dataclass(frozen=True)
class ReplicaRemoved:
    """The runtime stopped a replica (after `StopReplica`, or lost it for good): it is forgotten,
    and later `Done` events from it are ignored."""

    replica: str
    now: float


@dataclass(frozen=True)
class Load:
    replica: str
    queue_depth: int
    now: float


Event = (
    Submit
    | Done
    | FirstToken
    | Cancel
    | Tick
    | ReplicaDown
    | ReplicaUp
    | Load
    | ReplicaStarted
    | ReplicaStartFailed
    | ReplicaRemoved
)

# ---- actions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Dispatch:
    replica: str
    requests: tuple[str, ...]
    batch: int = 0  # embedding batch id (0 for LLM requests)


@dataclass(frozen=True)
class Reject:
    request: str
    status: int
    code: str
    message: str
    retry_after: float


@dataclass(frozen=True)
class Fail:
    request: str
    status: int
    message: str


@dataclass(frozen=True)
class WakeAt:
    time: float


@dataclass(frozen=True)
class ScaleUp:
    """Start ``count`` more replicas of ``model``; each answers with `ReplicaStarted` or
    `ReplicaStartFailed`."""

    model: str
    count: int
    reason: str


@dataclass(frozen=True)
class StopReplica:
    """A draining replica has no work left: stop it and answer with `ReplicaRemoved`."""

    replica: str
    reason: str


Action = Dispatch | Reject | Fail | WakeAt | ScaleUp | StopReplica


@dataclass(frozen=True)
class ScalePolicy:
    """How one model's replicas are scaled (see "Autoscaling" in the module docstring).

    ``up_ratio`` and ``down_ratio`` are pressures (estimated wait over the class's objective);
    ``queue_per_replica``, when set, makes that many waiting requests per serving replica count
    as pressure ``up_ratio``; ``retry_s``: no `ScaleUp` for that long after `ReplicaStartFailed`."""

    min_replicas: int = 1
    max_replicas: int = 1
    up_ratio: float = 0.5
    down_ratio: float = 0.1
    down_delay_s: float = 60.0
    queue_per_replica: float | None = None
    retry_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(
                f"scaling needs 0 <= min_replicas <= max_replicas, got {self.min_replicas} and {self.max_replicas}"
            )
        if not 0 <= self.down_ratio < self.up_ratio:
            raise ValueError(
                f"scaling needs 0 <= down_ratio < up_ratio, got {self.down_ratio} and {self.up_ratio}"
            )
        if self.down_delay_s < 0 or self.retry_s < 0:
            raise ValueError(
                f"down_delay_s and retry_s must be >= 0, got {self.down_delay_s} and {self.retry_s}"
            )
        if self.queue_per_replica is not None and self.queue_per_replica <= 0:
            raise ValueError(f"queue_per_replica must be > 0, got {self.queue_per_replica}")


_NO_SCALING = ScalePolicy(min_replicas=0, max_replicas=0)  # scaling_state of a model without a policy
_SCALE_INTERVAL_S = 0.25  # a model's scaling is evaluated at most once per this many seconds of ``now``


class _Rate:
    """Tokens per second of one replica: exponentially decayed tokens over decayed seconds.

    A ratio of sums, not an average of per-batch rates: a batch of one 3-token input costs a
    fixed ~20-60 ms however few its tokens, so its own rate (~100 tokens/s) says nothing of
    what a full batch does (thousands), and averaging such rates made a lone request look
    15 s late. Weighted by their tokens, small batches barely move the figure."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self._tokens = 0.0
        self._seconds = 0.0
        self.value: float | None = None

    def observe(self, tokens: int, seconds: float) -> None:
        if seconds <= 0 or tokens <= 0:
            return
        keep = 1 - self.alpha
        self._tokens = keep * self._tokens + tokens
        self._seconds = keep * self._seconds + seconds
        self.value = self._tokens / self._seconds


class _Mean:
    """Exponential moving average of a quantity (an LLM model's seconds per request)."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def observe(self, x: float) -> None:
        self.value = x if self.value is None else self.alpha * x + (1 - self.alpha) * self.value


# ---- queues ---------------------------------------------------------------------------

# (*policy key, sequence number, request), flat (a nested key tuple makes every comparison in
# the heap ~40 % slower): the sequence number is unique, so entries never compare requests, and
# it tells a live entry from a stale one left behind by a cancel
_Entry = tuple[Any, ...]
_K = TypeVar("_K", str, int)


class _Queue:
    """The waiting requests of one model: a heap in policy order with lazy removal, and running
    counts and tokens (in all, per class and per priority).

    Every waiting request has exactly one live entry, ``live[id] == seq``; any other entry in
    ``heap`` is stale (its request was cancelled) and is skipped when it reaches the top. While a
    dispatch holds popped entries, those requests are out of the heap but still ``live``."""

    __slots__ = ("heap", "live", "tokens", "by_class", "by_priority")

    def __init__(self) -> None:
        self.heap: list[_Entry] = []
        self.live: dict[str, int] = {}  # request id -> seq of its live entry (arrival order)
        self.tokens = 0
        self.by_class: dict[str, list[int]] = {}  # slo class -> [requests, tokens]
        self.by_priority: dict[int, list[int]] = {}  # priority -> [requests, tokens]

    def __len__(self) -> int:
        return len(self.live)

    @property
    def stale(self) -> int:
        """Stale entries in the heap (exact when no dispatch holds popped entries)."""
        return len(self.heap) - len(self.live)

    def add(self, req: Request, key: tuple[float, ...], seq: int) -> None:
        self.live[req.id] = seq
        heapq.heappush(self.heap, (*key, seq, req))
        self._count(req, 1)

    def remove(self, req: Request) -> bool:
        """Take ``req`` out of the queue's accounting (its entry, if still in the heap, goes
        stale); False when it is not waiting here."""
        if self.live.pop(req.id, None) is None:
            return False
        self._count(req, -1)
        return True

    def tidy(self) -> None:
        """Rebuild the heap without stale entries once they outnumber live ones (call it when
        no dispatch holds popped entries). Each stale entry is dropped once, and a rebuild
        costs less than twice the stale entries it drops: O(1) amortised per cancel, and the
        heap never holds more than twice the waiting requests."""
        if self.stale > len(self.live):
            live = self.live
            self.heap = [e for e in self.heap if live.get(e[-1].id) == e[-2]]
            heapq.heapify(self.heap)

    def top(self) -> _Entry | None:
        """The first live entry (stale ones above it are dropped), left in the heap."""
        heap, live = self.heap, self.live
        while heap:
            entry = heap[0]
            if live.get(entry[-1].id) == entry[-2]:
                return entry
            heapq.heappop(heap)
        return None

    def pop(self) -> _Entry | None:
        """The first live entry, taken out of the heap (the request stays ``live`` until it is
        started with `remove` or put back with `push`)."""
        entry = self.top()
        if entry is not None:
            heapq.heappop(self.heap)
        return entry

    def push(self, entries: list[_Entry]) -> None:
        """Put popped entries back (same key and sequence number: same place in the order)."""
        for entry in entries:
            heapq.heappush(self.heap, entry)

    def clear(self) -> list[Request]:
        """Empty the queue; the requests that were waiting, in the order they were queued."""
        by_id = {e[-1].id: e[-1] for e in self.heap if self.live.get(e[-1].id) == e[-2]}
        waiting = [by_id[rid] for rid in self.live]
        self.heap, self.live, self.tokens = [], {}, 0
        self.by_class.clear()
        self.by_priority.clear()
        return waiting

    def _count(self, req: Request, sign: int) -> None:
        self.tokens += sign * req.tokens
        _tally(self.by_class, req.slo, sign, req.tokens)
        _tally(self.by_priority, req.priority, sign, req.tokens)


def _tally(counts: dict[_K, list[int]], key: _K, sign: int, tokens: int) -> None:
    """Add (``sign`` +1) or take away (-1) one request of ``tokens`` under ``key``; a key whose
    count drops to zero is removed, so the dict holds only what is waiting."""
    entry = counts.get(key)
    if entry is None:
        entry = counts[key] = [0, 0]
    entry[0] += sign
    entry[1] += sign * tokens
    if entry[0] == 0:
        del counts[key]


# ---- policies -------------------------------------------------------------------------


class Policy:
    """The order of waiting requests: ``key`` sorts them (smallest first; ties go in the
    order they were queued), ``ahead`` counts the waiting requests certainly served before a
    new one, and ``co_schedules`` turns on hybrid's co-scheduling of LLM and embedding work."""

    name: ClassVar[str]
    co_schedules: ClassVar[bool] = False

    def key(self, request: Request, deadline: float) -> tuple[float, ...]:
        raise NotImplementedError

    def ahead(self, queue: _Queue, request: Request, offset: Callable[[str], float]) -> tuple[int, int]:
        """(requests, tokens) of ``queue`` that go before ``request`` were it queued now (its
        arrival is now, so every waiting request arrived no later); ``offset(slo)``: a class's
        deadline offset in seconds for the request's kind. A lower bound where not exact."""
        return len(queue), queue.tokens


class FifoPolicy(Policy):
    name = "fifo"

    def key(self, request: Request, deadline: float) -> tuple[float, ...]:
        return (request.arrival,)


class PriorityPolicy(Policy):
    name = "priority"

    def key(self, request: Request, deadline: float) -> tuple[float, ...]:
        return (float(request.priority), request.arrival)

    def ahead(self, queue: _Queue, request: Request, offset: Callable[[str], float]) -> tuple[int, int]:
        # the same or a lower priority value (equal ones arrived earlier); one term per distinct
        # priority waiting, which is a handful in practice (the classes' and API keys' defaults)
        n = tokens = 0
        for priority, (count, tok) in queue.by_priority.items():
            if priority <= request.priority:
                n += count
                tokens += tok
        return n, tokens


class SLOPolicy(Policy):
    name = "slo"

    def key(self, request: Request, deadline: float) -> tuple[float, ...]:
        return (deadline, float(request.priority), request.arrival)

    def ahead(self, queue: _Queue, request: Request, offset: Callable[[str], float]) -> tuple[int, int]:
        # classes with the same or a tighter objective: they arrived earlier, so their deadlines
        # are no later. Requests of looser classes that have waited long enough go first too;
        # they are not counted (the estimate stays a lower bound). One term per class.
        own = offset(request.slo)
        n = tokens = 0
        for slo, (count, tok) in queue.by_class.items():
            if offset(slo) <= own:
                n += count
                tokens += tok
        return n, tokens


class HybridPolicy(SLOPolicy):
    name = "hybrid"
    co_schedules = True


# name -> policy class; iterating it gives the names (``policy in POLICIES``, ``", ".join(POLICIES)``)
POLICIES: dict[str, type[Policy]] = {p.name: p for p in (FifoPolicy, PriorityPolicy, SLOPolicy, HybridPolicy)}


@dataclass(frozen=True)
class _Plan:
    """One model's scaling figures (`Scheduler._plan`)."""

    serving: list[Replica]
    ready: int  # serving + restarting
    starting: int
    waiting: int
    pressure: float
    desired: int
    why: str  # the reason a ScaleUp to ``desired`` would give


class Scheduler:
    """See the module docstring. Not thread-safe: one caller feeds events in order."""

    def __init__(
        self,
        policy: str = "fifo",
        classes: dict[str, SLOClass] | None = None,
        batching: BatchLimits | None = None,
        max_attempts: int = 3,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r}; expected one of {', '.join(POLICIES)}")
        self.ordering: Policy = POLICIES[policy]()
        self.classes = dict(classes or DEFAULT_CLASSES)
        self.batching = batching or BatchLimits()
        self.max_attempts = max_attempts
        self.replicas: dict[str, Replica] = {}
        self.requests: dict[str, Request] = {}  # waiting or running
        self._queues: dict[str, _Queue] = {}  # model -> its waiting requests
        self._by_model: dict[str, list[Replica]] = {}  # model -> its replicas
        self._models: list[str] = []  # LLM models first (hybrid: embedding batches yield to them)
        self._seq = itertools.count()
        self._batch_ids = itertools.count(1)
        self._rates: dict[str, _Rate] = {}  # embedding replicas: tokens per second
        self._batch_tokens: dict[str, _Mean] = {}  # embedding models: tokens per dispatched batch
        self._llm_seconds: dict[str, _Mean] = {}  # LLM models: seconds per request, dispatch to Done
        self._class_waiting: dict[str, int] = {}  # waiting requests per class, all models
        self._class_tokens: dict[str, int] = {}
        self._wake: float | None = None
        # autoscaling (models with a ScalePolicy only)
        self._scaling: dict[str, ScalePolicy] = {}
        self._starting: dict[str, int] = {}  # model -> replicas asked for, not yet started or failed
        self._retry_at: dict[str, float] = {}  # model -> no ScaleUp before this (after a failed start)
        self._last_up: dict[str, float] = {}  # model -> its last ScaleUp or ReplicaStarted
        self._quiet_since: dict[str, float] = {}  # model -> since when it could do with one replica fewer
        self._evaluated: dict[str, float] = {}  # model -> when its scaling was last evaluated
        self._drains: dict[str, str] = {}  # draining replica -> reason, until its StopReplica goes out

    @property
    def policy(self) -> str:
        """The policy's name (``fifo``, ``priority``, ``slo``, ``hybrid``)."""
        return self.ordering.name

    # ---- configuration ---------------------------------------------------------------

    def add_replica(self, replica: Replica) -> None:
        if replica.id in self.replicas:
            raise ValueError(f"replica {replica.id!r} is already registered")
        self.replicas[replica.id] = replica
        self._rates[replica.id] = _Rate()
        self._queues.setdefault(replica.model, _Queue())
        self._by_model.setdefault(replica.model, []).append(replica)
        if replica.model not in self._models:
            self._models.append(replica.model)
            self._models.sort(key=lambda m: self._kind_of(m) != "llm")  # stable: else registration order

    def set_scaling(self, model: str, policy: ScalePolicy) -> None:
        """Scale ``model`` by ``policy`` from the next event on. The model needs no replica yet:
        below ``min_replicas`` the scheduler asks for them (`ScaleUp`), and its requests queue
        while they start."""
        self._scaling[model] = policy
        self._queues.setdefault(model, _Queue())
        self._by_model.setdefault(model, [])

    def slo_class(self, name: str) -> SLOClass:
        return self.classes[name]

    # ---- introspection (metrics) -----------------------------------------------------

    def queue_depth(self, model: str | None = None, slo: str | None = None) -> int:
        if model is None:
            if slo is None:
                return sum(len(q) for q in self._queues.values())
            return self._class_waiting.get(slo, 0)
        queue = self._queues.get(model)
        if queue is None:
            return 0
        if slo is None:
            return len(queue)
        counts = queue.by_class.get(slo)
        return counts[0] if counts else 0

    def embedding_rate(self, replica: str) -> float | None:
        return self._rates[replica].value

    def scaled_models(self) -> list[str]:
        """The models with a `ScalePolicy`, in the order they got one."""
        return list(self._scaling)

    def scaling_state(self, model: str) -> dict[str, float]:
        """``ready`` (serving + restarting replicas), ``starting``, ``draining``, ``pressure`` and
        ``desired`` (the replicas the rule wants now, backoff aside) of ``model``; a model without
        a policy reports its pressure and ``desired == ready + starting``."""
        plan = self._plan(model, self._scaling.get(model, _NO_SCALING))
        return {
            "ready": plan.ready,
            "starting": plan.starting,
            "draining": sum(r.draining for r in self._by_model.get(model, ())),
            "pressure": plan.pressure,
            "desired": plan.desired,
        }

    # ---- the state machine -----------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        actions: list[Action] = []
        if isinstance(event, Submit):
            self._submit(event, actions)
        elif isinstance(event, Done):
            self._done(event, actions)
        elif isinstance(event, FirstToken):
            running = self.replicas[event.replica].running if event.replica in self.replicas else {}
            if event.request in running:
                running[event.request].first_token = True
        elif isinstance(event, Cancel):
            self._cancel(event.request)
        elif isinstance(event, ReplicaDown):
            self._down(event.replica, event.reason or "replica failed", actions, event.restarting)
        elif isinstance(event, ReplicaUp):
            if event.replica in self.replicas:
                self.replicas[event.replica].healthy = True
                self.replicas[event.replica].restarting = False
        elif isinstance(event, Load) and event.replica in self.replicas:
            self.replicas[event.replica].queue_depth = max(0, event.queue_depth)
        elif isinstance(event, Tick):
            # the wake-up asked for has come: a batch still not due (a timer that fired a little
            # early: uvloop's have millisecond resolution) needs a new WakeAt, even for the same time
            self._wake = None
        elif isinstance(event, ReplicaStarted):
            self._started(event)
        elif isinstance(event, ReplicaStartFailed):
            self._start_failed(event, actions)
        elif isinstance(event, ReplicaRemoved):
            self._remove(event.replica, actions)
        wake = self._schedule(event.now, actions)
        if self._scaling:
            at = self._autoscale(event.now, actions)
            if at is not None and (wake is None or at < wake):
                wake = at
        if wake is not None and wake != self._wake:
            actions.append(WakeAt(wake))
        self._wake = wake
        return actions

    # ---- events ----------------------------------------------------------------------

    def _submit(self, event: Submit, actions: list[Action]) -> None:
        req = event.request
        if req.id in self.requests:
            raise ValueError(f"request id {req.id!r} is already known")
        cls = self.classes.get(req.slo)
        if cls is None:
            raise ValueError(f"unknown SLO class {req.slo!r}")
        standing = self._standing(req.model, req.kind)
        if standing == 404:
            actions.append(Fail(req.id, 404, f"no {req.kind} engine serves model {req.model!r}"))
            return
        if standing == 503:
            actions.append(
                Reject(req.id, 503, "no_healthy_replica", f"every replica of {req.model!r} is down", 5.0)
            )
            return
        reject = self._admission(req, cls)
        if reject is not None:
            actions.append(reject)
            return
        self._enqueue(req)

    def admission(self, model: str, kind: Kind, slo: str) -> Reject | None:
        """What `Submit` would answer a request of ``model``/``kind``/``slo`` with no tokens of its
        own: a `Reject`, or None. Read-only; the gateway asks before it tokenises a request, so
        a refusal under overload costs the least."""
        cls = self.classes.get(slo)
        if cls is None or self._standing(model, kind):
            return None  # Submit gives the exact answer
        return self._admission(Request("_", model, kind, slo, 0.0, 0), cls)

    def _standing(self, model: str, kind: Kind) -> int:
        """404 when ``model`` has no ``kind`` replica (a model whose replicas all are yet to start
        takes either kind), 503 when none serves and none is restarting or starting, else 0."""
        known = self._by_model.get(model)
        if known is None:
            return 404
        replicas = [r for r in known if r.kind == kind]
        if known and not replicas:
            return 404
        if any(r.healthy and not r.draining for r in replicas) or self._pending(model):
            return 0
        return 503

    def _admission(self, req: Request, cls: SLOClass) -> Reject | None:
        """Admission control for ``req`` in class ``cls``: a full queue or token budget, or an
        estimated wait past the class's objective (``reject_when_late``)."""
        waiting = self._class_waiting.get(cls.name, 0)
        if waiting >= cls.max_queue:
            return Reject(
                req.id,
                429,
                "queue_full",
                f"the {cls.name!r} queue is full ({waiting} waiting requests, max_queue {cls.max_queue})",
                self._retry_after(req),
            )
        queued = self._class_tokens.get(cls.name, 0)
        if queued + req.tokens > cls.max_queued_tokens:
            return Reject(
                req.id,
                429,
                "token_budget_full",
                f"the {cls.name!r} queue holds {queued} tokens; {req.tokens} more exceed "
                f"max_queued_tokens {cls.max_queued_tokens}",
                self._retry_after(req),
            )
        if cls.reject_when_late:
            objective = cls.e2e_ms if req.kind == "embedding" else cls.ttft_ms
            estimate = self._estimated_wait(req)
            if objective is not None and estimate is not None and estimate * 1000 > objective:
                return Reject(
                    req.id,
                    429,
                    "deadline_unreachable",
                    f"the estimated wait ({estimate * 1000:.0f} ms) exceeds the {cls.name!r} objective "
                    f"({objective:.0f} ms)",
                    max(1.0, estimate),
                )
        return None

    def _done(self, event: Done, actions: list[Action]) -> None:
        replica = self.replicas.get(event.replica)
        if replica is None:
            return
        done = set(event.requests)
        finished: list[Request] = []
        for batch_id, (ids, started, tokens) in list(replica.batches.items()):
            if not done.isdisjoint(ids):
                del replica.batches[batch_id]
                if not event.failed:
                    self._rates[replica.id].observe(tokens, event.now - started)
        for rid in event.requests:
            req = replica.running.pop(rid, None)
            if req is not None:
                finished.append(req)
        if not event.failed:
            for req in finished:
                self.requests.pop(req.id, None)
                if req.kind == "llm" and event.now > req.started:
                    self._llm_seconds.setdefault(req.model, _Mean()).observe(event.now - req.started)
        else:
            for req in finished:
                self._retry(req, replica.id, event.reason, actions)
            self._down(replica.id, event.reason or "request failed on this replica", actions)
        if replica.draining:
            self._stop_if_idle(replica, actions)

    def _cancel(self, rid: str) -> None:
        req = self.requests.get(rid)
        if req is None:
            return
        queue = self._queues[req.model]
        if queue.remove(req):
            queue.tidy()
            self._uncount(req)
            del self.requests[rid]
        # a running request is finished by the engine; its Done event clears it

    def _down(self, replica_id: str, reason: str, actions: list[Action], restarting: bool = False) -> None:
        replica = self.replicas.get(replica_id)
        if replica is None:
            return
        replica.healthy = False
        replica.restarting = replica.restarting or restarting or replica.supervised
        # Work already running there stays accounted to it: the runtime reports each request's
        # own `Done` (``failed`` -> retried elsewhere, or finished if it completed after all).
        # Re-queueing it here would dispatch a request twice while its first run still goes on.
        self._lost(replica.model, f"every replica of {replica.model!r} is down ({reason})", actions)

    def _lost(self, model: str, message: str, actions: list[Action]) -> None:
        """``model`` lost a replica: with none serving, a drain not yet stopped is called off (that
        replica is all there is); with none serving, restarting or starting either, its waiting
        requests fail with 503 and ``message``."""
        replicas = self._by_model.get(model, ())
        if any(r.healthy and not r.draining for r in replicas):
            return
        for r in replicas:
            if r.draining and r.healthy and self._drains.pop(r.id, None) is not None:
                r.draining = False
                return
        if self._pending(model):
            return
        for req in self._queues[model].clear():
            self._uncount(req)
            del self.requests[req.id]
            actions.append(Fail(req.id, 503, message))

    def _pending(self, model: str) -> bool:
        """Whether replicas of ``model`` are on their way: restarting, or asked for and starting."""
        if self._starting.get(model, 0) > 0:
            return True
        return any(r.restarting and not r.draining for r in self._by_model.get(model, ()))

    def _started(self, event: ReplicaStarted) -> None:
        model = event.replica.model
        self.add_replica(event.replica)
        if self._starting.get(model, 0) > 0:
            self._starting[model] -= 1
        self._last_up[model] = event.now

    def _start_failed(self, event: ReplicaStartFailed, actions: list[Action]) -> None:
        model = event.model
        if self._starting.get(model, 0) > 0:
            self._starting[model] -= 1
        self._retry_at[model] = event.now + self._scaling.get(model, _NO_SCALING).retry_s
        if model in self._queues:
            self._lost(
                model, f"no replica of {model!r} could be started ({event.reason or 'start failed'})", actions
            )

    def _remove(self, replica_id: str, actions: list[Action]) -> None:
        """Forget a replica the runtime stopped; the work still running there is retried (its
        `Done` will never come, or is ignored)."""
        replica = self.replicas.pop(replica_id, None)
        if replica is None:
            return
        self._by_model[replica.model].remove(replica)
        del self._rates[replica_id]
        self._drains.pop(replica_id, None)
        for req in replica.running.values():
            self._retry(req, None, "its replica was removed", actions)
        self._lost(replica.model, f"every replica of {replica.model!r} is gone", actions)

    def _retry(self, req: Request, replica_id: str | None, reason: str, actions: list[Action]) -> None:
        if replica_id is not None:
            req.excluded.add(replica_id)
        if req.attempts >= self.max_attempts:
            self.requests.pop(req.id, None)
            actions.append(Fail(req.id, 503, f"failed on {req.attempts} replicas; last: {reason}"))
            return
        self._enqueue(req)

    # ---- queues ----------------------------------------------------------------------

    def _offset(self, slo: str, kind: Kind) -> float:
        """Seconds from arrival to the deadline of a request of class ``slo`` and ``kind``."""
        cls = self.classes[slo]
        objective = cls.ttft_ms if kind == "llm" else cls.e2e_ms
        if objective is None:
            objective = cls.e2e_ms
        return objective / 1000 if objective is not None else 3600.0

    def _deadline(self, req: Request) -> float:
        return req.arrival + self._offset(req.slo, req.kind)

    def _enqueue(self, req: Request) -> None:
        self.requests[req.id] = req
        self._queues[req.model].add(req, self.ordering.key(req, self._deadline(req)), next(self._seq))
        self._class_waiting[req.slo] = self._class_waiting.get(req.slo, 0) + 1
        self._class_tokens[req.slo] = self._class_tokens.get(req.slo, 0) + req.tokens

    def _uncount(self, req: Request) -> None:
        """Take a request that left its model's queue out of the per-class counts."""
        self._class_waiting[req.slo] -= 1
        self._class_tokens[req.slo] -= req.tokens

    def _ordered(self, model: str) -> Iterator[Request]:
        """Waiting requests of a model in policy order: O(n log n), for tests and debugging
        only (the scheduler itself never walks the queue)."""
        queue = self._queues.get(model)
        if queue is None:
            return iter(())
        return (e[-1] for e in sorted(queue.heap) if queue.live.get(e[-1].id) == e[-2])

    # ---- dispatch --------------------------------------------------------------------

    def _schedule(self, now: float, actions: list[Action]) -> float | None:
        """Dispatch what can start now; the time a waiting embedding batch falls due, if any."""
        wake: float | None = None
        for model in self._models:  # LLM models first
            queue = self._queues[model]
            if not queue.live:
                continue
            replicas = self._serving(model)
            if not replicas:
                continue
            if replicas[0].kind == "llm":
                self._schedule_llm(model, replicas, now, actions)
            else:
                at = self._schedule_embedding(model, replicas, now, actions)
                if at is not None:
                    wake = at if wake is None else min(wake, at)
            queue.tidy()  # dispatched requests leave the live ones; stale entries may now outnumber them
        return wake

    def _serving(self, model: str) -> list[Replica]:
        """The replicas of ``model`` that take new work: healthy and not draining."""
        return [r for r in self._by_model.get(model, ()) if r.healthy and not r.draining]

    def _kind_of(self, model: str) -> Kind:
        replicas = self._by_model.get(model)
        return replicas[0].kind if replicas else "llm"

    def _schedule_llm(self, model: str, replicas: list[Replica], now: float, actions: list[Action]) -> None:
        free = [r for r in replicas if r.free > 0]
        if not free:
            return
        queue = self._queues[model]
        aside: list[_Entry] = []  # requests that failed on every free replica: pushed back below
        while free:
            entry = queue.pop()
            if entry is None:
                break
            req = entry[-1]
            candidates = [r for r in free if r.id not in req.excluded]
            if not candidates and all(r.id in req.excluded for r in replicas):
                req.excluded.clear()  # every healthy replica failed it once: try them again
                candidates = free
            if not candidates:
                aside.append(entry)
                continue
            replica = min(candidates, key=lambda r: (r.load, r.id))
            self._start(req, replica, now)
            actions.append(Dispatch(replica.id, (req.id,)))
            if replica.free <= 0:
                free.remove(replica)
        queue.push(aside)

    def _schedule_embedding(
        self, model: str, replicas: list[Replica], now: float, actions: list[Action]
    ) -> float | None:
        limits = self.batching
        queue = self._queues[model]
        while True:
            free = [r for r in replicas if r.free > 0 and not self._device_held(r)]
            if not free:
                return None
            replica = min(free, key=lambda r: (r.busy, r.load, r.id))
            token_cap = self._token_cap(replica)
            batch: list[_Entry] = []
            aside: list[_Entry] = []  # failed on this replica (and another one is healthy)
            tokens = inputs = 0
            full = False
            while (entry := queue.top()) is not None:
                req = entry[-1]
                if replica.id in req.excluded and len(req.excluded) < len(replicas):
                    aside.append(heapq.heappop(queue.heap))
                    continue
                if batch and (inputs + req.inputs > limits.max_batch_size or tokens + req.tokens > token_cap):
                    full = True
                    break
                batch.append(heapq.heappop(queue.heap))  # `entry`, the top
                tokens += req.tokens
                inputs += req.inputs
            queue.push(aside)
            if not batch:
                return None
            requests = [e[-1] for e in batch]
            if not (full or inputs >= limits.max_batch_size or tokens >= token_cap):
                # not full: everything waiting fits in it (the heap is empty but for `aside`)
                due = min(r.arrival for r in requests) + limits.max_wait_ms / 1000
                service = self._service_time(replica, tokens)
                due = min(due, *(self._deadline(r) - service for r in requests))
                if now < due:
                    queue.push(batch)  # not due yet: the queue is left as it was
                    return due
            batch_id = next(self._batch_ids)
            for req in requests:
                self._start(req, replica, now)
            replica.batches[batch_id] = ([r.id for r in requests], now, tokens)
            self._batch_tokens.setdefault(model, _Mean()).observe(tokens)
            actions.append(Dispatch(replica.id, tuple(r.id for r in requests), batch_id))

    def _start(self, req: Request, replica: Replica, now: float) -> None:
        self._queues[req.model].remove(req)
        self._uncount(req)
        req.attempts += 1
        req.started = now
        req.first_token = False
        replica.running[req.id] = req

    # ---- hybrid co-scheduling --------------------------------------------------------

    def _interactive_llm(self, device: str) -> tuple[int, int, float | None]:
        """LLM work with latency objectives on a device: (requests before their first token,
        requests decoding, tightest TPOT objective in seconds)."""
        prefill = decoding = 0
        tpot: float | None = None
        for replica in self.replicas.values():
            if replica.device != device or replica.kind != "llm" or not replica.healthy:
                continue
            for req in replica.running.values():
                cls = self.classes[req.slo]
                if cls.ttft_ms is None and cls.tpot_ms is None:
                    continue
                if not req.first_token and cls.ttft_ms is not None:
                    prefill += 1
                else:
                    decoding += 1
                if cls.tpot_ms is not None:
                    tpot = min(tpot or math.inf, cls.tpot_ms / 1000)
        return prefill, decoding, tpot

    def _device_held(self, replica: Replica) -> bool:
        """hybrid: no new embedding batch on a device while an interactive LLM request there
        waits for its first token (its prefill gets the device to itself)."""
        if not self.ordering.co_schedules or replica.device is None:
            return False
        prefill, _, _ = self._interactive_llm(replica.device)
        return prefill > 0

    def _token_cap(self, replica: Replica) -> int:
        cap = self.batching.max_batch_tokens
        if not self.ordering.co_schedules or replica.device is None or is_cpu(replica.device):
            return cap  # on CPU a running batch shares the cores with decode steps, not blocks them
        _, decoding, tpot = self._interactive_llm(replica.device)
        rate = self._rates[replica.id].value
        if decoding == 0 or tpot is None or rate is None:
            return cap
        # a batch should take no longer than half a TPOT budget, so a decode step waits < 1 budget
        return max(self.batching.hybrid_min_batch_tokens, min(cap, int(rate * tpot * 0.5)))

    # ---- autoscaling (see the module docstring) --------------------------------------

    def _autoscale(self, now: float, actions: list[Action]) -> float | None:
        """Evaluate every model with a policy that was not evaluated in the last
        `_SCALE_INTERVAL_S`; the earliest time a decision may fall due (a scale-down timer, the
        end of a backoff, or the next evaluation of a model skipped now)."""
        wake: float | None = None
        for model, policy in self._scaling.items():
            last = self._evaluated.get(model)
            if last is not None and now < last + _SCALE_INTERVAL_S:
                at: float | None = last + _SCALE_INTERVAL_S  # this event may have changed something
            else:
                self._evaluated[model] = now
                at = self._evaluate(model, policy, now, actions)
                if at is not None:
                    at = max(at, now + _SCALE_INTERVAL_S)
            if at is not None and (wake is None or at < wake):
                wake = at
        return wake

    def _evaluate(self, model: str, policy: ScalePolicy, now: float, actions: list[Action]) -> float | None:
        """Apply the rule to ``model`` now; when a decision is due later, that time."""
        plan = self._plan(model, policy)
        more = plan.desired - plan.ready - plan.starting
        if more > 0:
            self._quiet_since.pop(model, None)
            retry_at = self._retry_at.get(model, -math.inf)
            if now < retry_at:
                return retry_at  # backing off after a failed start
            actions.append(ScaleUp(model, more, plan.why))
            self._starting[model] = plan.starting + more
            self._last_up[model] = now
            return None
        serving = plan.serving
        n = len(serving)
        quiet = (
            not plan.waiting
            and plan.starting == 0
            and plan.ready > policy.min_replicas
            and n >= 2
            and plan.pressure <= policy.down_ratio
            # the running work fits in one replica fewer at half load
            and 2 * n * sum(r.busy for r in serving) <= (n - 1) * sum(r.slots for r in serving)
        )
        if not quiet:
            self._quiet_since.pop(model, None)
            return None
        since = self._quiet_since.setdefault(model, now)
        due = max(since, self._last_up.get(model, -math.inf)) + policy.down_delay_s
        if now < due:
            return due
        # the serving replica with the least running work; of equals, the most recently added
        replica = min(reversed(serving), key=lambda r: (r.busy, len(r.running)))
        replica.draining = True
        self._drains[replica.id] = (
            f"{model!r} could do with one replica fewer for {now - since:.0f} s "
            f"({plan.ready} ready, min_replicas {policy.min_replicas})"
        )
        self._stop_if_idle(replica, actions)
        self._quiet_since[model] = now  # the next drain needs another full delay
        if plan.ready - 1 > policy.min_replicas and n - 1 >= 2:
            return now + policy.down_delay_s
        return None

    def _stop_if_idle(self, replica: Replica, actions: list[Action]) -> None:
        """A draining replica with no running work left is stopped (once per drain)."""
        if not replica.running and not replica.batches and replica.id in self._drains:
            actions.append(StopReplica(replica.id, self._drains.pop(replica.id)))

    def _plan(self, model: str, policy: ScalePolicy) -> _Plan:
        """Where ``model`` stands and what the rule wants for it (no backoff, no timers)."""
        replicas = self._by_model.get(model, ())
        serving = [r for r in replicas if r.healthy and not r.draining]
        ready = sum(1 for r in replicas if (r.healthy or r.restarting) and not r.draining)
        starting = self._starting.get(model, 0)
        queue = self._queues.get(model)
        waiting = len(queue) if queue is not None else 0
        pressure, why = 0.0, ""
        if queue is not None and waiting and serving:
            pressure, why = self._pressure(model, policy, serving, queue)
        desired = have = ready + starting
        if pressure > policy.up_ratio and have < policy.max_replicas:
            target = math.ceil(max(ready, 1) * pressure / policy.up_ratio - 1e-9)
            if starting == 0:
                target = max(target, ready + 1)
            desired = max(have, min(policy.max_replicas, target))
        if desired < policy.min_replicas:
            desired = policy.min_replicas
            why = f"below min_replicas {policy.min_replicas} ({ready} ready, {starting} starting)"
        elif desired > have:
            why = f"{why}; {ready} ready, {starting} starting, want {desired} (max_replicas {policy.max_replicas})"
        return _Plan(serving, ready, starting, waiting, pressure, desired, why)

    def _pressure(
        self, model: str, policy: ScalePolicy, serving: list[Replica], queue: _Queue
    ) -> tuple[float, str]:
        """The largest estimated wait over objective among the classes with waiting requests
        (``2 * up_ratio`` unmeasured when every slot is busy), and the queue signal; with what
        it is made of, in words."""
        kind = serving[0].kind
        waiting = len(queue)
        pressure, why = 0.0, ""
        for slo in queue.by_class:
            cls = self.classes[slo]
            objective = cls.ttft_ms if kind == "llm" else cls.e2e_ms
            if objective is None:
                objective = cls.e2e_ms
            if objective is None:
                continue
            estimate = self._estimated_wait(Request("_", model, kind, slo, 0.0, 0, priority=cls.priority))
            if estimate is not None:
                p = estimate * 1000 / objective
                if p > pressure:
                    pressure = p
                    why = (
                        f"estimated wait {estimate:.1f} s is {p:.0%} of the {slo} objective "
                        f"{objective / 1000:.1f} s"
                    )
            elif all(r.free <= 0 for r in serving) and 2 * policy.up_ratio > pressure:
                pressure = 2 * policy.up_ratio
                why = f"{waiting} requests wait, every slot is busy and no speed is measured yet"
        if policy.queue_per_replica is not None:
            per_replica = waiting / len(serving)
            p = per_replica / policy.queue_per_replica * policy.up_ratio
            if p > pressure:
                pressure = p
                why = f"{per_replica:.1f} requests wait per replica (queue_per_replica {policy.queue_per_replica:g})"
        return pressure, why

    # ---- estimates (see the module docstring) ----------------------------------------

    def _service_time(self, replica: Replica, tokens: int) -> float:
        rate = self._rates[replica.id].value
        return tokens / rate if rate else 0.0

    def _estimated_wait(self, req: Request) -> float | None:
        """Seconds ``req`` would wait if queued now (a lower bound); None before any
        measurement. O(replicas + classes), or + distinct priorities under ``priority``."""
        replicas = [r for r in self._serving(req.model) if r.kind == req.kind]
        queue = self._queues.get(req.model)
        if queue is None or not replicas:
            return None
        ahead, ahead_tokens = self.ordering.ahead(queue, req, lambda slo: self._offset(slo, req.kind))
        if req.kind == "embedding":
            known = [rate for r in replicas if (rate := self._rates[r.id].value)]
            if not known:
                return None
            # until its answer: the batches running now (counted whole), the tokens ahead, and its
            # own batch, which under a queue fills up like recent ones (not just its own tokens)
            running = sum(batch[2] for r in replicas for batch in r.batches.values())
            recent = self._batch_tokens.get(req.model)
            fill = recent.value if ahead_tokens and recent is not None and recent.value else 0.0
            return (running + ahead_tokens + max(float(req.tokens), fill)) / sum(known)
        per_request = self._llm_seconds.get(req.model)
        if per_request is None or per_request.value is None:
            return None
        slots = sum(r.slots for r in replicas)
        free = sum(max(0, r.free) for r in replicas)
        return max(0, ahead - free) * per_request.value / max(1, slots)

    def _retry_after(self, req: Request) -> float:
        """``Retry-After`` for a rejected ``req``: its own estimated wait, at least 1 s."""
        estimate = self._estimated_wait(req)
        return float(max(1, math.ceil(estimate))) if estimate else 1.0
