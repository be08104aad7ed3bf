"""The scheduler state machine, driven by events alone (no sockets, no threads, no clock)."""

from __future__ import annotations

import random

import pytest

from sage_prefect.controlplane.config import ControlPlaneConfig
from sage_prefect.controlplane.scheduler import (
    BatchLimits,
    Cancel,
    Dispatch,
    Done,
    Event,
    Fail,
    FirstToken,
    Load,
    Reject,
    Replica,
    ReplicaDown,
    ReplicaUp,
    Request,
    Scheduler,
    SLOClass,
    Submit,
    Tick,
    WakeAt,
)

CLASSES = {
    "interactive": SLOClass("interactive", ttft_ms=500, tpot_ms=100, e2e_ms=5_000, max_queue=4),
    "batch": SLOClass("batch", e2e_ms=60_000, max_queue=8, max_queued_tokens=1000),
}


def llm(rid: str, t: float, slo: str = "batch", priority: int = 0, model: str = "lm") -> Request:
    return Request(rid, model, "llm", slo, t, tokens=10, max_tokens=16, priority=priority)


def emb(rid: str, t: float, tokens: int = 10, inputs: int = 1, slo: str = "batch") -> Request:
    return Request(rid, "emb", "embedding", slo, t, tokens=tokens, inputs=inputs)


def dispatched(actions: list) -> list[tuple[str, tuple[str, ...]]]:
    return [(a.replica, a.requests) for a in actions if isinstance(a, Dispatch)]


def one_llm(policy: str, slots: int = 1) -> Scheduler:
    s = Scheduler(policy, CLASSES)
    s.add_replica(Replica("lm-0", "lm", "llm", slots=slots))
    return s


def test_fifo_serves_in_arrival_order() -> None:
    s = one_llm("fifo")
    assert dispatched(s.handle(Submit(llm("a", 0.0), 0.0))) == [("lm-0", ("a",))]
    assert dispatched(s.handle(Submit(llm("b", 0.1, priority=-5, slo="interactive"), 0.1))) == []
    s.handle(Submit(llm("c", 0.2), 0.2))
    assert dispatched(s.handle(Done("lm-0", ("a",), 1.0))) == [("lm-0", ("b",))]
    assert dispatched(s.handle(Done("lm-0", ("b",), 2.0))) == [("lm-0", ("c",))]


def test_priority_serves_lower_values_first() -> None:
    s = one_llm("priority")
    s.handle(Submit(llm("busy", 0.0), 0.0))
    s.handle(Submit(llm("low", 0.1, priority=5), 0.1))
    s.handle(Submit(llm("high", 0.2, priority=-1), 0.2))
    s.handle(Submit(llm("mid", 0.3, priority=0), 0.3))
    order = []
    current = "busy"
    for t in (1.0, 2.0, 3.0):
        (d,) = dispatched(s.handle(Done("lm-0", (current,), t)))
        current = d[1][0]
        order.append(current)
    assert order == ["high", "mid", "low"]


def test_slo_serves_earliest_deadline_first() -> None:
    s = one_llm("slo")
    s.handle(Submit(llm("busy", 0.0), 0.0))
    s.handle(Submit(llm("bulk", 0.1, slo="batch"), 0.1))  # deadline 0.1 + 60 s (no TTFT objective)
    s.handle(Submit(llm("chat", 0.2, slo="interactive"), 0.2))  # deadline 0.2 + 0.5 s
    assert dispatched(s.handle(Done("lm-0", ("busy",), 0.3))) == [("lm-0", ("chat",))]


def test_llm_replicas_fill_slots_by_least_outstanding_work() -> None:
    s = Scheduler("fifo", CLASSES)
    s.add_replica(Replica("a", "lm", "llm", slots=4))
    s.add_replica(Replica("b", "lm", "llm", slots=4))
    s.handle(Load("a", queue_depth=10, now=0.0))  # e.g. vLLM's num_requests_waiting
    targets = [dispatched(s.handle(Submit(llm(f"r{i}", 0.0), 0.0)))[0][0] for i in range(6)]
    assert targets[:4] == ["b", "b", "b", "b"] and targets[4:] == ["a", "a"]


def test_embeddings_are_coalesced_until_full_or_max_wait() -> None:
    s = Scheduler("fifo", CLASSES, BatchLimits(max_batch_size=4, max_batch_tokens=1000, max_wait_ms=10))
    s.add_replica(Replica("e-0", "emb", "embedding"))
    first = s.handle(Submit(emb("a", 0.0), 0.0))
    assert dispatched(first) == [] and WakeAt(0.010) in first
    assert dispatched(s.handle(Submit(emb("b", 0.002), 0.002))) == []
    assert dispatched(s.handle(Tick(0.011))) == [("e-0", ("a", "b"))]
    # while the replica is busy, work piles up; a full batch goes as soon as the replica is free
    for i in range(6):
        s.handle(Submit(emb(f"q{i}", 0.02), 0.02))
    assert dispatched(s.handle(Done("e-0", ("a", "b"), 0.03))) == [("e-0", ("q0", "q1", "q2", "q3"))]


