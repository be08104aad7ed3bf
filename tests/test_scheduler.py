"""The scheduler state machine, driven by events alone (no sockets, no threads, no clock)."""

from __future__ import annotations

import pytest

from sage_prefect.controlplane.config import ControlPlaneConfig
from sage_prefect.controlplane.scheduler import (
    BatchLimits,
    Cancel,
    Dispatch,
    Done,
    Fail,
    FirstToken,
    Load,
    Reject,
    Replica,
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
