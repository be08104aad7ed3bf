"""Autoscaling in the scheduler: `ScaleUp` / `StopReplica` decided from events alone (no cluster,
no clock). A model's scaling is evaluated at most once per 0.25 s of ``now``, so the tests space
the events that should be evaluated by at least that much."""

from __future__ import annotations

import pytest

from sage_prefect.controlplane.scheduler import (
    Action,
    BatchLimits,
    Dispatch,
    Done,
    Fail,
    Reject,
    Replica,
    ReplicaDown,
    ReplicaRemoved,
    ReplicaStarted,
    ReplicaStartFailed,
    ReplicaUp,
    Request,
    ScalePolicy,
    ScaleUp,
    Scheduler,
    SLOClass,
    StopReplica,
    Submit,
    Tick,
    WakeAt,
)

CLASSES = {
    "chat": SLOClass("chat", ttft_ms=8_000, e2e_ms=60_000, max_queue=100),
    # an embedding request is judged on e2e_ms; ttft_ms is there to show that it is not used
    "embed": SLOClass("embed", ttft_ms=100, e2e_ms=2_000, max_queue=100),
}


def llm(rid: str, t: float, model: str = "lm") -> Request:
    return Request(rid, model, "llm", "chat", t, tokens=10, max_tokens=16)


def ups(actions: list[Action]) -> list[tuple[str, int]]:
    return [(a.model, a.count) for a in actions if isinstance(a, ScaleUp)]


def stops(actions: list[Action]) -> list[str]:
    return [a.replica for a in actions if isinstance(a, StopReplica)]


def dispatched(actions: list[Action]) -> list[tuple[str, tuple[str, ...]]]:
    return [(a.replica, a.requests) for a in actions if isinstance(a, Dispatch)]


def wakes(actions: list[Action]) -> list[float]:
    return [a.time for a in actions if isinstance(a, WakeAt)]


def measured(replicas: int = 1, seconds: float = 4.0, slots: int = 1) -> Scheduler:
    """An LLM model ``lm`` on ``replicas`` idle replicas, measured at ``seconds`` per request
    (one warm-up request each, done by ``now == seconds``); no scaling policy yet."""
    s = Scheduler("fifo", CLASSES)
    for i in range(replicas):
        s.add_replica(Replica(f"lm-{i}", "lm", "llm", slots=slots))
    for i in range(replicas):
        s.handle(Submit(llm(f"warm{i}", 0.0), 0.0))
    for i in range(replicas):
        s.handle(Done(f"lm-{i}", (f"warm{i}",), seconds))
    return s


def test_a_policy_is_checked() -> None:
    with pytest.raises(ValueError, match="min_replicas <= max_replicas"):
        ScalePolicy(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="down_ratio < up_ratio"):
        ScalePolicy(up_ratio=0.1, down_ratio=0.2)
    with pytest.raises(ValueError, match="queue_per_replica"):
        ScalePolicy(queue_per_replica=0)


def test_below_min_replicas_the_missing_ones_are_asked_for_once() -> None:
    s = Scheduler("fifo", CLASSES)
    s.add_replica(Replica("lm-0", "lm", "llm"))
    s.set_scaling("lm", ScalePolicy(min_replicas=3, max_replicas=5))
    (up,) = [a for a in s.handle(Tick(0.0)) if isinstance(a, ScaleUp)]
    assert (up.model, up.count) == ("lm", 2) and "below min_replicas 3" in up.reason
    assert s.scaling_state("lm") == {"ready": 1, "starting": 2, "draining": 0, "pressure": 0.0, "desired": 3}
    assert ups(s.handle(Tick(1.0))) == []  # counted as starting until they come back


def test_a_started_replica_is_registered_and_takes_the_queue() -> None:
    s = Scheduler("fifo", CLASSES)
    s.set_scaling("lm", ScalePolicy(min_replicas=1, max_replicas=2))  # no replica yet
    assert ups(s.handle(Tick(0.0))) == [("lm", 1)]
    # while it starts, requests queue instead of being refused
    assert s.handle(Submit(llm("a", 0.5), 0.5)) == []
    assert s.queue_depth("lm") == 1
    started = s.handle(ReplicaStarted(Replica("lm-0", "lm", "llm"), 1.0))
    assert dispatched(started) == [("lm-0", ("a",))]
    assert "lm-0" in s.replicas and s.scaling_state("lm")["starting"] == 0
    assert dispatched(s.handle(Done("lm-0", ("a",), 2.0))) == []
    assert dispatched(s.handle(Submit(llm("b", 3.0), 3.0))) == [("lm-0", ("b",))]


