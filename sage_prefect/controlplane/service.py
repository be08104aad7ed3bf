"""The control plane's runtime: carries out the scheduler's actions on real engines.

Everything here runs on one asyncio loop. Requests become `scheduler.Request` objects and a
future; the scheduler's `Dispatch` actions start embedding batches (in a worker thread) or
hand an LLM request to a replica; `Reject`/`Fail` become errors the gateway turns into
HTTP answers; `WakeAt` schedules a `Tick`. Engines that fail are reported to the scheduler,
which takes the replica out and retries the work elsewhere.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from sage_prefect.controlplane.config import ControlPlaneConfig, ModelConfig
from sage_prefect.controlplane.engines.base import (
    EmbeddingEngine,
    EngineError,
    GenerationRequest,
    LLMEngine,
    RequestFailed,
    TokenEvent,
    UpstreamError,
)
from sage_prefect.controlplane.metrics import Metrics
from sage_prefect.controlplane.scheduler import (
    Action,
    Cancel,
    Dispatch,
    Done,
    Event,
    Fail,
    FirstToken,
    Kind,
    Load,
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
    StopReplica,
    Submit,
    Tick,
    WakeAt,
)

if TYPE_CHECKING:
    from sage_prefect.controlplane.supervisor import ReplicaInfo, Supervisor

logger = logging.getLogger("sage_prefect.controlplane")


class ServiceError(Exception):
    """A request the control plane cannot serve: carries the HTTP status and OpenAI error fields."""

    def __init__(
        self, status: int, message: str, *, code: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after


EngineFactory = Callable[[ModelConfig, int], EmbeddingEngine | LLMEngine]


def build_engine(model: ModelConfig, index: int) -> EmbeddingEngine | LLMEngine:
    """Construct one replica of a configured model (imports the engine module lazily)."""
    params = dict(model.params)
    if model.engine == "sentence-transformers":
        from sage_prefect.controlplane.engines.sentence_transformers import SentenceTransformerEngine

        params.setdefault("model", model.name)
        return SentenceTransformerEngine(device=model.device or "cpu", name=model.name, **params)
    if model.engine == "transformers":
        from sage_prefect.controlplane.engines.local_llm import TransformersLLMEngine

        params.setdefault("model", model.name)
        return TransformersLLMEngine(device=model.device or "cpu", name=model.name, **params)
    if model.engine == "vllm":  # untested here (no GPU): engines/vllm_engine.py, docs/vllm.md
        from sage_prefect.controlplane.engines.vllm_engine import VLLMEngine

        params.setdefault("model", model.name)
        if model.slots is not None:
            params.setdefault("slots", model.slots)
        return VLLMEngine(name=model.name, **params)
    from sage_prefect.controlplane.engines import openai_upstream

    urls = params.pop("base_urls", None)
    if urls:
        params["base_url"] = urls[index % len(urls)]
    if model.kind == "embedding":
        return openai_upstream.OpenAIEmbeddingEngine(name=model.name, **params)
    return openai_upstream.OpenAILLMEngine(name=model.name, **params)


def upstream_engine(model: ModelConfig, base_url: str, api_key: str | None) -> EmbeddingEngine | LLMEngine:
    """The engine the gateway routes a placed replica's traffic through: the ``openai``
    upstream engine, pointed at the replica's server (the project's own engine server serves
    the model under its configured name; a ``command`` server under ``params.model``)."""
    from sage_prefect.controlplane.engines import openai_upstream

    served = str(model.params.get("model", model.name)) if model.engine == "command" else model.name
    common: dict[str, Any] = {"model": served, "api_key": api_key or "EMPTY", "name": model.name}
    if model.kind == "embedding":
        return openai_upstream.OpenAIEmbeddingEngine(
            base_url,
            dimensions=int(model.params.get("dimensions", 0)),
            max_input_tokens=int(model.params.get("max_input_tokens", 8192)),
            **common,
        )
    return openai_upstream.OpenAILLMEngine(base_url, slots=placed_slots(model), **common)


def placed_slots(model: ModelConfig) -> int:
    """Requests the gateway keeps in flight on one placed replica: ``slots``, else what the
    engine batches (the local engine's ``max_batch_size``, 16 by default; 64 for a server)."""
    if model.kind == "embedding":
        return 1  # one coalesced batch at a time, as in-process replicas
    if model.slots:
        return model.slots
    if model.engine == "transformers":
        return int(model.params.get("max_batch_size", 16))
    return int(model.params.get("slots", 64))  # vllm, command: the server batches


@dataclass
class _Waiter:
    request: Request
    future: asyncio.Future[Any]
    texts: list[str] | None = None


class ControlPlane:
    """Models, replicas, the scheduler and the metrics of one control-plane process."""

    def __init__(
        self,
        config: ControlPlaneConfig,
        *,
        engine_factory: EngineFactory = build_engine,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.scheduler = Scheduler(
            config.policy, config.slo_classes(), config.batch_limits(), max_attempts=config.max_attempts
        )
        self.metrics = metrics or Metrics()
        self.models: dict[str, ModelConfig] = {m.name: m for m in config.models}
        self.engines: dict[str, EmbeddingEngine | LLMEngine] = {}
        self._factory = engine_factory
        self._waiters: dict[str, _Waiter] = {}
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.supervisor: Supervisor | None = None
        self._fronts: dict[str, EmbeddingEngine | LLMEngine] = {}  # placed models, before any replica
        self._start_failures: dict[str, str] = {}
        self.started = False

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for model in self.config.models:
            if model.placed:
                continue
            for index in range(model.replicas.min):
                replica_id = f"{model.name}#{index}"
                engine = await asyncio.to_thread(self._factory, model, index)
                self.engines[replica_id] = engine
                slots = (
                    1 if model.kind == "embedding" else int(model.slots or getattr(engine, "slots", 1) or 1)
                )
                self.scheduler.add_replica(
                    Replica(replica_id, model.name, model.kind, slots=slots, device=model.device)
                )
                logger.info("replica %s ready (%s, %s)", replica_id, model.engine, model.device)
        self.metrics.watch(self.scheduler)
        placed = [m for m in self.config.models if m.placed]
        if placed:
            await self._start_placed(placed)
        self._monitor = asyncio.create_task(self._watch_replicas())
        self.started = True

    async def _start_placed(self, models: list[ModelConfig]) -> None:
        """Connect to the cluster, start each placed model's ``replicas.min`` replicas (the
        scheduler asks for them: `ScaleUp`) and wait until they serve."""
        from sage_prefect.controlplane.supervisor import Supervisor

        self.supervisor = Supervisor(self.config, self)
        await self.supervisor.start(models)
        self.metrics.watch_placements(self.supervisor, self.scheduler)
        loop = self._running_loop()
        for model in models:
            self._fronts[model.name] = upstream_engine(model, "http://replica.invalid/v1", None)
            r = model.replicas
            self.scheduler.set_scaling(
                model.name,
                ScalePolicy(
                    min_replicas=r.min,
                    max_replicas=r.max,
                    up_ratio=r.up_ratio,
                    down_ratio=r.down_ratio,
                    down_delay_s=r.down_delay_s,
                    queue_per_replica=r.queue_per_replica,
                    retry_s=r.retry_s,
                ),
            )
        self._feed(Tick(loop.time()))  # below min_replicas: the scheduler asks for them
        try:
            await self._await_min_replicas(models)
        except BaseException:
            await self.supervisor.close()
            raise

    async def _await_min_replicas(self, models: list[ModelConfig]) -> None:
        assert self.supervisor is not None
        loop = self._running_loop()
        timeout = max(m.ready_timeout_s for m in models) * 1.5 + 30
        deadline = loop.time() + timeout
        while True:
            missing = {
                m.name: m.replicas.min - sum(1 for r in self.scheduler.replicas.values() if r.model == m.name)
                for m in models
            }
            if all(n <= 0 for n in missing.values()):
                return
            failed = {name: why for name, why in self._start_failures.items() if missing.get(name, 0) > 0}
            if failed:
                name, why = next(iter(failed.items()))
                raise RuntimeError(f"model {name!r}: a replica could not be started: {why}")
            if loop.time() > deadline:
                waiting = ", ".join(f"{k} ({v} more)" for k, v in missing.items() if v > 0)
                raise TimeoutError(
                    f"placed replicas did not all serve within {timeout:.0f} s: {waiting}; "
                    f"states: {self.supervisor.snapshot()}"
                )
            await asyncio.sleep(0.2)

    # ---- what the supervisor reports (supervisor.ReplicaListener) --------------------

    def replica_ready(self, info: ReplicaInfo) -> None:
        assert info.url is not None
        loop = self._running_loop()
        engine = upstream_engine(info.model, f"{info.url}/v1", info.api_key)
        old = self.engines.get(info.id)
        self.engines[info.id] = engine
        if old is not None:
            self._spawn(_close_engine(old))
        if info.id in self.scheduler.replicas:
            self._feed(ReplicaUp(info.id, loop.time()))
            return
        model = info.model
        replica = Replica(info.id, model.name, model.kind, slots=placed_slots(model), supervised=True)
        self._feed(ReplicaStarted(replica, loop.time()))
        self.metrics.watch_replica(replica)

    def replica_down(self, info: ReplicaInfo, reason: str) -> None:
        if info.id in self.scheduler.replicas:
            self.metrics.replica_failed(info.id)
            self._feed(ReplicaDown(info.id, self._running_loop().time(), reason, restarting=True))

    def replica_start_failed(self, info: ReplicaInfo, reason: str) -> None:
        self._start_failures[info.model.name] = reason
        self.metrics.scale_events.labels(info.model.name, "start_failed").inc()
        self._feed(ReplicaStartFailed(info.model.name, self._running_loop().time(), reason))

    def replica_removed(self, info: ReplicaInfo) -> None:
        engine = self.engines.pop(info.id, None)
        if engine is not None:
            self._spawn(_close_engine(engine))
        self._feed(ReplicaRemoved(info.id, self._running_loop().time()))

    async def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        if self.supervisor is not None:
            await self.supervisor.close()
        for engine in [*self.engines.values(), *self._fronts.values()]:
            try:
                if isinstance(engine, LLMEngine):
                    await engine.aclose()
                else:
                    await asyncio.to_thread(engine.close)
            except Exception:  # pragma: no cover - shutting down anyway
                logger.debug("engine close failed", exc_info=True)
        self.started = False

    # ---- requests --------------------------------------------------------------------

    def model(self, name: str, kind: str) -> ModelConfig:
        model = self.models.get(name)
        if model is None or model.kind != kind:
            available = sorted(m.name for m in self.models.values() if m.kind == kind)
            raise ServiceError(
                404,
                f"The model '{name}' does not exist or does not serve this endpoint; "
                f"available {kind} models: {', '.join(available) or 'none'}",
                code="model_not_found",
            )
        return model

    def _engine(self, model: str, kind: str) -> EmbeddingEngine | LLMEngine:
        """An engine of ``model`` (its first replica), for token counting and prompt rendering."""
        self.model(model, kind)
        replica = next((r.id for r in self.scheduler.replicas.values() if r.model == model), None)
        if replica is None or replica not in self.engines:
            return self._fronts[model]  # a placed model whose replicas are all starting
        return self.engines[replica]

    def embedding_engine(self, model: str) -> EmbeddingEngine:
        engine = self._engine(model, "embedding")
        assert isinstance(engine, EmbeddingEngine)
        return engine

    def llm_engine(self, model: str) -> LLMEngine:
        engine = self._engine(model, "llm")
        assert isinstance(engine, LLMEngine)
        return engine

    def admit(self, model: str, kind: Kind, slo: str) -> None:
        """Refuse at once what admission control would refuse anyway (a full queue, a wait past
        the class's objective), before the request is tokenised or rendered: under overload a
        refusal must cost the least. 404 for a model that does not serve ``kind``."""
        self.model(model, kind)
        reject = self.scheduler.admission(model, kind, slo)
        if reject is not None:
            self.metrics.rejected(model, slo, reject.code)
            raise ServiceError(
                reject.status, reject.message, code=reject.code, retry_after=reject.retry_after
            )

    async def embed(
        self, model: str, texts: list[str], tokens: list[int], slo: str, priority: int
    ) -> list[list[float]]:
        """Vectors for ``texts``, computed in a batch coalesced with other clients' requests."""
        loop = self._running_loop()
        rid = f"emb-{next(self._ids)}"
        request = Request(
            rid,
            model,
            "embedding",
            slo,
            loop.time(),
            tokens=sum(tokens),
            inputs=len(texts),
            priority=priority,
        )
        waiter = _Waiter(request, loop.create_future(), texts)
        self._waiters[rid] = waiter
        started = time.perf_counter()
        try:
            self._feed(Submit(request, loop.time()))
            vectors: list[list[float]] = await waiter.future
        except ServiceError as exc:
            self.metrics.rejected(model, slo, exc.code or str(exc.status))
            raise
        finally:
            if not waiter.future.done() or waiter.future.cancelled():  # the client went away
                self._cancel(request, loop)
            self._waiters.pop(rid, None)
        self.metrics.observe_e2e(model, slo, time.perf_counter() - started)
        return vectors

    def _cancel(self, request: Request, loop: asyncio.AbstractEventLoop) -> None:
        """Take a request whose client is gone out of the queue (counted in /metrics)."""
        if request.id not in self.scheduler.requests:
            return  # rejected or finished: nothing to take back
        queued = not any(request.id in r.running for r in self.scheduler.replicas.values())
        self.metrics.cancelled.labels(request.model, request.slo, "queued" if queued else "running").inc()
        self._feed(Cancel(request.id, loop.time()))

    async def generate(self, model: str, request: GenerationRequest, slo: str) -> AsyncIterator[TokenEvent]:
        """Stream one completion; retried on another replica if its replica fails.

        A streamed answer is retried only while the client has seen nothing of it. For a
        non-streaming request (``request.stream`` false) the events are held back until the
        answer is complete, so a replica that fails part-way is retried elsewhere from the start.
        """
        loop = self._running_loop()
        rid = request.id
        buffered = not request.stream
        sched_req = Request(
            rid,
            model,
            "llm",
            slo,
            loop.time(),
            tokens=(
                len(request.prompt_ids)
                if request.prompt_ids is not None
                else self.llm_engine(model).count_tokens(request.prompt)
            ),
            max_tokens=request.max_tokens,
            priority=request.priority,
        )
        waiter = _Waiter(sched_req, loop.create_future())
        self._waiters[rid] = waiter
        started = time.perf_counter()
        replica: str | None = None
        finished = False
        try:
            self._feed(Submit(sched_req, loop.time()))
            while True:
                try:
                    replica = await waiter.future
                except ServiceError as exc:
                    self.metrics.rejected(model, slo, exc.code or str(exc.status))
                    raise
                engine = self.engines[replica]
                assert isinstance(engine, LLMEngine)
                produced = 0
                last_token = 0.0
                held: list[TokenEvent] = []
                try:
                    async for event in engine.generate(request):
                        now = time.perf_counter()
                        if produced == 0:
                            self._feed(FirstToken(replica, rid, loop.time()))
                            self.metrics.observe_ttft(model, slo, now - started)
                        elif event.text or event.tool_calls:
                            self.metrics.observe_tpot(model, slo, now - last_token)
                        last_token = now
                        produced += 1
                        if buffered:
                            held.append(event)
                        else:
                            yield event
                except (ValueError, UpstreamError):
                    finished = True
                    self._feed(Done(replica, (rid,), loop.time()))
                    raise
                except RequestFailed as exc:  # this request alone: the replica serves on
                    finished = True
                    self._feed(Done(replica, (rid,), loop.time()))
                    raise ServiceError(exc.status, str(exc)) from exc
                except (EngineError, OSError) as exc:
                    self.metrics.replica_failed(replica)
                    if produced and not buffered:  # the client has part of the answer: no replay
                        finished = True
                        self._feed(Done(replica, (rid,), loop.time()))
                        self._feed(ReplicaDown(replica, loop.time(), str(exc)))
                        raise ServiceError(502, f"replica {replica} failed mid-stream: {exc}") from exc
                    logger.warning("replica %s failed on %s, retrying elsewhere: %s", replica, rid, exc)
                    waiter.future = loop.create_future()
                    self._feed(Done(replica, (rid,), loop.time(), failed=True, reason=str(exc)))
                    continue
                finished = True
                self._feed(Done(replica, (rid,), loop.time()))
                self.metrics.observe_e2e(model, slo, time.perf_counter() - started)
                for event in held:
                    yield event
                return
        finally:
            if not finished:
                future = waiter.future
                dispatched = future.done() and not future.cancelled() and future.exception() is None
                if replica is not None and dispatched:
                    self.metrics.cancelled.labels(model, slo, "running").inc()
                    self._feed(Done(replica, (rid,), loop.time()))  # client went away mid-stream
                elif not future.done() or future.cancelled():
                    self._cancel(sched_req, loop)  # still queued: dropped
            self._waiters.pop(rid, None)

    # ---- the scheduler's actions -----------------------------------------------------

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the control plane is not started")
        return self._loop

    def _feed(self, event: Event) -> None:
        for action in self.scheduler.handle(event):
            self._act(action)

    def _act(self, action: Action) -> None:
        loop = self._running_loop()
        if isinstance(action, Dispatch):
            if action.batch:
                self._spawn(self._run_batch(action))
            else:
                waiter = self._waiters.get(action.requests[0])
                if waiter is None or waiter.future.done():
                    self._feed(Done(action.replica, action.requests, loop.time()))
                else:
                    waiter.future.set_result(action.replica)
        elif isinstance(action, Reject):
            self._fail(
                action.request,
                ServiceError(action.status, action.message, code=action.code, retry_after=action.retry_after),
            )
        elif isinstance(action, Fail):
            self._fail(action.request, ServiceError(action.status, action.message))
        elif isinstance(action, WakeAt):
            loop.call_at(action.time, lambda: self._feed(Tick(loop.time())))
        elif isinstance(action, ScaleUp):
            logger.info("scaling %s up by %d: %s", action.model, action.count, action.reason)
            self.metrics.scale_events.labels(action.model, "up").inc(action.count)
            if self.supervisor is not None:
                for _ in range(action.count):
                    self.supervisor.add(self.models[action.model])
        elif isinstance(action, StopReplica):
            logger.info("stopping replica %s: %s", action.replica, action.reason)
            model = (
                self.scheduler.replicas[action.replica].model
                if action.replica in self.scheduler.replicas
                else ""
            )
            self.metrics.scale_events.labels(model, "down").inc()
            if self.supervisor is not None:
                self._spawn(self.supervisor.stop(action.replica))

    def _fail(self, rid: str, error: ServiceError) -> None:
        waiter = self._waiters.get(rid)
        if waiter is not None and not waiter.future.done():
            waiter.future.set_exception(error)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, action: Dispatch) -> None:
        loop = self._running_loop()
        waiters = [self._waiters.get(rid) for rid in action.requests]
        live = [w for w in waiters if w is not None and not w.future.done()]
        texts = [t for w in live for t in (w.texts or [])]
        engine = self.engines[action.replica]
        assert isinstance(engine, EmbeddingEngine)
        if not texts:
            self._feed(Done(action.replica, action.requests, loop.time()))
            return
        model = self.scheduler.replicas[action.replica].model
        self.metrics.observe_batch(model, len(texts))
        try:
            vectors = await asyncio.to_thread(engine.embed, texts)
            if len(vectors) != len(texts):
                raise EngineError(f"{action.replica} returned {len(vectors)} vectors for {len(texts)} texts")
        except UpstreamError as exc:
            if len(live) > 1:  # one client's input was refused: answer each request on its own
                await asyncio.to_thread(_embed_each, engine, live)
            else:
                live[0].future.set_exception(ServiceError(exc.status, str(exc)))
            self._feed(Done(action.replica, action.requests, loop.time()))
            return
        except Exception as exc:
            logger.warning("embedding replica %s failed: %s", action.replica, exc)
            self.metrics.replica_failed(action.replica)
            self._feed(Done(action.replica, action.requests, loop.time(), failed=True, reason=str(exc)))
            return
        offset = 0
        for w in live:
            n = len(w.texts or [])
            w.future.set_result(vectors[offset : offset + n])
            offset += n
        self._feed(Done(action.replica, action.requests, loop.time()))

    # ---- replica health and load -----------------------------------------------------

    @staticmethod
    async def _local_probe(engine: EmbeddingEngine | LLMEngine) -> None:
        """One tiny real request: a local engine whose batch failed (out of memory, a bad
        input it choked on) is put back as soon as it answers again, not left out forever."""
        if isinstance(engine, EmbeddingEngine):
            await asyncio.to_thread(engine.embed, ["health check"])
            return
        request = GenerationRequest(id="health-probe", prompt="health check", max_tokens=1, temperature=0.0)
        async for _ in engine.generate(request):
            pass

    async def _watch_replicas(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            loop = self._running_loop()
            for replica_id, engine in list(self.engines.items()):
                state = self.scheduler.replicas.get(replica_id)
                if state is None or self.engines.get(replica_id) is not engine:
                    continue  # removed or replaced meanwhile
                probe = getattr(engine, "probe", None)
                if probe is None:
                    if state.healthy:
                        continue
                    probe = partial(self._local_probe, engine)  # a local engine taken out: try it
                try:
                    depth = await probe()
                except Exception:
                    if state.healthy and not state.running:
                        self._feed(ReplicaDown(replica_id, loop.time(), "health probe failed"))
                    continue
                if not state.healthy:
                    logger.info("replica %s is back", replica_id)
                    self._feed(ReplicaUp(replica_id, loop.time()))
                if depth is not None:
                    self._feed(Load(replica_id, int(depth), loop.time()))


async def _close_engine(engine: EmbeddingEngine | LLMEngine) -> None:
    try:
        if isinstance(engine, LLMEngine):
            await engine.aclose()
        else:
            await asyncio.to_thread(engine.close)
    except Exception:  # pragma: no cover - closing a connection to a replica that is gone
        logger.debug("engine close failed", exc_info=True)


def _embed_each(engine: EmbeddingEngine, waiters: list[_Waiter]) -> None:
    """A coalesced batch the engine refused as the client's fault (an upstream's 4xx): each
    request is sent alone, so only the one at fault gets the error (called in a thread)."""
    loop = waiters[0].future.get_loop()
    for waiter in waiters:
        texts = waiter.texts or []
        try:
            vectors = engine.embed(texts)
            if len(vectors) != len(texts):
                raise EngineError(f"{len(vectors)} vectors for {len(texts)} texts")
            result: Any = vectors
        except UpstreamError as exc:
            result = ServiceError(exc.status, str(exc))
        except Exception as exc:
            result = ServiceError(502, f"embedding failed: {exc}")
        loop.call_soon_threadsafe(_settle, waiter.future, result)


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
