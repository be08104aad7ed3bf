"""One settings model for the whole project.

Sources, highest first: arguments, ``SAGE_*`` environment variables, a YAML file
(``SAGE_CONFIG``, else ``$SAGE_HOME/config.yaml`` when it exists), the defaults.

>>> s = SageSettings(batch_size=500)
>>> s.batch_size
500
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from sage_prefect.common.errors import ConfigError


def _default_home() -> Path:
    return Path(os.environ.get("SAGE_HOME", "~/.sage-prefect")).expanduser()


def _config_file() -> Path | None:
    explicit = os.environ.get("SAGE_CONFIG")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"SAGE_CONFIG points to {path}, which is not a file", file=str(path))
        return path
    candidate = _default_home() / "config.yaml"
    return candidate if candidate.is_file() else None


class SageSettings(BaseSettings):
    """Project settings (``SAGE_`` environment prefix, optional YAML file).

    >>> SageSettings(home="/tmp/sage").lance_dir.name
    'lancedb'
    """

    model_config = SettingsConfigDict(env_prefix="SAGE_", extra="forbid", validate_default=True)

    home: Path = Field(
        default_factory=_default_home,
        description="Project home: embedded LanceDB, MLflow store, stage data and logs live here.",
    )
    batch_size: int = Field(
        10_000, ge=1, le=10_000_000, description="Rows per partition (micro-batch) when splitting a source."
    )
    spill_threshold_bytes: int = Field(
        64 * 2**20,
        ge=0,
        description="A stage output larger than this (Arrow bytes) is written to a Lance dataset and "
        "passed on as (uri, version) instead of in memory.",
    )
    dask_address: str | None = Field(
        None, description="Address of an existing Dask scheduler; unset means a local cluster."
    )
    n_gpu_workers: int | None = Field(
        None, ge=0, le=1024, description="GPU-tagged local workers; unset means one per detected GPU."
    )
    n_cpu_workers: int | None = Field(
        None, ge=0, le=1024, description="CPU-tagged local workers; unset means the cores left, at least one."
    )
    threads_per_worker: int = Field(1, ge=1, le=256, description="Threads of each local CPU worker.")
    processes: bool = Field(
        True, description="Local workers as processes (parallel Python) or threads in this process."
    )
    host: str = Field("127.0.0.1", description="Address local schedulers and workers listen on.")
    controlplane_url: str | None = Field(
        None,
        description="Base URL of the control plane's OpenAI API (``http://host:port/v1``), or of any "
        "OpenAI-compatible server. Unset: flows start an embedded control plane on 127.0.0.1.",
    )
    controlplane_api_key: SecretStr | None = Field(
        None, description="API key sent to the control plane (``Authorization: Bearer``)."
    )
    embedding_model: str = Field(
        "all-MiniLM-L6-v2", min_length=1, description="Default embedding model name at the control plane."
    )
    llm_model: str = Field(
        "smollm2-135m-instruct",
        min_length=1,
        description="Default chat model name at the control plane (the embedded default is "
        "SmolLM2-135M-Instruct from the model store; `sage-tiny-random-lm` is the random-weight "
        "test model: real compute, meaningless text).",
    )
    allow_cpu_fallback: bool | None = Field(
        None,
        description="Run an operator whose resource label no worker carries without the label, "
        "instead of failing. Unset: on for local clusters, off for remote ones.",
    )

    @property
    def lance_dir(self) -> Path:
        return self.home / "lancedb"

    @property
    def stage_dir(self) -> Path:
        return self.home / "stage-data"

    @property
    def results_dir(self) -> Path:
        return self.home / "results"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file()
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


def load_settings(**overrides: Any) -> SageSettings:
    """Build settings, turning validation errors into a `ConfigError` naming the field and source."""
    try:
        return SageSettings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        source = _config_file()
        where = f" (environment SAGE_{field.upper()} or {source})" if source else f" (SAGE_{field.upper()})"
        raise ConfigError(
            f"invalid setting {field!r}{where}: {first['msg']}", field=field, file=str(source or "")
        ) from None


def command_line_defaults() -> None:
    """Defaults for a process that runs flows from a terminal (the CLI, ``python flows/x.py``).

    Dask's INFO logs (workers starting and stopping) go quiet, here and in worker processes
    started later, and the Prefect server does not try to send telemetry (offline machines
    log an error for it). Variables already set are left alone.
    """
    import logging

    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if os.environ["DASK_LOGGING__DISTRIBUTED"] == "warning":
        logging.getLogger("distributed").setLevel(logging.WARNING)