def test_sustained_pressure_scales_up_in_proportion_and_never_beyond_max() -> None:
    s = measured(seconds=4.0)  # 4 s per request, 1 slot; chat's TTFT objective is 8 s
    s.set_scaling("lm", ScalePolicy(min_replicas=1, max_replicas=3, up_ratio=0.5))
    assert dispatched(s.handle(Submit(llm("r0", 5.0), 5.0))) == [("lm-0", ("r0",))]
    # one waiting: a new request would wait 4 s, 50 % of 8 s: at the threshold, not past it
    assert ups(s.handle(Submit(llm("r1", 5.5), 5.5))) == []
    # evaluated at most every 0.25 s: an event in between asks for a wake-up, once
    (wake,) = wakes(s.handle(Submit(llm("r2", 5.6), 5.6)))
    assert wake == pytest.approx(5.75) and wakes(s.handle(Submit(llm("r3", 5.6), 5.6))) == []
    # three waiting: 12 s is 150 % of the objective, three times the threshold: 3 replicas
    (up,) = [a for a in s.handle(Tick(wake)) if isinstance(a, ScaleUp)]
    assert (up.model, up.count) == ("lm", 2)
    assert "estimated wait 12.0 s is 150% of the chat objective 8.0 s" in up.reason
    for i in range(4, 20):
        s.handle(Submit(llm(f"r{i}", 6.0), 6.0))
    assert ups(s.handle(Tick(6.5))) == []  # 3 = max_replicas, counting the starting ones
    s.handle(ReplicaStarted(Replica("lm-1", "lm", "llm"), 7.0))
    s.handle(ReplicaStarted(Replica("lm-2", "lm", "llm"), 7.0))
    assert ups(s.handle(Tick(8.0))) == []
    assert s.scaling_state("lm")["ready"] == 3 and s.scaling_state("lm")["desired"] == 3


def test_no_second_scale_up_while_one_starts_unless_the_target_grows() -> None:
    s = measured(seconds=4.0)
    s.set_scaling("lm", ScalePolicy(min_replicas=1, max_replicas=6, up_ratio=0.5))
    for rid in ("r0", "r1", "r2"):  # r0 runs, two wait: 8 s, pressure 1.0, twice the threshold
        s.handle(Submit(llm(rid, 5.0), 5.0))
    assert ups(s.handle(Tick(5.5))) == [("lm", 1)]
    assert ups(s.handle(Tick(6.0))) == []  # same pressure: the one starting covers it
    s.handle(Submit(llm("r3", 6.1), 6.1))
    s.handle(Submit(llm("r4", 6.1), 6.1))
    # four wait: 16 s, pressure 2.0: 4 replicas wanted, 1 ready and 1 starting
    assert ups(s.handle(Tick(6.5))) == [("lm", 2)]
    assert ups(s.handle(Tick(7.0))) == []
    assert s.scaling_state("lm")["starting"] == 3


def test_overload_before_any_measurement_counts_as_twice_the_threshold() -> None:
    s = Scheduler("fifo", CLASSES)
    s.add_replica(Replica("lm-0", "lm", "llm"))
    s.set_scaling("lm", ScalePolicy(min_replicas=1, max_replicas=4, up_ratio=0.5))
    s.handle(Submit(llm("a", 0.0), 0.0))  # runs
    s.handle(Submit(llm("b", 0.1), 0.1))  # waits, every slot busy, no speed known
    (up,) = [a for a in s.handle(Tick(0.25)) if isinstance(a, ScaleUp)]
    assert up.count == 1 and "no speed is measured yet" in up.reason
    assert s.scaling_state("lm")["pressure"] == 1.0


