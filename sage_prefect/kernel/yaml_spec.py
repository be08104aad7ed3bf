"""Pipelines written as YAML, with errors that name the file, the line and the field.

```yaml
name: demo
batch_size: 2000                 # optional, rows per partition
source:                          # exactly one of: class | data | path (JSON lines)
  class: sage_prefect.examples.demo.SyntheticDocs
  config: {count: 10000}
operators:                       # applied in order; one kind key each
  - map: sage_prefect.examples.demo.Upper
  - map: sage_prefect.examples.demo.Fingerprint
    resources: {GPU: 1}
    parallelism: 2
    retries: 2
  - filter: sage_prefect.examples.demo.even_id
  - sink: LanceSink              # built-in names need no module path
    config: {uri: ./out, table: docs}
```
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

from sage_prefect.common.errors import ConfigError, UnknownOperatorError
from sage_prefect.common.yamlfile import LocatedYAML, read_yaml
from sage_prefect.kernel.environment import BaseEnvironment, LocalEnvironment
from sage_prefect.kernel.plan import OPERATOR_KINDS

BUILTIN_MODULES = ("sage_prefect.data", "sage_prefect.common.functions")


class SourceModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    class_: str | None = Field(
        None, alias="class", description="Import path of a SourceFunction/BatchFunction"
    )
    config: dict[str, Any] | None = None
    data: list[dict[str, Any]] | None = None
    path: str | None = Field(None, description="A JSON-lines file, relative to the pipeline file")
    allow_empty: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> SourceModel:
        given = [k for k in ("class_", "data", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'class', 'data' or 'path'")
        if self.config is not None and self.class_ is None:
            raise ValueError("'config' goes with 'class' only")
        return self


class OperatorModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    map: str | None = None
    filter: str | None = None
    flatmap: str | None = None
    keyby: str | None = None
    sink: str | None = None
    name: str | None = None
    config: dict[str, Any] | None = None
    resources: dict[str, PositiveFloat] | None = None
    parallelism: PositiveInt | None = None
    retries: int = Field(0, ge=0, le=100)
    retry_delay_seconds: float | list[float] = 0
    timeout_seconds: PositiveFloat | None = None
    cache: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> OperatorModel:
        given = [k for k in OPERATOR_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one operator kind key out of {', '.join(OPERATOR_KINDS)}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in OPERATOR_KINDS if getattr(self, k) is not None)


class PipelineModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    batch_size: PositiveInt | None = None
    allow_cpu_fallback: bool | None = None
    source: SourceModel
    operators: list[OperatorModel] = Field(min_length=1)


def import_object(path: str, *, where: str = "") -> Any:
    """Resolve ``pkg.module.Name`` / ``pkg.module:Name`` (or a built-in sink/function name)."""
    prefix = f"{where}: " if where else ""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    elif "." in path:
        module_name, _, attr = path.rpartition(".")
    else:
        for module_name in BUILTIN_MODULES:
            obj = getattr(importlib.import_module(module_name), path, None)
            if obj is not None:
                return obj
        raise UnknownOperatorError(
            f"{prefix}{path!r} is not a built-in name; give an import path like 'package.module.{path}'",
            path=path,
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownOperatorError(
            f"{prefix}cannot import module {module_name!r} for {path!r}: {exc}", path=path
        ) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UnknownOperatorError(
            f"{prefix}module {module_name!r} has no attribute {attr!r}", path=path
        ) from None


def load_pipeline(path: str | Path, env: BaseEnvironment | None = None, **env_kwargs: Any) -> BaseEnvironment:
    """Read a pipeline file and declare it on ``env`` (a new `LocalEnvironment` by default)."""
    file = Path(path)
    doc = read_yaml(file, "pipeline file")
    model = doc.validate(PipelineModel)
    _extend_path(file.parent)
    if env is None:
        if model.batch_size is not None:
            env_kwargs.setdefault("batch_size", model.batch_size)
        if model.allow_cpu_fallback is not None:
            env_kwargs.setdefault("allow_cpu_fallback", model.allow_cpu_fallback)
        env = LocalEnvironment(model.name, **env_kwargs)
    stream = _declare_source(doc, model.source, env)
    for i, op in enumerate(model.operators):
        kind = op.kind
        function = _import_at(doc, ("operators", i, kind), getattr(op, kind))
        try:
            stream = getattr(stream, kind)(
                function,
                op.config,
                name=op.name,
                resources=op.resources,
                parallelism=op.parallelism,
                retries=op.retries,
                retry_delay_seconds=op.retry_delay_seconds,
                timeout_seconds=op.timeout_seconds,
                cache=op.cache,
            )
        except (ConfigError, ValueError, TypeError) as exc:
            raise doc.error(("operators", i, kind), str(exc)) from None
    return env


def _declare_source(doc: LocatedYAML, source: SourceModel, env: BaseEnvironment) -> Any:
    if source.class_ is not None:
        cls = _import_at(doc, ("source", "class"), source.class_)
        try:
            return env.from_source(cls, source.config, allow_empty=source.allow_empty)
        except ValueError as exc:
            raise doc.error(("source", "class"), str(exc)) from None
    if source.data is not None:
        return env.from_batch(source.data, allow_empty=source.allow_empty)
    assert source.path is not None
    data_path = Path(source.path)
    if not data_path.is_absolute():
        data_path = doc.file.parent / data_path
    if not data_path.is_file():
        raise doc.error(("source", "path"), f"no such file: {data_path}")
    return env.from_collection(_read_jsonl(data_path), allow_empty=source.allow_empty)


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{path}:{number}: invalid JSON: {exc.msg}", file=str(path), line=number
                ) from None
            if not isinstance(record, dict):
                raise ConfigError(
                    f"{path}:{number}: expected a JSON object, got {type(record).__name__}",
                    file=str(path),
                    line=number,
                )
            yield record


def _import_at(doc: LocatedYAML, path: tuple[Any, ...], target: str) -> Any:
    try:
        return import_object(target)
    except UnknownOperatorError as exc:
        raise doc.error(path, exc.message, UnknownOperatorError) from None


def _extend_path(directory: Path) -> None:
    """Operators next to the pipeline file are importable, as with Prefect entrypoints."""
    entry = str(directory.resolve())
    if entry not in sys.path:
        sys.path.insert(0, entry)