def test_embedding_batches_respect_the_token_budget_and_input_counts() -> None:
    s = Scheduler("fifo", CLASSES, BatchLimits(max_batch_size=8, max_batch_tokens=100, max_wait_ms=0))
    s.add_replica(Replica("e-0", "emb", "embedding"))
    s.add_replica(Replica("e-1", "emb", "embedding"))
    s.handle(Submit(emb("busy0", 0.0), 0.0))
    s.handle(Submit(emb("busy1", 0.0), 0.0))
    s.handle(Submit(emb("big", 0.1, tokens=60), 0.1))
    s.handle(Submit(emb("next", 0.1, tokens=50), 0.1))
    s.handle(Submit(emb("many", 0.1, tokens=20, inputs=7), 0.1))
    assert dispatched(s.handle(Done("e-0", ("busy0",), 0.2))) == [("e-0", ("big",))]  # 60 + 50 > 100
    assert dispatched(s.handle(Done("e-1", ("busy1",), 0.2))) == [("e-1", ("next", "many"))]  # 8 inputs


def test_admission_rejects_a_full_class_queue_with_retry_after() -> None:
    s = one_llm("fifo")
    s.handle(Submit(llm("run", 0.0, slo="interactive"), 0.0))
    for i in range(4):
        assert not any(isinstance(a, Reject) for a in s.handle(Submit(llm(f"w{i}", 0.1, "interactive"), 0.1)))
    (reject,) = s.handle(Submit(llm("one-too-many", 0.2, "interactive"), 0.2))
    assert isinstance(reject, Reject) and reject.status == 429 and reject.code == "queue_full"
    assert "interactive" in reject.message and reject.retry_after >= 1
    assert not any(isinstance(a, Reject) for a in s.handle(Submit(llm("other-class", 0.2), 0.2)))


def test_admission_rejects_over_the_token_budget() -> None:
    s = Scheduler("fifo", CLASSES)
    s.add_replica(Replica("e-0", "emb", "embedding"))
    s.handle(Submit(emb("run", 0.0), 0.0))
    s.handle(Tick(1.0))
    assert not [a for a in s.handle(Submit(emb("a", 1.0, tokens=900), 1.0)) if isinstance(a, Reject)]
    (reject,) = [a for a in s.handle(Submit(emb("b", 1.0, tokens=200), 1.0)) if isinstance(a, Reject)]
    assert reject.code == "token_budget_full" and "max_queued_tokens 1000" in reject.message


def test_memory_stays_bounded_at_ten_times_overload() -> None:
    s = one_llm("slo")
    rejected = 0
    for i in range(10 * (4 + 8)):
        slo = "interactive" if i % 2 else "batch"
        rejected += sum(
            isinstance(a, Reject) for a in s.handle(Submit(llm(f"r{i}", i * 0.001, slo), i * 0.001))
        )
    assert s.queue_depth() == 4 + 8
    assert len(s.requests) == 4 + 8 + 1  # waiting + running
    assert rejected == 10 * 12 - 13


def test_deadline_admission_uses_the_measured_speed() -> None:
    classes = {"tight": SLOClass("tight", e2e_ms=100, reject_when_late=True), "batch": CLASSES["batch"]}
    s = Scheduler("slo", classes, BatchLimits(max_batch_size=1, max_wait_ms=0))
    s.add_replica(Replica("e-0", "emb", "embedding"))
    s.handle(Submit(emb("a", 0.0, tokens=100, slo="tight"), 0.0))
    s.handle(Done("e-0", ("a",), 1.0))  # measured: 100 tokens/s
    s.handle(Submit(emb("b", 1.0, tokens=100, slo="tight"), 1.0))  # runs now
    (reject,) = [
        a for a in s.handle(Submit(emb("c", 1.0, tokens=100, slo="tight"), 1.0)) if isinstance(a, Reject)
    ]
    assert reject.code == "deadline_unreachable" and reject.retry_after >= 1