def test_a_failed_start_fails_the_queue_and_backs_off_for_retry_s() -> None:
    s = Scheduler("fifo", CLASSES)
    s.set_scaling("lm", ScalePolicy(min_replicas=1, max_replicas=2, retry_s=10.0))
    assert ups(s.handle(Tick(0.0))) == [("lm", 1)]
    assert s.handle(Submit(llm("a", 0.5), 0.5)) == []
    failed = s.handle(ReplicaStartFailed("lm", 1.0, "no worker has 40 GiB free"))
    (fail,) = [a for a in failed if isinstance(a, Fail)]
    assert fail.request == "a" and fail.status == 503 and "no worker has 40 GiB free" in fail.message
    assert ups(failed) == [] and wakes(failed) == [11.0]  # the end of the backoff
    (reject,) = s.handle(Submit(llm("b", 2.0), 2.0))  # nothing serves, nothing starts
    assert isinstance(reject, Reject) and reject.status == 503
    assert ups(s.handle(Tick(5.0))) == []
    assert ups(s.handle(Tick(11.0))) == [("lm", 1)]


def test_scale_down_waits_for_a_quiet_delay_goes_one_at_a_time_and_never_below_min() -> None:
    s = Scheduler("fifo", CLASSES)
    for i in range(3):
        s.add_replica(Replica(f"lm-{i}", "lm", "llm", slots=4))
    s.set_scaling("lm", ScalePolicy(min_replicas=1, max_replicas=3, down_delay_s=60.0))
    assert s.handle(Tick(0.0)) == [WakeAt(60.0)]  # quiet from now on: the timer is asked for
    assert stops(s.handle(Tick(30.0))) == []
    first = s.handle(Tick(60.0))
    assert stops(first) == ["lm-2"] and wakes(first) == [120.0]  # idle: the most recently added
    assert s.replicas["lm-2"].draining and s.scaling_state("lm")["ready"] == 2
    s.handle(ReplicaRemoved("lm-2", 61.0))
    assert "lm-2" not in s.replicas
    assert stops(s.handle(Tick(100.0))) == []  # the second needs another full delay
    assert stops(s.handle(Tick(120.0))) == ["lm-1"]
    s.handle(ReplicaRemoved("lm-1", 121.0))
    late = s.handle(Tick(1000.0))
    assert stops(late) == [] and wakes(late) == []  # at min_replicas: no timer either
    assert s.scaling_state("lm") == {"ready": 1, "starting": 0, "draining": 0, "pressure": 0.0, "desired": 1}


def test_no_scale_down_soon_after_a_scale_up_or_while_work_would_not_fit() -> None:
    s = Scheduler("fifo", CLASSES)
    s.add_replica(Replica("lm-0", "lm", "llm", slots=2))
    s.add_replica(Replica("lm-1", "lm", "llm", slots=2))
    s.set_scaling("lm", ScalePolicy(min_replicas=1, max_replicas=3, down_delay_s=60.0))
    for rid in ("a", "b"):  # 2 busy of 4 slots: more than half of one replica's 2
        s.handle(Submit(llm(rid, 0.0), 0.0))
    assert wakes(s.handle(Tick(0.5))) == []  # not quiet: no timer
    assert stops(s.handle(Tick(100.0))) == []
    s.handle(Done("lm-1", ("b",), 100.5))  # 1 busy: quiet from now
    s.handle(ReplicaStarted(Replica("lm-2", "lm", "llm", slots=2), 130.0))
    assert stops(s.handle(Tick(160.5))) == []  # quiet for 60 s, but lm-2 started 30.5 s ago
    assert stops(s.handle(Tick(189.5))) == []
    assert stops(s.handle(Tick(190.0))) == ["lm-2"]


