"""The scheduler: a pure state machine. Events in, actions out; no I/O, no clocks, no threads.

The service feeds it `Submit`, `Done`, `Cancel`, `Tick`, `ReplicaUp`/`ReplicaDown` and
`Load` events (each carrying the time ``now``) and carries out what it returns: `Dispatch`
(run these requests on that replica), `Reject` (answer 429/503 with ``Retry-After``),
`Fail` (a request that cannot be served any more) and `WakeAt` (send a `Tick` then).

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
    running: dict[str, Request] = field(default_factory=dict)
    batches: dict[int, tuple[list[str], float, int]] = field(default_factory=dict)  # id -> (reqs, t0, tokens)
    queue_depth: int = 0  # requests waiting inside the engine (an upstream's own queue)

    @property
    def busy(self) -> int:
        return len(self.batches) if self.kind == "embedding" else len(self.running)

    @property
    def free(self) -> int:
        return self.slots - self.busy if self.healthy else 0

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
    replica: str
    now: float
    reason: str = ""


@dataclass(frozen=True)
class ReplicaUp:
    replica: str
    now: float


@dataclass(frozen=True)
class Load:
    replica: str
    queue_depth: int
    now: float


Event = Submit | Done | FirstToken | Cancel | Tick | ReplicaDown | ReplicaUp | Load

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


Action = Dispatch | Reject | Fail | WakeAt


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
            self._down(event.replica, event.reason or "replica failed", actions)
        elif isinstance(event, ReplicaUp):
            if event.replica in self.replicas:
                self.replicas[event.replica].healthy = True
        elif isinstance(event, Load) and event.replica in self.replicas:
            self.replicas[event.replica].queue_depth = max(0, event.queue_depth)
        elif isinstance(event, Tick):
            # the wake-up asked for has come: a batch still not due (a timer that fired a little
            # early: uvloop's have millisecond resolution) needs a new WakeAt, even for the same time
            self._wake = None
        self._schedule(event.now, actions)
        return actions

    # ---- events ----------------------------------------------------------------------

    def _submit(self, event: Submit, actions: list[Action]) -> None:
        req = event.request
        if req.id in self.requests:
            raise ValueError(f"request id {req.id!r} is already known")
        cls = self.classes.get(req.slo)
        if cls is None:
            raise ValueError(f"unknown SLO class {req.slo!r}")
        replicas = [r for r in self._by_model.get(req.model, ()) if r.kind == req.kind]
        if not replicas:
            actions.append(Fail(req.id, 404, f"no {req.kind} engine serves model {req.model!r}"))
            return
        if not any(r.healthy for r in replicas):
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
        if cls is None or not any(r.kind == kind and r.healthy for r in self._by_model.get(model, ())):
            return None  # Submit gives the exact answer
        return self._admission(Request("_", model, kind, slo, 0.0, 0), cls)

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
            return
        for req in finished:
            self._retry(req, replica.id, event.reason, actions)
        self._down(replica.id, event.reason or "request failed on this replica", actions)

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

    def _down(self, replica_id: str, reason: str, actions: list[Action]) -> None:
        replica = self.replicas.get(replica_id)
        if replica is None:
            return
        replica.healthy = False
        # Work already running there stays accounted to it: the runtime reports each request's
        # own `Done` (``failed`` -> retried elsewhere, or finished if it completed after all).
        # Re-queueing it here would dispatch a request twice while its first run still goes on.
        if not any(r.healthy for r in self._by_model[replica.model]):
            for req in self._queues[replica.model].clear():
                self._uncount(req)
                del self.requests[req.id]
                actions.append(Fail(req.id, 503, f"every replica of {replica.model!r} is down ({reason})"))

    def _retry(self, req: Request, replica_id: str, reason: str, actions: list[Action]) -> None:
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

    def _schedule(self, now: float, actions: list[Action]) -> None:
        wake: float | None = None
        for model in self._models:  # LLM models first
            queue = self._queues[model]
            if not queue.live:
                continue
            replicas = [r for r in self._by_model[model] if r.healthy]
            if not replicas:
                continue
            if replicas[0].kind == "llm":
                self._schedule_llm(model, replicas, now, actions)
            else:
                at = self._schedule_embedding(model, replicas, now, actions)
                if at is not None:
                    wake = at if wake is None else min(wake, at)
            queue.tidy()  # dispatched requests leave the live ones; stale entries may now outnumber them
        if wake is not None and wake != self._wake:
            actions.append(WakeAt(wake))
        self._wake = wake

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

    # ---- estimates (see the module docstring) ----------------------------------------

    def _service_time(self, replica: Replica, tokens: int) -> float:
        rate = self._rates[replica.id].value
        return tokens / rate if rate else 0.0

    def _estimated_wait(self, req: Request) -> float | None:
        """Seconds ``req`` would wait if queued now (a lower bound); None before any
        measurement. O(replicas + classes), or + distinct priorities under ``priority``."""
        replicas = [r for r in self._by_model.get(req.model, ()) if r.kind == req.kind and r.healthy]
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