def test_a_failed_replica_is_taken_out_and_its_requests_retried_elsewhere() -> None:
    s = Scheduler("fifo", CLASSES)
    s.add_replica(Replica("a", "lm", "llm", slots=1))
    s.add_replica(Replica("b", "lm", "llm", slots=1))
    assert dispatched(s.handle(Submit(llm("x", 0.0), 0.0))) == [("a", ("x",))]
    assert dispatched(s.handle(Submit(llm("y", 0.0), 0.0))) == [("b", ("y",))]
    actions = s.handle(Done("a", ("x",), 0.5, failed=True, reason="connection refused"))
    assert not s.replicas["a"].healthy and dispatched(actions) == []  # b is busy: x waits
    assert dispatched(s.handle(Done("b", ("y",), 0.6))) == [("b", ("x",))]
    fails = s.handle(Done("b", ("x",), 0.7, failed=True, reason="boom"))
    assert [a.status for a in fails if isinstance(a, Fail)] == [503]
    (reject,) = s.handle(Submit(llm("z", 1.0), 1.0))
    assert isinstance(reject, Reject) and reject.status == 503


def test_requests_running_on_a_failed_replica_are_retried_only_when_they_fail() -> None:
    s = Scheduler("fifo", CLASSES)
    s.add_replica(Replica("a", "lm", "llm", slots=4))
    s.add_replica(Replica("b", "lm", "llm", slots=4))
    for rid in ("x", "y", "z"):
        s.handle(Submit(llm(rid, 0.0), 0.0))
    on_a = [rid for rid in ("x", "y", "z") if rid in s.replicas["a"].running]
    assert len(on_a) == 2  # least outstanding work: x -> a, y -> b, z -> a
    first, *others = on_a
    actions = s.handle(Done("a", (first,), 0.5, failed=True, reason="connection reset"))
    assert dispatched(actions) == [("b", (first,))] and not s.replicas["a"].healthy
    # the others still run on a (their runs are not over): no second dispatch of them yet
    assert all(rid in s.replicas["a"].running for rid in others)
    for rid in others:
        assert dispatched(s.handle(Done("a", (rid,), 0.6, failed=True, reason="reset"))) == [("b", (rid,))]
    assert not s.replicas["a"].running


def test_cancel_drops_a_waiting_request() -> None:
    s = one_llm("fifo")
    s.handle(Submit(llm("a", 0.0), 0.0))
    s.handle(Submit(llm("b", 0.1), 0.1))
    s.handle(Cancel("b", 0.2))
    assert s.queue_depth() == 0
    assert dispatched(s.handle(Done("lm-0", ("a",), 1.0))) == []


def _shared_device(policy: str, device: str = "cuda:0") -> Scheduler:
    classes = {**CLASSES, "batch": SLOClass("batch", e2e_ms=60_000)}
    s = Scheduler(policy, classes, BatchLimits(max_batch_size=64, max_batch_tokens=10_000, max_wait_ms=0))
    s.add_replica(Replica("lm-0", "lm", "llm", slots=4, device=device))
    s.add_replica(Replica("e-0", "emb", "embedding", device=device))
    s.handle(Submit(emb("warm", 0.0, tokens=1000), 0.0))
    s.handle(Done("e-0", ("warm",), 1.0))  # measured: 1,000 tokens/s
    return s


@pytest.mark.parametrize("policy", ["fifo", "hybrid"])
def test_hybrid_gives_prefill_the_device_and_cuts_batches_to_the_tpot_budget(policy: str) -> None:
    s = _shared_device(policy)
    s.handle(Submit(llm("chat", 1.0, slo="interactive", model="lm"), 1.0))
    bulk = s.handle(Submit(emb("bulk", 1.0, tokens=30, inputs=1), 1.0))
    if policy == "fifo":
        assert dispatched(bulk) == [("e-0", ("bulk",))]
        return
    assert dispatched(bulk) == []  # chat's prefill has the device
    assert dispatched(s.handle(FirstToken("lm-0", "chat", 1.1))) == [("e-0", ("bulk",))]
    for i in range(40):
        s.handle(Submit(emb(f"b{i}", 1.2, tokens=20), 1.2))
    (batch,) = dispatched(s.handle(Done("e-0", ("bulk",), 1.2)))
    # 1,000 tokens/s x 100 ms TPOT x 0.5 = 50 tokens, floored at hybrid_min_batch_tokens (256)
    assert len(batch[1]) == 256 // 20
    s.handle(Done("lm-0", ("chat",), 2.0))  # chat finished: full batches again
    (batch,) = dispatched(s.handle(Done("e-0", batch[1], 2.1)))
    assert len(batch[1]) == 40 - 256 // 20