def test_a_draining_replica_takes_no_new_work_and_is_stopped_once_after_its_last_done() -> None:
    s = Scheduler("fifo", CLASSES)
    s.add_replica(Replica("a", "lm", "llm", slots=8))
    s.add_replica(Replica("b", "lm", "llm", slots=8))
    s.set_scaling("lm", ScalePolicy(min_replicas=1, max_replicas=2, down_delay_s=60.0))
    assert dispatched(s.handle(Submit(llm("x1", 0.0), 0.0))) == [("a", ("x1",))]
    assert dispatched(s.handle(Submit(llm("x2", 0.0), 0.0))) == [("b", ("x2",))]
    assert dispatched(s.handle(Submit(llm("x3", 0.0), 0.0))) == [("a", ("x3",))]
    # 3 busy of 16 slots fit in one replica at half load: quiet; b runs the least work
    drain = s.handle(Tick(60.0))
    assert stops(drain) == [] and s.replicas["b"].draining and not s.replicas["a"].draining
    assert s.replicas["b"].free == 0
    assert dispatched(s.handle(Submit(llm("y", 61.0), 61.0))) == [("a", ("y",))]  # b is less loaded
    done = s.handle(Done("b", ("x2",), 62.0))
    (stop,) = [a for a in done if isinstance(a, StopReplica)]
    assert stop.replica == "b" and "could do with one replica fewer" in stop.reason
    assert stops(s.handle(Tick(63.0))) == []
    assert stops(s.handle(Done("a", ("x1",), 200.0))) == []  # a is the last serving replica
    assert stops(s.handle(Tick(400.0))) == []
    assert s.scaling_state("lm")["draining"] == 1
    s.handle(ReplicaRemoved("b", 401.0))
    assert s.scaling_state("lm")["draining"] == 0 and s.scaling_state("lm")["ready"] == 1


def test_a_drain_is_called_off_when_the_replica_is_all_that_is_left() -> None:
    s = Scheduler("fifo", CLASSES)
    s.add_replica(Replica("a", "lm", "llm", slots=8))
    s.add_replica(Replica("b", "lm", "llm", slots=8))
    s.set_scaling("lm", ScalePolicy(min_replicas=1, max_replicas=2, down_delay_s=60.0))
    s.handle(Submit(llm("x1", 0.0), 0.0))  # on a
    s.handle(Submit(llm("x2", 0.0), 0.0))  # on b
    s.handle(Submit(llm("x3", 0.0), 0.0))  # on a
    s.handle(Tick(60.0))
    assert s.replicas["b"].draining
    down = s.handle(ReplicaDown("a", 61.0, "worker lost"))
    assert [a for a in down if isinstance(a, Fail)] == [] and not s.replicas["b"].draining
    assert dispatched(s.handle(Submit(llm("y", 62.0), 62.0))) == [("b", ("y",))]
    assert stops(s.handle(Done("b", ("x2",), 63.0))) == []


def test_a_removed_replicas_running_work_is_retried_elsewhere() -> None:
    s = Scheduler("fifo", CLASSES)
    s.add_replica(Replica("a", "lm", "llm", slots=1))
    s.add_replica(Replica("b", "lm", "llm", slots=2))
    assert dispatched(s.handle(Submit(llm("r1", 0.0), 0.0))) == [("a", ("r1",))]
    removed = s.handle(ReplicaRemoved("a", 1.0))
    assert removed == [Dispatch("b", ("r1",))]
    assert "a" not in s.replicas and s.requests["r1"].attempts == 2
    assert s.handle(Done("a", ("r1",), 1.5)) == []  # from a replica that is gone: ignored
    assert "r1" in s.replicas["b"].running
    assert dispatched(s.handle(Submit(llm("r2", 2.0), 2.0))) == [("b", ("r2",))]
    s.handle(Submit(llm("r3", 2.0), 2.0))  # waits
    gone = s.handle(ReplicaRemoved("b", 3.0))  # the last one, no policy: everything fails
    assert sorted(a.request for a in gone if isinstance(a, Fail) and a.status == 503) == ["r1", "r2", "r3"]
    (reject,) = s.handle(Submit(llm("r4", 4.0), 4.0))
    assert isinstance(reject, Reject) and reject.status == 503


def test_a_restarting_replica_keeps_its_queue_and_serves_it_when_up() -> None:
    s = Scheduler("fifo", CLASSES)
    s.add_replica(Replica("lm-0", "lm", "llm"))
    assert dispatched(s.handle(Submit(llm("a", 0.0), 0.0))) == [("lm-0", ("a",))]
    s.handle(Submit(llm("b", 0.1), 0.1))
    assert s.handle(ReplicaDown("lm-0", 1.0, "worker died", restarting=True)) == []
    assert s.handle(Done("lm-0", ("a",), 1.5, failed=True, reason="worker died")) == []  # re-queued
    assert s.handle(Submit(llm("c", 2.0), 2.0)) == []  # queued, not refused
    assert s.admission("lm", "llm", "chat") is None
    assert s.queue_depth("lm") == 3 and s.scaling_state("lm")["ready"] == 1
    assert dispatched(s.handle(ReplicaUp("lm-0", 3.0))) == [("lm-0", ("a",))]
    assert not s.replicas["lm-0"].restarting
    assert dispatched(s.handle(Done("lm-0", ("a",), 4.0))) == [("lm-0", ("b",))]
    assert dispatched(s.handle(Done("lm-0", ("b",), 5.0))) == [("lm-0", ("c",))]
    # a replica down for good still fails the queue at once
    s.handle(Submit(llm("d", 6.0), 6.0))
    down = s.handle(ReplicaDown("lm-0", 7.0, "gone"))
    assert [(a.request, a.status) for a in down if isinstance(a, Fail)] == [("d", 503)]


