"""The scheduler: a pure state machine. Events in, actions out; no I/O, no clocks, no threads.

The service feeds it `Submit`, `Done`, `Cancel`, `Tick`, `ReplicaUp`/`ReplicaDown` and
`Load` events (each carrying the time ``now``) and carries out what it returns: `Dispatch`
(run these requests on that replica), `Reject` (answer 429/503 with ``Retry-After``),
`Fail` (a request that cannot be served any more) and `WakeAt` (send a `Tick` then).

Policies decide the order of waiting requests:

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
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["llm", "embedding"]
POLICIES = ("fifo", "priority", "slo", "hybrid")


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
        "interactive", ttft_ms=1000, tpot_ms=200, e2e_ms=10_000, max_queue=256, priority=-1
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
    """Exponentially weighted tokens-per-second of one replica."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def observe(self, tokens: int, seconds: float) -> None:
        if seconds <= 0 or tokens <= 0:
            return
        rate = tokens / seconds
        self.value = rate if self.value is None else self.alpha * rate + (1 - self.alpha) * self.value


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
        self.policy = policy
        self.classes = dict(classes or DEFAULT_CLASSES)
        self.batching = batching or BatchLimits()
        self.max_attempts = max_attempts
        self.replicas: dict[str, Replica] = {}
        self.requests: dict[str, Request] = {}  # waiting or running
        self._heaps: dict[str, list[tuple[tuple[float, ...], int, str]]] = {}
        self._waiting: dict[str, set[str]] = {}  # model -> waiting request ids
        self._seq = itertools.count()
        self._batch_ids = itertools.count(1)
        self._rates: dict[str, _Rate] = {}  # embedding replicas: tokens per second
        self._llm_seconds: dict[str, _Rate] = {}  # LLM models: seconds per request (EMA)
        self._class_waiting: dict[str, int] = {}
        self._class_tokens: dict[str, int] = {}
        self._wake: float | None = None

    # ---- configuration ---------------------------------------------------------------

    def add_replica(self, replica: Replica) -> None:
        if replica.id in self.replicas:
            raise ValueError(f"replica {replica.id!r} is already registered")
        self.replicas[replica.id] = replica
        self._rates[replica.id] = _Rate()
        self._heaps.setdefault(replica.model, [])
        self._waiting.setdefault(replica.model, set())

    def slo_class(self, name: str) -> SLOClass:
        return self.classes[name]

    # ---- introspection (metrics) -----------------------------------------------------

    def queue_depth(self, model: str | None = None, slo: str | None = None) -> int:
        ids = (
            self._waiting.get(model, set())
            if model is not None
            else set().union(*self._waiting.values())
            if self._waiting
            else set()
        )
        return sum(1 for i in ids if slo is None or self.requests[i].slo == slo)

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
        replicas = [r for r in self.replicas.values() if r.model == req.model and r.kind == req.kind]
        if not replicas:
            actions.append(Fail(req.id, 404, f"no {req.kind} engine serves model {req.model!r}"))
            return
        if not any(r.healthy for r in replicas):
            actions.append(
                Reject(req.id, 503, "no_healthy_replica", f"every replica of {req.model!r} is down", 5.0)
            )
            return
        waiting = self._class_waiting.get(cls.name, 0)
        if waiting >= cls.max_queue:
            actions.append(
                Reject(
                    req.id,
                    429,
                    "queue_full",
                    f"the {cls.name!r} queue is full ({waiting} waiting requests, max_queue {cls.max_queue})",
                    self._retry_after(req.model, req.kind),
                )
            )
            return
        queued = self._class_tokens.get(cls.name, 0)
        if queued + req.tokens > cls.max_queued_tokens:
            actions.append(
                Reject(
                    req.id,
                    429,
                    "token_budget_full",
                    f"the {cls.name!r} queue holds {queued} tokens; {req.tokens} more exceed "
                    f"max_queued_tokens {cls.max_queued_tokens}",
                    self._retry_after(req.model, req.kind),
                )
            )
            return
        if cls.reject_when_late:
            objective = cls.e2e_ms if req.kind == "embedding" else cls.ttft_ms
            estimate = self._estimated_wait(req)
            if objective is not None and estimate is not None and estimate * 1000 > objective:
                actions.append(
                    Reject(
                        req.id,
                        429,
                        "deadline_unreachable",
                        f"the estimated wait ({estimate * 1000:.0f} ms) exceeds the {cls.name!r} objective "
                        f"({objective:.0f} ms)",
                        max(1.0, estimate),
                    )
                )
                return
        self._enqueue(req)

    def _done(self, event: Done, actions: list[Action]) -> None:
        replica = self.replicas.get(event.replica)
        if replica is None:
            return
        finished: list[Request] = []
        for batch_id, (ids, started, tokens) in list(replica.batches.items()):
            if set(ids) & set(event.requests):
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
                if req.kind == "llm":
                    self._llm_seconds.setdefault(req.model, _Rate()).observe(
                        1, 1 / max(1e-6, event.now - req.started)
                    )
            return
        for req in finished:
            self._retry(req, replica.id, event.reason, actions)
        self._down(replica.id, event.reason or "request failed on this replica", actions)

    def _cancel(self, rid: str) -> None:
        req = self.requests.get(rid)
        if req is None:
            return
        if rid in self._waiting.get(req.model, set()):
            self._unqueue(req)
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
        if not any(r.healthy for r in self.replicas.values() if r.model == replica.model):
            for rid in list(self._waiting.get(replica.model, set())):
                req = self.requests.pop(rid)
                self._unqueue(req)
                actions.append(Fail(rid, 503, f"every replica of {replica.model!r} is down ({reason})"))

    def _retry(self, req: Request, replica_id: str, reason: str, actions: list[Action]) -> None:
        req.excluded.add(replica_id)
        if req.attempts >= self.max_attempts:
            self.requests.pop(req.id, None)
            actions.append(Fail(req.id, 503, f"failed on {req.attempts} replicas; last: {reason}"))
            return
        self._enqueue(req)

    # ---- queues ----------------------------------------------------------------------

    def _key(self, req: Request) -> tuple[float, ...]:
        if self.policy == "fifo":
            return (req.arrival,)
        if self.policy == "priority":
            return (float(req.priority), req.arrival)
        return (self._deadline(req), float(req.priority), req.arrival)

    def _deadline(self, req: Request) -> float:
        cls = self.classes[req.slo]
        objective = cls.ttft_ms if req.kind == "llm" else cls.e2e_ms
        if objective is None:
            objective = cls.e2e_ms
        return req.arrival + (objective / 1000 if objective is not None else 3600.0)

    def _enqueue(self, req: Request) -> None:
        self.requests[req.id] = req
        self._waiting.setdefault(req.model, set()).add(req.id)
        heapq.heappush(self._heaps.setdefault(req.model, []), (self._key(req), next(self._seq), req.id))
        self._class_waiting[req.slo] = self._class_waiting.get(req.slo, 0) + 1
        self._class_tokens[req.slo] = self._class_tokens.get(req.slo, 0) + req.tokens

    def _unqueue(self, req: Request) -> None:
        self._waiting[req.model].discard(req.id)
        self._class_waiting[req.slo] -= 1
        self._class_tokens[req.slo] -= req.tokens

    def _ordered(self, model: str) -> Iterable[Request]:
        """Waiting requests of a model in policy order (drops stale heap entries)."""
        heap = self._heaps.get(model, [])
        waiting = self._waiting.get(model, set())
        while heap and heap[0][2] not in waiting:
            heapq.heappop(heap)
        for _, _, rid in sorted(heap):
            if rid in waiting:
                yield self.requests[rid]

    # ---- dispatch --------------------------------------------------------------------

    def _schedule(self, now: float, actions: list[Action]) -> None:
        wake: float | None = None
        # LLM models first: under hybrid, embedding batches yield to LLM work on a shared device
        models = sorted(self._waiting, key=lambda m: self._kind_of(m) != "llm")
        for model in models:
            if not self._waiting[model]:
                continue
            replicas = [r for r in self.replicas.values() if r.model == model and r.healthy]
            if not replicas:
                continue
            if replicas[0].kind == "llm":
                self._schedule_llm(model, replicas, now, actions)
            else:
                at = self._schedule_embedding(model, replicas, now, actions)
                if at is not None:
                    wake = at if wake is None else min(wake, at)
        if wake is not None and wake != self._wake:
            actions.append(WakeAt(wake))
        self._wake = wake

    def _kind_of(self, model: str) -> Kind:
        return next((r.kind for r in self.replicas.values() if r.model == model), "llm")

    def _schedule_llm(self, model: str, replicas: list[Replica], now: float, actions: list[Action]) -> None:
        for req in list(self._ordered(model)):
            if not any(r.free > 0 for r in replicas):
                return
            candidates = [r for r in replicas if r.free > 0 and r.id not in req.excluded]
            if not candidates:
                if all(r.id in req.excluded for r in replicas):
                    req.excluded.clear()  # every healthy replica failed it once: try them again
                continue
            replica = min(candidates, key=lambda r: (r.load, r.id))
            self._start(req, replica, now)
            actions.append(Dispatch(replica.id, (req.id,)))

    def _schedule_embedding(
        self, model: str, replicas: list[Replica], now: float, actions: list[Action]
    ) -> float | None:
        limits = self.batching
        while True:
            free = [r for r in replicas if r.free > 0 and not self._device_held(r)]
            if not free:
                return None
            replica = min(free, key=lambda r: (r.busy, r.load, r.id))
            token_cap = self._token_cap(replica)
            batch: list[Request] = []
            tokens = inputs = 0
            full = False
            for req in self._ordered(model):
                if replica.id in req.excluded and len(req.excluded) < len(replicas):
                    continue
                if batch and (inputs + req.inputs > limits.max_batch_size or tokens + req.tokens > token_cap):
                    full = True
                    break
                batch.append(req)
                tokens += req.tokens
                inputs += req.inputs
            if not batch:
                return None
            full = full or inputs >= limits.max_batch_size or tokens >= token_cap
            oldest = min(r.arrival for r in batch)
            due = oldest + limits.max_wait_ms / 1000
            due = min(due, *(self._deadline(r) - self._service_time(replica, tokens) for r in batch))
            if not full and now < due:
                return due
            batch_id = next(self._batch_ids)
            for req in batch:
                self._start(req, replica, now)
            replica.batches[batch_id] = ([r.id for r in batch], now, tokens)
            actions.append(Dispatch(replica.id, tuple(r.id for r in batch), batch_id))

    def _start(self, req: Request, replica: Replica, now: float) -> None:
        self._unqueue(req)
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
        if self.policy != "hybrid" or replica.device is None:
            return False
        prefill, _, _ = self._interactive_llm(replica.device)
        return prefill > 0

    def _token_cap(self, replica: Replica) -> int:
        cap = self.batching.max_batch_tokens
        if self.policy != "hybrid" or replica.device is None or is_cpu(replica.device):
            return cap  # on CPU a running batch shares the cores with decode steps, not blocks them
        _, decoding, tpot = self._interactive_llm(replica.device)
        rate = self._rates[replica.id].value
        if decoding == 0 or tpot is None or rate is None:
            return cap
        # a batch should take no longer than half a TPOT budget, so a decode step waits < 1 budget
        return max(self.batching.hybrid_min_batch_tokens, min(cap, int(rate * tpot * 0.5)))

    # ---- estimates -------------------------------------------------------------------

    def _service_time(self, replica: Replica, tokens: int) -> float:
        rate = self._rates[replica.id].value
        return tokens / rate if rate else 0.0

    def _estimated_wait(self, req: Request) -> float | None:
        replicas = [r for r in self.replicas.values() if r.model == req.model and r.healthy]
        if req.kind == "embedding":
            rates = [self._rates[r.id].value for r in replicas]
            known = [r for r in rates if r]
            if not known:
                return None
            ahead = sum(self.requests[i].tokens for i in self._waiting.get(req.model, set()))
            return (ahead + req.tokens) / sum(known)
        per_request = self._llm_seconds.get(req.model)
        if per_request is None or per_request.value is None:
            return None
        slots = sum(r.slots for r in replicas)
        free = sum(r.free for r in replicas)
        ahead = len(self._waiting.get(req.model, set())) - free + 1
        # requests/second the replicas finish is slots * (1 / seconds per request)
        return max(0.0, ahead) / (slots * per_request.value)

    def _retry_after(self, model: str, kind: Kind) -> float:
        probe = Request("_", model, kind, next(iter(self.classes)), 0.0, 0)
        estimate = self._estimated_wait(probe)
        return float(max(1, math.ceil(estimate))) if estimate else 1.0