def test_hybrid_on_cpu_holds_batches_for_prefill_but_never_cuts_them() -> None:
    # the OS time-slices a CPU: a running batch slows a decode step down, it does not block it,
    # so cutting batches would only cost throughput (the LLM gets the cores by OS priority)
    s = _shared_device("hybrid", device="cpu")
    s.handle(Submit(llm("chat", 1.0, slo="interactive", model="lm"), 1.0))
    assert dispatched(s.handle(Submit(emb("bulk", 1.0, tokens=30), 1.0))) == []  # prefill first
    assert dispatched(s.handle(FirstToken("lm-0", "chat", 1.1))) == [("e-0", ("bulk",))]
    for i in range(40):
        s.handle(Submit(emb(f"b{i}", 1.2, tokens=20), 1.2))
    (batch,) = dispatched(s.handle(Done("e-0", ("bulk",), 1.2)))  # chat still decoding
    assert len(batch[1]) == 40


def test_hybrid_runs_embeddings_in_the_background_on_a_cpu_shared_with_a_local_llm() -> None:
    def models(**over: object) -> list[dict[str, object]]:
        return [
            {"name": "e", "kind": "embedding", "engine": "sentence-transformers", "device": "cpu", **over},
            {"name": "lm", "kind": "llm", "engine": "transformers", "device": "cpu"},
        ]

    def params(policy: str, **over: object) -> dict[str, object]:
        return ControlPlaneConfig(policy=policy, models=models(**over)).models[0].params

    assert params("hybrid") == {"background": True}
    assert params("fifo") == {}
    assert params("hybrid", params={"background": False}) == {"background": False}
    assert params("hybrid", device="cuda:0") == {}  # not the LLM's device


def test_bad_configuration_is_named() -> None:
    with pytest.raises(ValueError, match="unknown scheduling policy 'lifo'"):
        Scheduler("lifo")
    s = one_llm("fifo")
    with pytest.raises(ValueError, match="unknown SLO class 'gold'"):
        s.handle(Submit(llm("a", 0.0, slo="gold"), 0.0))
    (fail,) = s.handle(Submit(llm("b", 0.0, model="nope"), 0.0))
    assert isinstance(fail, Fail) and fail.status == 404


def test_a_tick_that_comes_early_asks_for_the_wake_up_again() -> None:
    s = Scheduler("slo", CLASSES, BatchLimits(max_batch_size=8, max_wait_ms=10))
    s.add_replica(Replica("e-0", "emb", "embedding"))
    (wake,) = s.handle(Submit(emb("a", 0.0), 0.0))
    assert isinstance(wake, WakeAt) and wake.time == pytest.approx(0.010)
    # timers may fire a little early (uvloop: millisecond resolution): the batch is not due yet,
    # so the same wake-up must be asked for again or the request would wait forever
    early = s.handle(Tick(0.0095))
    assert dispatched(early) == [] and [a.time for a in early if isinstance(a, WakeAt)] == [wake.time]
    assert dispatched(s.handle(Tick(0.0101))) == [("e-0", ("a",))]


# ---- wait estimates ---------------------------------------------------------------------


def _llm_at_4s_per_request(policy: str, classes: dict[str, SLOClass], slots: int) -> Scheduler:
    """An LLM replica with ``slots`` slots, measured at 4 s per request, every slot busy."""
    s = Scheduler(policy, classes)
    s.add_replica(Replica("lm-0", "lm", "llm", slots=slots))
    warm = tuple(f"warm{i}" for i in range(slots))
    for rid in warm:
        s.handle(Submit(llm(rid, 0.0), 0.0))
    s.handle(Done("lm-0", warm, 4.0))  # each took 4 s
    for i in range(slots):
        assert dispatched(s.handle(Submit(llm(f"run{i}", 4.0), 4.0)))
    return s


LATE = {
    "batch": SLOClass("batch", e2e_ms=60_000, max_queue=100),
    "chat": SLOClass("chat", ttft_ms=15_000, reject_when_late=True),
    "probe": SLOClass("probe", ttft_ms=1, reject_when_late=True),  # always late: shows the estimate
}


@pytest.mark.parametrize(("slots", "expected"), [(1, 20.0), (2, 10.0)])
def test_the_llm_wait_is_the_requests_ahead_times_seconds_per_request_over_slots(
    slots: int, expected: float
) -> None:
    s = _llm_at_4s_per_request("fifo", LATE, slots)
    for i in range(5):
        s.handle(Submit(llm(f"w{i}", 5.0), 5.0))
    (reject,) = s.handle(Submit(llm("p", 5.0, slo="probe"), 5.0))
    # 5 requests ahead, none can start now: 5 x 4 s / slots (not 5 / (slots x 4) as it was)
    assert isinstance(reject, Reject) and reject.code == "deadline_unreachable"
    assert reject.retry_after == pytest.approx(expected)
    assert f"({expected * 1000:.0f} ms)" in reject.message