def test_queue_per_replica_scales_up_where_the_wait_estimate_does_not() -> None:
    def loaded(queue_per_replica: float | None) -> list[Action]:
        s = measured(replicas=2, seconds=0.1)  # fast: 10 waiting is 0.5 s, 6 % of the objective
        s.set_scaling("lm", ScalePolicy(min_replicas=1, max_replicas=4, queue_per_replica=queue_per_replica))
        for i in range(12):  # 2 run, 10 wait: 5 per replica
            s.handle(Submit(llm(f"r{i}", 1.0), 1.0))
        return s.handle(Tick(1.25))

    assert ups(loaded(None)) == []
    # 5 per replica over 4 is 1.25 times the threshold: ceil(2 * 1.25) = 3 replicas
    (up,) = [a for a in loaded(4) if isinstance(a, ScaleUp)]
    assert up.count == 1 and "5.0 requests wait per replica" in up.reason


def test_an_embedding_model_scales_on_its_end_to_end_objective() -> None:
    s = Scheduler("fifo", CLASSES, BatchLimits(max_batch_size=1, max_wait_ms=0))
    s.add_replica(Replica("e-0", "emb", "embedding"))

    def emb(rid: str, t: float) -> Request:
        return Request(rid, "emb", "embedding", "embed", t, tokens=100)

    s.handle(Submit(emb("warm", 0.0), 0.0))
    s.handle(Done("e-0", ("warm",), 1.0))  # 100 tokens per second, batches of 100
    s.set_scaling("emb", ScalePolicy(min_replicas=1, max_replicas=10, up_ratio=0.5))
    assert dispatched(s.handle(Submit(emb("run", 2.0), 2.0))) == [("e-0", ("run",))]
    for i in range(3):
        s.handle(Submit(emb(f"q{i}", 2.0), 2.0))
    # 100 running + 300 waiting + a batch of 100 of its own: 5 s, 250 % of e2e_ms (2 s);
    # on ttft_ms (0.1 s) it would be 5000 % and ask for max_replicas
    (up,) = [a for a in s.handle(Tick(2.25)) if isinstance(a, ScaleUp)]
    assert (up.model, up.count) == ("emb", 4)
    assert "estimated wait 5.0 s is 250% of the embed objective 2.0 s" in up.reason


def test_models_without_a_policy_get_no_scaling_actions() -> None:
    s = measured(seconds=4.0)
    s.add_replica(Replica("other-0", "other", "llm"))
    kinds: set[type] = set()
    for i in range(40):
        t = 5.0 + i
        kinds |= {type(a) for a in s.handle(Submit(llm(f"r{i}", t), t))}
        kinds |= {type(a) for a in s.handle(Submit(llm(f"o{i}", t, model="other"), t))}
        kinds |= {type(a) for a in s.handle(Tick(t + 0.5))}
    kinds |= {type(a) for a in s.handle(ReplicaDown("other-0", 50.0, "x", restarting=True))}
    kinds |= {type(a) for a in s.handle(ReplicaUp("other-0", 51.0))}
    assert kinds <= {Dispatch, Reject}
    state = s.scaling_state("lm")
    assert state["pressure"] > 0.5 and state["desired"] == state["ready"] == 1
    # a policy on one model scales that model only
    assert s.scaled_models() == []
    s.set_scaling("lm", ScalePolicy(min_replicas=1, max_replicas=2))
    assert s.scaled_models() == ["lm"]
    actions = s.handle(Tick(100.0))
    assert ups(actions) == [("lm", 1)] and stops(actions) == []
