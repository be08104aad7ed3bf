"""The control plane's configuration (``controlplane.yaml``), with embedded defaults.

```yaml
host: 127.0.0.1
port: 8100
policy: hybrid                 # fifo | priority | slo | hybrid (see scheduler.py)
default_class: interactive
classes:                       # objectives in ms; queue bounds for admission control
  interactive: {ttft_ms: 1000, tpot_ms: 200, e2e_ms: 2000, max_queue: 256}  # e2e: embeddings
  batch: {e2e_ms: 600000, max_queue: 4096}
batching: {max_batch_size: 64, max_batch_tokens: 16384, max_wait_ms: 5}
models:
  - {name: all-MiniLM-L6-v2, kind: embedding, engine: sentence-transformers, replicas: 1, device: cpu}
  - {name: smollm2-135m-instruct, kind: llm, engine: transformers, device: cpu,
     params: {model: smollm2-135m-instruct, threads: 1}}   # a model-store name, an HF directory or a .gguf
  - {name: sage-tiny-random-lm, kind: llm, engine: transformers, params: {model: tiny}}  # random weights: tests
  - {name: llama-3-8b, kind: llm, engine: openai,
     params: {base_url: "http://gpu-node:8000/v1", model: meta-llama/Meta-Llama-3-8B-Instruct}}
api_keys_file: /etc/sage/keys.txt   # or SAGE_CONTROLPLANE_API_KEYS="key1,key2"
keys:                          # per-key defaults and limits, by key name (see auth.py)
  pipelines: {default_class: batch, rate_limit_rps: 200}
```

Under ``policy: hybrid``, a sentence-transformers model on a CPU device that a local
``transformers`` LLM also uses gets ``params.background: true`` unless it sets it: its encoding
threads run at low OS priority, so the LLM's prefill and decode preempt them (set
``background: false`` to opt out). On CPU, run one torch thread per replica
(``OMP_NUM_THREADS=1``) with as many embedding replicas as cores: two-thread torch teams stall
at every barrier as soon as another thread (the HTTP server, an LLM, a client) wants a core.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sage_prefect.common.yamlfile import read_yaml
from sage_prefect.controlplane.scheduler import POLICIES, BatchLimits, SLOClass, is_cpu

ENGINES = ("sentence-transformers", "transformers", "vllm", "openai", "command")
DEFAULT_LLM = "smollm2-135m-instruct"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReplicasConfig(_Strict):
    """How many replicas of a model run; between ``min`` and ``max`` the scheduler scales them
    (placed models only) on the estimated wait against the classes' objectives: up when the
    wait passes ``up_ratio`` of an objective (or ``queue_per_replica`` requests wait per
    replica), down one at a time after ``down_delay_s`` of little load (scheduler.py)."""

    min: int = Field(1, ge=1, le=64)
    max: int = Field(1, ge=1, le=64)
    up_ratio: float = Field(0.5, gt=0)
    down_ratio: float = Field(0.1, ge=0)
    down_delay_s: float = Field(60.0, ge=0)
    queue_per_replica: float | None = Field(None, gt=0)
    retry_s: float = Field(10.0, ge=0)  # after a replica failed to start, wait this long before another

    @model_validator(mode="after")
    def _ordered(self) -> ReplicasConfig:
        if self.max < self.min:
            raise ValueError(f"replicas.max ({self.max}) is below replicas.min ({self.min})")
        if self.down_ratio >= self.up_ratio:
            raise ValueError(
                f"replicas.down_ratio ({self.down_ratio}) must be below up_ratio ({self.up_ratio})"
            )
        return self


class ModelConfig(_Strict):
    name: str = Field(min_length=1)
    kind: Literal["llm", "embedding"]
    # vllm: vLLM in this process (GPU hosts, the `vllm` extra; untested here: docs/vllm.md)
    engine: Literal["sentence-transformers", "transformers", "vllm", "openai", "command"]
    replicas: ReplicasConfig = Field(default_factory=ReplicasConfig)  # or a number: min = max
    device: str | None = "cpu"  # replicas of different models on one device share it (hybrid policy)
    slots: int | None = Field(None, ge=1)  # LLM: sequences in flight per replica (default: the engine's)
    params: dict[str, Any] = Field(default_factory=dict)
    # placement on the cluster (`cluster:`): a model with `resources` runs each replica as a process
    # on a Dask worker carrying these labels (held while it lives), instead of in the gateway
    resources: dict[str, float] | None = None
    memory_gb: float | None = Field(None, gt=0)  # a worker must have this much (Dask's memory limit)
    command: list[str] | None = None  # engine 'command': argv of an OpenAI-compatible server
    ready_timeout_s: float = Field(300.0, gt=0)  # from process start to answering `ready_path`
    ready_path: str = "/v1/models"
    env: dict[str, str] = Field(default_factory=dict)  # extra environment of a placed replica

    @field_validator("replicas", mode="before")
    @classmethod
    def _fixed_count(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return {"min": value, "max": value}
        return value

    @field_validator("resources")
    @classmethod
    def _positive(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for label, amount in (value or {}).items():
            if amount <= 0:
                raise ValueError(f"resource {label!r} must be a positive number, got {amount}")
        return value

    @model_validator(mode="after")
    def _engine_fits_kind(self) -> ModelConfig:
        if self.kind == "embedding" and self.engine == "transformers":
            raise ValueError(
                "engine 'transformers' serves kind 'llm'; use 'sentence-transformers' for embeddings"
            )
        if self.kind == "llm" and self.engine == "sentence-transformers":
            raise ValueError("engine 'sentence-transformers' serves kind 'embedding'")
        if self.kind == "embedding" and self.engine == "vllm":
            raise ValueError(
                "engine 'vllm' serves kind 'llm' here; for embeddings run a server (engine 'command')"
            )
        if self.engine == "command":
            if not self.command:
                raise ValueError(
                    "engine 'command' needs `command`: the server's argv, with {port} (and {host})"
                )
            if not any("{port}" in part for part in self.command):
                raise ValueError("`command` must contain {port}: the control plane picks the port")
            if self.resources is None:
                raise ValueError(
                    "engine 'command' runs on a cluster worker: give it `resources` (and `cluster:`)"
                )
        elif self.command is not None:
            raise ValueError(f"`command` is for engine 'command', not {self.engine!r}")
        if self.resources is None and self.replicas.min != self.replicas.max:
            raise ValueError(
                "replicas.min/max (autoscaling) needs placement on the cluster: give the model `resources`"
            )
        if self.resources is not None and self.engine == "openai":
            raise ValueError(
                "engine 'openai' forwards to servers you run (base_url/base_urls); to have the control "
                "plane run them on the cluster, use engine 'command'"
            )
        return self

    @property
    def placed(self) -> bool:
        """Whether this model's replicas run on cluster workers (it has `resources`)."""
        return self.resources is not None