def test_an_llm_request_is_rejected_when_its_ttft_objective_is_out_of_reach() -> None:
    s = _llm_at_4s_per_request("fifo", LATE, 1)
    for i in range(3):
        s.handle(Submit(llm(f"w{i}", 5.0), 5.0))
    # 3 ahead x 4 s = 12 s < 15 s: admitted
    assert not [a for a in s.handle(Submit(llm("c1", 5.0, slo="chat"), 5.0)) if isinstance(a, Reject)]
    s.handle(Submit(llm("w3", 5.0), 5.0))
    # now 5 ahead (w0-w3 and c1) x 4 s = 20 s > 15 s
    (reject,) = s.handle(Submit(llm("c2", 5.0, slo="chat"), 5.0))
    assert isinstance(reject, Reject) and (reject.status, reject.code) == (429, "deadline_unreachable")
    assert "'chat' objective (15000 ms)" in reject.message and reject.retry_after == pytest.approx(20.0)
    assert s.queue_depth("lm") == 5


def test_the_llm_wait_counts_free_slots_and_nothing_before_a_measurement() -> None:
    s = Scheduler("fifo", LATE)
    s.add_replica(Replica("lm-0", "lm", "llm", slots=4))
    # no request has finished yet: no estimate, no rejection
    assert dispatched(s.handle(Submit(llm("p0", 0.0, slo="probe"), 0.0))) == [("lm-0", ("p0",))]
    s.handle(Done("lm-0", ("p0",), 4.0))
    # 3 of 4 slots busy, nothing waiting: the probe starts at once (estimate 0)
    for i in range(3):
        s.handle(Submit(llm(f"r{i}", 4.0), 4.0))
    assert dispatched(s.handle(Submit(llm("p1", 4.0, slo="probe"), 4.0))) == [("lm-0", ("p1",))]


def test_under_slo_only_requests_with_an_earlier_deadline_count_as_ahead() -> None:
    s = _llm_at_4s_per_request("slo", LATE, 1)
    for i in range(5):
        s.handle(Submit(llm(f"bulk{i}", 5.0), 5.0))  # batch: deadline 60 s after arrival
    # a chat request (15 s TTFT) goes before all of them: admitted (under fifo: 5 x 4 s = 20 s, late)
    assert not [a for a in s.handle(Submit(llm("c", 5.0, slo="chat"), 5.0)) if isinstance(a, Reject)]
    for i in range(3):
        assert not [a for a in s.handle(Submit(llm(f"c{i}", 5.0, slo="chat"), 5.0)) if isinstance(a, Reject)]
    (reject,) = s.handle(Submit(llm("c-late", 5.0, slo="chat"), 5.0))  # 4 chats ahead: 16 s > 15 s
    assert isinstance(reject, Reject) and reject.retry_after == pytest.approx(16.0)
    assert s.queue_depth("lm", "batch") == 5 and s.queue_depth("lm", "chat") == 4


def test_under_priority_only_requests_of_the_same_or_a_lower_value_count_as_ahead() -> None:
    s = _llm_at_4s_per_request("priority", LATE, 1)
    for i, priority in enumerate((5, 5, 0, -1, 5)):
        s.handle(Submit(llm(f"w{i}", 5.0, priority=priority), 5.0))
    (reject,) = s.handle(Submit(llm("p", 5.0, slo="probe", priority=0), 5.0))
    assert isinstance(reject, Reject) and reject.retry_after == pytest.approx(8.0)  # 2 ahead x 4 s


def test_retry_after_is_estimated_for_the_rejected_request_itself() -> None:
    # slo: a rejected batch request waits behind everything, an interactive one behind its class
    s = _llm_at_4s_per_request("slo", CLASSES, 1)
    for i in range(4):
        s.handle(Submit(llm(f"i{i}", 5.0, slo="interactive"), 5.0))
    for i in range(8):
        s.handle(Submit(llm(f"b{i}", 5.0, slo="batch"), 5.0))
    (late_batch,) = s.handle(Submit(llm("b-late", 5.0, slo="batch"), 5.0))
    (late_chat,) = s.handle(Submit(llm("i-late", 5.0, slo="interactive"), 5.0))
    assert isinstance(late_batch, Reject) and late_batch.code == "queue_full"
    assert isinstance(late_chat, Reject) and late_chat.code == "queue_full"
    assert late_batch.retry_after == 48.0  # 12 ahead x 4 s
    assert late_chat.retry_after == 16.0  # 4 ahead x 4 s (the first class's figure before the fix)
    # embeddings: the running batch, the tokens waiting and the rejected request's own count
    # (100 tokens/s; 10 running + 900 waiting + 200 of its own: 11.1 s)
    e = Scheduler("fifo", CLASSES, BatchLimits(max_batch_size=1, max_wait_ms=0))
    e.add_replica(Replica("e-0", "emb", "embedding"))
    e.handle(Submit(emb("a", 0.0, tokens=100), 0.0))
    e.handle(Done("e-0", ("a",), 1.0))
    e.handle(Submit(emb("run", 1.0, tokens=10), 1.0))
    e.handle(Submit(emb("w", 1.0, tokens=900), 1.0))
    (reject,) = [a for a in e.handle(Submit(emb("big", 1.0, tokens=200), 1.0)) if isinstance(a, Reject)]
    assert reject.code == "token_budget_full" and reject.retry_after == 12.0


