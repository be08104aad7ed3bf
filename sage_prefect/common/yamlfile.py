"""YAML files whose errors name the file, the line and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sage_prefect.common.errors import ConfigError, SageError


class LocatedYAML:
    """YAML data plus the line of every node, keyed by its path of keys/indices."""

    def __init__(self, file: Path, text: str, what: str = "file") -> None:
        self.file = file
        self.lines: dict[tuple[Any, ...], int] = {}
        try:
            root = yaml.compose(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else 0
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(f"{file}:{line}: invalid YAML: {problem}", file=str(file), line=line) from None
        if root is None:
            raise ConfigError(f"{file}:1: the {what} is empty", file=str(file), line=1)
        self.data = self._build(root, ())

    def _build(self, node: yaml.Node, path: tuple[Any, ...]) -> Any:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = yaml.safe_load(yaml.serialize(key_node))
                self.lines[(*path, key)] = key_node.start_mark.line + 1
                out[key] = self._build(value_node, (*path, key))
                self.lines[(*path, key)] = key_node.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._build(item, (*path, i)) for i, item in enumerate(node.value)]
        return yaml.safe_load(yaml.serialize(node))

    def line(self, path: tuple[Any, ...]) -> int:
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 1)

    def error(self, path: tuple[Any, ...], message: str, cls: type[SageError] = ConfigError) -> SageError:
        field = ".".join(str(p) for p in path) or "<root>"
        line = self.line(path)
        return cls(
            f"{self.file}:{line}: field {field!r}: {message}", file=str(self.file), line=line, field=field
        )

    def validate(self, model: type[BaseModel]) -> Any:
        """``model.model_validate(data)``; the first validation error names file, line and field."""
        if not isinstance(self.data, dict):
            raise self.error((), f"the top level must be a mapping, got {type(self.data).__name__}")
        try:
            return model.model_validate(self.data)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = tuple("class" if p == "class_" else p for p in first["loc"])
            raise self.error(loc, first["msg"]) from None


def read_yaml(path: str | Path, what: str = "file") -> LocatedYAML:
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the {what}: {exc.strerror}", file=str(file)) from None
    return LocatedYAML(file, text, what)