class ClassConfig(_Strict):
    ttft_ms: float | None = Field(None, gt=0)
    tpot_ms: float | None = Field(None, gt=0)
    e2e_ms: float | None = Field(None, gt=0)
    max_queue: int = Field(1024, ge=1)
    max_queued_tokens: int = Field(2_000_000, ge=1)
    reject_when_late: bool = (
        True  # 429 when the estimated wait exceeds the objective (LLM: TTFT, embeddings: e2e)
    )
    priority: int = 0


class BatchingConfig(_Strict):
    max_batch_size: int = Field(64, ge=1)
    max_batch_tokens: int = Field(16_384, ge=1)
    max_wait_ms: float = Field(5.0, ge=0)
    hybrid_min_batch_tokens: int = Field(256, ge=1)


class KeyConfig(_Strict):
    default_class: str | None = None
    priority: int | None = None
    rate_limit_rps: float | None = Field(None, gt=0)
    burst: int | None = Field(None, ge=1)


class LimitsConfig(_Strict):
    """What one request may hold; past these it is refused (413 for the body, 400 naming the
    field otherwise) before anything is rendered, tokenised or queued."""

    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_inputs: int = Field(2048, ge=1)  # embedding inputs per request
    max_tokens: int = Field(4096, ge=1)  # completion tokens per request
    max_messages: int = Field(2048, ge=1)  # chat messages per request
    max_string_chars: int = Field(1_048_576, ge=1)  # one string (content, input, prompt): OpenAI's limit