# ---- queues: heap order, lazy removal, counters -----------------------------------------------

PROPERTY_CLASSES = {
    "interactive": SLOClass("interactive", ttft_ms=500, e2e_ms=5_000, max_queue=10_000),
    "standard": SLOClass("standard", ttft_ms=3_000, max_queue=10_000),
    "batch": SLOClass("batch", e2e_ms=60_000, max_queue=10_000, max_queued_tokens=10**9),
}


def _reference_key(policy: str, req: Request, n: int) -> tuple[float, ...]:
    """The order the module docstring defines, computed from scratch (``n``: submit order)."""
    cls = PROPERTY_CLASSES[req.slo]
    objective = (cls.ttft_ms if req.kind == "llm" else cls.e2e_ms) or cls.e2e_ms
    deadline = req.arrival + (objective / 1000 if objective is not None else 3600.0)
    if policy == "fifo":
        return (req.arrival, n)
    if policy == "priority":
        return (req.priority, req.arrival, n)
    return (deadline, req.priority, req.arrival, n)


@pytest.mark.parametrize("policy", ["fifo", "priority", "slo", "hybrid"])
def test_dispatch_order_matches_a_sorted_reference_with_cancels_interleaved(policy: str) -> None:
    rng = random.Random(20240611)
    s = Scheduler(
        policy, PROPERTY_CLASSES, BatchLimits(max_batch_size=3, max_batch_tokens=10**6, max_wait_ms=0)
    )
    s.add_replica(Replica("lm-0", "lm", "llm", slots=1))
    s.add_replica(Replica("e-0", "emb", "embedding"))
    waiting: dict[str, dict[str, tuple[tuple[float, ...], str]]] = {"lm": {}, "emb": {}}
    running: dict[str, tuple[str, ...]] = {}
    now = 0.0
    for n in range(3000):
        now += rng.choice((0.0, 0.001, 0.01))
        op = rng.random()
        model = rng.choice(("lm", "emb"))
        if op < 0.5:
            rid = f"r{n}"
            slo = rng.choice(tuple(PROPERTY_CLASSES))
            arrival = now - rng.uniform(0.0, 5.0)  # not monotonic: the heap, not the input, orders
            req = llm(rid, arrival, slo=slo) if model == "lm" else emb(rid, arrival, slo=slo)
            req.priority = rng.randint(-2, 2)
            waiting[model][rid] = (_reference_key(policy, req, n), rid)
            event: Event = Submit(req, now)
        elif op < 0.7 and waiting[model]:
            rid = rng.choice(sorted(waiting[model]))
            del waiting[model][rid]
            event = Cancel(rid, now)
        elif running.get(model):
            event = Done("lm-0" if model == "lm" else "e-0", running.pop(model), now)
        else:
            event = Cancel("unknown", now)
        for action in s.handle(event):
            assert isinstance(action, Dispatch), action
            m = "lm" if action.replica == "lm-0" else "emb"
            expected = [rid for _, rid in sorted(waiting[m].values())][: 1 if m == "lm" else 3]
            assert list(action.requests) == expected, (policy, n)
            for rid in expected:
                del waiting[m][rid]
            running[m] = action.requests
        for m in ("lm", "emb"):
            assert s.queue_depth(m) == len(waiting[m])
            assert [r.id for r in s._ordered(m)] == [rid for _, rid in sorted(waiting[m].values())]