class ClusterConfig(_Strict):
    """The Dask cluster that placed models (those with `resources`) run on.

    ``address: local`` starts a labelled local cluster in the gateway process, as pipelines
    get one (GPU workers for detected GPUs, CPU workers on the other cores, plus ``workers``
    with any labels); any other address (``tcp://scheduler:8786``) joins a running cluster.
    """

    address: str = "local"
    n_gpu_workers: int | None = Field(None, ge=0)  # local only
    n_cpu_workers: int | None = Field(None, ge=0)  # local only
    threads_per_worker: int = Field(1, ge=1)  # local only
    host: str = "127.0.0.1"  # local only: where the scheduler and workers listen
    workers: list[dict[str, Any]] = Field(default_factory=list)  # local only: {name, resources, nthreads}
    # how long to wait for a worker with a model's labels to join (an adaptive cluster adds one on
    # demand); 0: fail at once, naming the model and the missing label
    wait_for_workers_s: float = Field(0.0, ge=0)
    restart_backoff_s: float = Field(2.0, ge=0)  # first delay before a failed replica is started again

    @property
    def local(self) -> bool:
        return self.address == "local"


def _default_models() -> list[ModelConfig]:
    return [
        ModelConfig(name="all-MiniLM-L6-v2", kind="embedding", engine="sentence-transformers"),
        # the real SmolLM2-135M-Instruct, pulled into the model store on first use (modelstore.py);
        # one torch thread: the embedding model and the HTTP server share the CPU with it
        ModelConfig(
            name=DEFAULT_LLM,
            kind="llm",
            engine="transformers",
            params={"model": DEFAULT_LLM, "threads": 1},
        ),
    ]


def _default_classes() -> dict[str, ClassConfig]:
    return {
        # e2e_ms bounds interactive embeddings (a query vector: back within 2 s, so a burst drains
        # within 2 s too); interactive LLM requests are held to ttft_ms and tpot_ms
        "interactive": ClassConfig(ttft_ms=1000, tpot_ms=200, e2e_ms=2_000, max_queue=256, priority=-1),
        "batch": ClassConfig(e2e_ms=600_000, max_queue=4096, max_queued_tokens=8_000_000, priority=1),
    }


class ControlPlaneConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8100, ge=0, le=65535)
    policy: str = "hybrid"
    default_class: str = "interactive"
    classes: dict[str, ClassConfig] = Field(default_factory=_default_classes)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    models: list[ModelConfig] = Field(default_factory=_default_models)
    api_keys_env: str = "SAGE_CONTROLPLANE_API_KEYS"
    api_keys_file: Path | None = None
    keys: dict[str, KeyConfig] = Field(default_factory=dict)
    max_attempts: int = Field(3, ge=1)
    cluster: ClusterConfig | None = None  # where placed models (with `resources`) run

    @model_validator(mode="after")
    def _consistent(self) -> ControlPlaneConfig:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; expected one of {', '.join(POLICIES)}")
        if self.default_class not in self.classes:
            raise ValueError(
                f"default_class {self.default_class!r} is not one of the classes {sorted(self.classes)}"
            )
        for name, key in self.keys.items():
            if key.default_class is not None and key.default_class not in self.classes:
                raise ValueError(f"keys.{name}.default_class {key.default_class!r} is not a configured class")
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        placed = [m.name for m in self.models if m.placed]
        if placed and self.cluster is None:
            raise ValueError(
                f"models {', '.join(placed)} have `resources` (placement on a Dask cluster) but there is no "
                "`cluster:` section; add `cluster: {address: local}` or the address of a scheduler"
            )
        if self.policy == "hybrid":
            # hybrid on a CPU that a local LLM shares: embeddings compute at background priority,
            # so the LLM's threads preempt them (engines/sentence_transformers.py explains why)
            llm_devices = {m.device for m in self.models if m.kind == "llm" and m.engine == "transformers"}
            for m in self.models:
                if m.engine == "sentence-transformers" and m.device in llm_devices and is_cpu(m.device):
                    m.params.setdefault("background", True)
        return self

    def slo_classes(self) -> dict[str, SLOClass]:
        return {name: SLOClass(name, **c.model_dump()) for name, c in self.classes.items()}

    def batch_limits(self) -> BatchLimits:
        return BatchLimits(**self.batching.model_dump())

    @property
    def loopback(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")


def load_config(path: str | Path | None = None, **overrides: Any) -> ControlPlaneConfig:
    """The embedded defaults, or a YAML file (errors name the file, line and field)."""
    if path is None:
        return ControlPlaneConfig(**overrides)
    doc = read_yaml(path, "control-plane config")
    if overrides and isinstance(doc.data, dict):
        doc.data.update(overrides)
    config: ControlPlaneConfig = doc.validate(ControlPlaneConfig)
    return config