def test_stale_entries_are_compacted_so_the_heap_stays_bounded() -> None:
    rng = random.Random(7)
    s = Scheduler("slo", PROPERTY_CLASSES)
    s.add_replica(Replica("lm-0", "lm", "llm", slots=1))
    queue = s._queues["lm"]  # white box: the heap itself
    for i in range(2000):
        s.handle(Submit(llm(f"r{i}", i * 0.001, slo=rng.choice(tuple(PROPERTY_CLASSES))), i * 0.001))
    assert len(queue.heap) == 1999  # r0 runs
    ids = [f"r{i}" for i in range(1, 2000)]
    rng.shuffle(ids)
    most_heap = 0
    for rid in ids[:1900]:
        s.handle(Cancel(rid, 3.0))
        most_heap = max(most_heap, len(queue.heap))
        assert len(queue.heap) <= 2 * len(queue.live)  # stale entries never outnumber live ones
    assert len(queue.live) == 99 and len(queue.heap) <= 198 and most_heap == 1999
    # dispatching shrinks the live entries too: the bound still holds, and an empty queue is empty
    current = "r0"
    for t in range(99):
        (d,) = dispatched(s.handle(Done("lm-0", (current,), 4.0 + t)))
        current = d[1][0]
        assert len(queue.heap) <= 2 * len(queue.live)
    assert s.queue_depth() == 0 and queue.heap == []


def _recount(s: Scheduler) -> None:
    """Every counter equals a recount from the requests themselves."""
    running = {rid for r in s.replicas.values() for rid in r.running}
    waiting = [req for rid, req in s.requests.items() if rid not in running]
    assert s.queue_depth() == len(waiting)
    models = {r.model for r in s.replicas.values()}
    for slo in s.classes:
        mine = [r for r in waiting if r.slo == slo]
        assert s.queue_depth(slo=slo) == len(mine)
        assert s._class_tokens.get(slo, 0) == sum(r.tokens for r in mine)
        for model in models:
            assert s.queue_depth(model, slo) == sum(r.model == model for r in mine)
    for model in models:
        queue = s._queues[model]
        here = [r for r in waiting if r.model == model]
        assert s.queue_depth(model) == len(here) and set(queue.live) == {r.id for r in here}
        assert queue.tokens == sum(r.tokens for r in here)
        assert {p: c for p, (c, _) in queue.by_priority.items()} == {
            p: sum(r.priority == p for r in here) for p in {r.priority for r in here}
        }
        assert {k: t for k, (_, t) in queue.by_class.items()} == {
            k: sum(r.tokens for r in here if r.slo == k) for k in {r.slo for r in here}
        }
        assert len(queue.heap) <= 2 * len(queue.live)


@pytest.mark.parametrize("policy", ["fifo", "priority", "slo", "hybrid"])
def test_counters_equal_a_recount_after_random_events(policy: str) -> None:
    rng = random.Random(99)
    classes = {
        **PROPERTY_CLASSES,
        "small": SLOClass("small", e2e_ms=1_000, max_queue=30, max_queued_tokens=400),
    }
    s = Scheduler(policy, classes, BatchLimits(max_batch_size=4, max_batch_tokens=200, max_wait_ms=5))
    for replica in (
        Replica("lm-0", "lm", "llm", slots=2, device="cuda:0"),
        Replica("lm-1", "lm", "llm", slots=1, device="cuda:1"),
        Replica("e-0", "emb", "embedding", device="cuda:0"),
        Replica("e-1", "emb", "embedding", device="cuda:1"),
    ):
        s.add_replica(replica)
    now = 0.0
    for n in range(4000):
        now += rng.choice((0.0, 0.002, 0.01))
        op = rng.random()
        replica = rng.choice(tuple(s.replicas.values()))
        event: Event
        if op < 0.45:
            kind = rng.choice(("lm", "emb"))
            slo = rng.choice(tuple(classes))
            tokens = rng.randint(1, 80)
            req = llm(f"r{n}", now, slo=slo) if kind == "lm" else emb(f"r{n}", now, tokens=tokens, slo=slo)
            req.tokens, req.priority = tokens, rng.randint(-3, 3)
            event = Submit(req, now)
        elif op < 0.6 and s.requests:
            event = Cancel(rng.choice(sorted(s.requests)), now)
        elif op < 0.85 and replica.running:
            ids = tuple(replica.running)
            failed = rng.random() < 0.1
            event = Done(replica.id, ids if replica.kind == "embedding" else ids[:1], now, failed=failed)
        elif op < 0.9 and replica.running:
            event = FirstToken(replica.id, next(iter(replica.running)), now)
        elif op < 0.93:
            event = ReplicaDown(replica.id, now) if replica.healthy else ReplicaUp(replica.id, now)
        elif op < 0.95:
            event = ReplicaUp(replica.id, now)
        else:
            event = Tick(now)
        s.handle(event)
        _recount(s)


def test_a_request_that_failed_on_the_only_free_replica_is_set_aside_not_lost() -> None:
    s = Scheduler("fifo", CLASSES)
    s.add_replica(Replica("a", "lm", "llm", slots=1))
    s.add_replica(Replica("b", "lm", "llm", slots=1))
    s.handle(Submit(llm("x", 0.0), 0.0))
    s.handle(Submit(llm("y", 0.0), 0.0))
    assert dispatched(s.handle(Done("a", ("x",), 0.5, failed=True, reason="reset"))) == []
    s.handle(Submit(llm("z", 0.6), 0.6))
    # a is back and free: x (first in line, but it failed on a) waits for b, z goes to a
    assert dispatched(s.handle(ReplicaUp("a", 0.7))) == [("a", ("z",))]
    assert s.queue_depth("lm") == 1
    assert dispatched(s.handle(Done("b", ("y",), 0.8))) == [("b", ("x",))]


def test_an_embedding_batch_not_yet_due_leaves_the_queue_as_it_was() -> None:
    s = Scheduler("priority", CLASSES, BatchLimits(max_batch_size=8, max_wait_ms=10))
    s.add_replica(Replica("e-0", "emb", "embedding"))
    for rid, t, priority in (("a", 0.0, 3), ("b", 0.001, -1), ("c", 0.002, 1)):
        req = emb(rid, t)
        req.priority = priority
        s.handle(Submit(req, t))
    for t in (0.004, 0.008):
        assert dispatched(s.handle(Tick(t))) == []
        assert [r.id for r in s._ordered("emb")] == ["b", "c", "a"] and len(s._queues["emb"].heap) == 3
    assert dispatched(s.handle(Tick(0.0101))) == [("e-0", ("b", "c", "a"))]
    assert s.queue_depth() == 0


def test_policies_are_objects_named_in_a_registry() -> None:
    from sage_prefect.controlplane.scheduler import POLICIES

    assert tuple(POLICIES) == ("fifo", "priority", "slo", "hybrid") and "slo" in POLICIES
    for name in POLICIES:
        s = Scheduler(name, CLASSES)
        assert s.policy == name and s.ordering.co_schedules == (name == "hybrid")


def test_admission_answers_as_submit_would_without_changing_anything() -> None:
    """The gateway asks `admission` before it tokenises a request: the same answer `Submit`
    gives a request of no tokens, and no state changes (no request is queued or counted)."""
    s = _llm_at_4s_per_request("fifo", LATE, 1)
    for i in range(3):
        s.handle(Submit(llm(f"w{i}", 5.0), 5.0))
    assert s.admission("lm", "llm", "chat") is None  # 3 x 4 s = 12 s < 15 s
    depth, known = s.queue_depth(), dict(s.requests)
    s.handle(Submit(llm("w3", 5.0), 5.0))
    s.handle(Submit(llm("w4", 5.0), 5.0))
    late = s.admission("lm", "llm", "chat")  # 5 x 4 s = 20 s > 15 s
    assert late is not None and (late.status, late.code) == (429, "deadline_unreachable")
    (reject,) = s.handle(Submit(llm("c", 5.0, slo="chat"), 5.0))
    assert isinstance(reject, Reject) and reject.code == late.code and reject.retry_after == late.retry_after
    assert s.queue_depth() == depth + 2 and set(s.requests) == {*known, "w3", "w4"}
    assert s.admission("no-such-model", "llm", "chat") is None  # Submit answers that one (404)


def test_an_embedding_estimate_counts_the_running_batch_and_its_own_batchs_size() -> None:
    """Under a queue, a request's answer waits for the batch running now and for its own batch,
    which fills up like recent ones: a 10-token request behind a queue is not 10 tokens of work."""
    classes = {"tight": SLOClass("tight", e2e_ms=5_000, reject_when_late=True, max_queue=100)}
    s = Scheduler("fifo", classes, BatchLimits(max_batch_size=4, max_wait_ms=10_000))
    s.add_replica(Replica("e-0", "emb", "embedding"))
    first = [emb(f"a{i}", 0.0, tokens=100, slo="tight") for i in range(4)]
    for req in first:
        s.handle(Submit(req, 0.0))
    s.handle(Done("e-0", tuple(r.id for r in first), 1.0))  # a batch of 400 tokens in 1 s
    for i in range(4):
        s.handle(Submit(emb(f"r{i}", 1.0, tokens=100, slo="tight"), 1.0))  # one batch running now
    for i in range(4):
        s.handle(Submit(emb(f"w{i}", 1.0, tokens=300, slo="tight"), 1.0))  # 1200 tokens waiting
    # 400 running + 1200 waiting + a batch like the recent ones (400) = 2000 tokens: 5 s, on time
    assert s.admission("emb", "embedding", "tight") is None
    s.handle(Submit(emb("w4", 1.0, tokens=100, slo="tight"), 1.0))
    late = s.admission("emb", "embedding", "tight")  # 2100 tokens: 5.25 s > 5 s
    assert late is not None and late.code == "deadline_unreachable" and "(5250 ms)" in late.message
