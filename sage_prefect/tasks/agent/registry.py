"""Tools an agent can call: a name, a description, a JSON-schema for the arguments, maybe a callable.

`ToolRegistry` holds tools by name, validates arguments against their schema with
``jsonschema`` (errors name the tool and the offending argument) and calls them. Tools load
from the MetaTool ``tools.json`` format (``[{"name", "description"}]``: no parameters, so any
arguments object is accepted) and from BFCL ``function`` lists, whose pseudo JSON-schema
(``"type": "dict"``, ``"float"``, ``"tuple"``, ``"any"``) is translated to JSON-schema.

>>> reg = ToolRegistry()
>>> @reg.tool(parameters={"type": "object", "properties": {"city": {"type": "string"}},
...                       "required": ["city"]})
... def weather(city):
...     "Current weather of a city."
...     return f"sunny in {city}"
>>> reg.call("weather", {"city": "Oslo"})
'sunny in Oslo'
>>> reg.call("weather", {"city": 3})
Traceback (most recent call last):
...
sage_prefect.tasks.agent.registry.ToolArgumentError: tool 'weather': argument 'city': 3 is not of type 'string'
"""

from __future__ import annotations

import builtins
import inspect
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sage_prefect.common.errors import SageError

__all__ = [
    "Tool",
    "ToolArgumentError",
    "ToolRegistry",
    "UnknownToolError",
    "normalize_schema",
    "tools_from_bfcl",
    "tools_from_metatool",
]

EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}

# BFCL writes Python-ish type names; JSON-schema spells them differently.
_TYPE_MAP = {
    "dict": "object",
    "float": "number",
    "tuple": "array",
    "list": "array",
    "int": "integer",
    "str": "string",
    "bool": "boolean",
    "double": "number",
    "long": "integer",
}
_PY_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


class UnknownToolError(SageError, LookupError):
    """A tool name that is not in the registry (``exc.tool``)."""


class ToolArgumentError(SageError, ValueError):
    """Arguments that do not match a tool's schema (``exc.tool``, ``exc.field`` = the argument)."""


def normalize_schema(schema: Any) -> Any:
    """A JSON-schema from a BFCL/OpenAI-style parameter schema: ``dict``->``object``,
    ``float``->``number``, ``tuple``->``array``, ``any`` dropped; BFCL's ``optional`` flag removed.

    >>> normalize_schema({"type": "dict", "properties": {"x": {"type": "float"}}})
    {'type': 'object', 'properties': {'x': {'type': 'number'}}}
    """
    if isinstance(schema, list):
        return [normalize_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "type":
            if isinstance(value, str):
                if value == "any":
                    continue
                out[key] = _TYPE_MAP.get(value, value)
            elif isinstance(value, list):
                kinds = [_TYPE_MAP.get(v, v) for v in value if v != "any"]
                if kinds and len(kinds) == len(value):
                    out[key] = kinds
            else:
                out[key] = value  # not a type name: left for the schema check to reject
            continue
        if key == "optional":
            continue
        if key in ("properties", "definitions", "$defs", "patternProperties") and isinstance(value, dict):
            out[key] = {name: normalize_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "oneOf", "allOf", "prefixItems"):
            out[key] = normalize_schema(value)
        else:
            out[key] = value
    if out.get("type") == "object" and "properties" not in out:
        out["properties"] = {}
    return out


@dataclass
class Tool:
    """One tool: ``name``, ``description``, ``parameters`` (JSON-schema of the arguments object)
    and an optional Python ``function`` called with the arguments as keyword arguments."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: dict(EMPTY_SCHEMA))
    function: Callable[..., Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"a tool needs a non-empty string name, got {self.name!r}")
        if not isinstance(self.parameters, dict):
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON-schema object")
        self.parameters = normalize_schema(self.parameters)

    @property
    def text(self) -> str:
        """Name and description as one string (what retrieval matches queries against)."""
        return f"{self.name}: {self.description}".strip()

    def spec(self) -> dict[str, Any]:
        """The tool as a JSON-serialisable ``{name, description, parameters}`` (prompts, exports)."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Tool:
        """A tool from ``{"name", "description", "parameters"?}`` (MetaTool, BFCL, OpenAI function)."""
        if "function" in data and isinstance(
            data["function"], Mapping
        ):  # {"type": "function", "function": {...}}
            data = data["function"]
        params = data.get("parameters")
        return cls(
            name=data.get("name", ""),
            description=str(data.get("description") or ""),
            parameters=dict(params) if isinstance(params, Mapping) else dict(EMPTY_SCHEMA),
        )


def _signature_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """A JSON-schema for ``fn``'s keyword arguments from its annotations (unannotated: any type)."""
    props: dict[str, Any] = {}
    required: list[str] = []
    try:
        hints = inspect.get_annotations(fn, eval_str=True)
    except Exception:  # unresolvable string annotations: no types
        hints = {}
    for pname, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        kind = _PY_TYPES.get(hints.get(pname))  # type: ignore[arg-type]
        props[pname] = {"type": kind} if kind else {}
        if param.default is param.empty:
            required.append(pname)
    schema: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        schema["required"] = required
    return schema


class ToolRegistry:
    """Tools by name: register, look up, validate arguments, call.

    >>> reg = ToolRegistry([Tool("echo", "Repeat text.")])
    >>> [t.name for t in reg.list()], "echo" in reg
    (['echo'], True)
    """

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        self._validators: dict[str, Any] = {}
        for tool in tools:
            self.register(tool)

    # -- building ----------------------------------------------------------------------------
    def register(
        self,
        tool: Tool | Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        parameters: dict[str, Any] | None = None,
        replace: bool = False,
    ) -> Tool:
        """Add a `Tool`, or a Python function (name from ``__name__``, description from the
        docstring, parameters from the signature unless given). A second tool of the same name
        is an error unless ``replace``."""
        if not isinstance(tool, Tool):
            if not callable(tool):
                raise TypeError(f"register() takes a Tool or a callable, got {type(tool).__name__}")
            fn = tool
            tool = Tool(
                name=name or fn.__name__,
                description=description if description is not None else inspect.getdoc(fn) or "",
                parameters=parameters if parameters is not None else _signature_schema(fn),
                function=fn,
            )
        if tool.name in self._tools and not replace:
            raise ValueError(f"tool {tool.name!r} is already registered (pass replace=True to replace it)")
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        try:
            Draft202012Validator.check_schema(tool.parameters)
        except SchemaError as exc:
            raise ToolArgumentError(
                f"tool {tool.name!r}: invalid parameters schema: {exc.message}",
                tool=tool.name,
                field="parameters",
            ) from None
        self._tools[tool.name] = tool
        self._validators[tool.name] = Draft202012Validator(tool.parameters)
        return tool

    def tool(
        self,
        name: str | None = None,
        *,
        description: str | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering a function as a tool; the function is returned unchanged."""

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.register(fn, name=name, description=description, parameters=parameters)
            return fn

        return decorate

    # -- reading -----------------------------------------------------------------------------
    def get(self, name: str) -> Tool:
        """The tool called ``name``; `UnknownToolError` naming it (and a few known names) if absent."""
        found = self._tools.get(name)
        if found is None:
            known = ", ".join(sorted(self._tools)[:10]) + (", ..." if len(self._tools) > 10 else "")
            raise UnknownToolError(f"unknown tool {name!r} (known: {known or 'none'})", tool=name)
        return found

    def list(self) -> list[Tool]:
        """The tools in registration order."""
        return list(self._tools.values())

    def names(self) -> builtins.list[str]:
        """The tool names in registration order."""
        return [*self._tools]

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    # -- validating and calling --------------------------------------------------------------
    def validate(self, name: str, arguments: Any) -> dict[str, Any]:
        """Check ``arguments`` against the tool's schema; return them, else raise
        `ToolArgumentError` naming the tool and the argument (``exc.field``)."""
        self.get(name)
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise ToolArgumentError(
                    f"tool {name!r}: arguments are not valid JSON: {exc}", tool=name, field="arguments"
                ) from None
        if not isinstance(arguments, dict):
            raise ToolArgumentError(
                f"tool {name!r}: arguments must be an object, got {type(arguments).__name__}",
                tool=name,
                field="arguments",
            )
        from jsonschema.exceptions import best_match

        error = best_match(self._validators[name].iter_errors(arguments))
        if error is None:
            return arguments
        path = [str(p) for p in error.absolute_path]
        if error.validator == "required" and isinstance(error.validator_value, list):
            instance = error.instance if isinstance(error.instance, dict) else {}
            missing = [k for k in error.validator_value if k not in instance]
            path.append(str(missing[0]) if missing else "arguments")
        elif error.validator == "additionalProperties" and isinstance(error.instance, dict):
            allowed = set(error.schema.get("properties", {}))
            extra = [k for k in error.instance if k not in allowed]
            path.append(str(extra[0]) if extra else "arguments")
        argument = ".".join(path) or "arguments"
        raise ToolArgumentError(
            f"tool {name!r}: argument {argument!r}: {error.message}", tool=name, field=argument
        )

    def is_valid(self, name: str, arguments: Any) -> bool:
        """Whether ``name`` is known and ``arguments`` match its schema."""
        try:
            self.validate(name, arguments)
        except (UnknownToolError, ToolArgumentError):
            return False
        return True

    def call(self, name: str, arguments: Any = None) -> Any:
        """Validate ``arguments`` and call the tool's function with them as keyword arguments."""
        args = self.validate(name, {} if arguments is None else arguments)
        tool = self._tools[name]
        if tool.function is None:
            raise UnknownToolError(
                f"tool {name!r} has no Python function to call (loaded from a description only)", tool=name
            )
        return tool.function(**args)

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def from_metatool(cls, path: str | Path) -> ToolRegistry:
        """A registry of the tools in a MetaTool ``tools.json`` (errors name the file and line)."""
        return cls(tools_from_metatool(path))

    @classmethod
    def from_bfcl(cls, functions: Iterable[Mapping[str, Any]]) -> ToolRegistry:
        """A registry of a BFCL ``function`` list (duplicate names: the last one wins)."""
        reg = cls()
        for tool in tools_from_bfcl(functions):
            reg.register(tool, replace=True)
        return reg

    @classmethod
    def from_specs(cls, specs: Iterable[Mapping[str, Any] | Tool]) -> ToolRegistry:
        """A registry from ``{"name", "description", "parameters"?}`` dicts or `Tool` objects."""
        return cls(s if isinstance(s, Tool) else Tool.from_dict(s) for s in specs)


def tools_from_metatool(path: str | Path) -> list[Tool]:
    """The tools of a MetaTool ``tools.json`` / ``tools_multi.json`` file."""
    from sage_prefect.tasks.agent.data import load_tools

    return [Tool.from_dict(spec) for spec in load_tools(path)]


def tools_from_bfcl(functions: Iterable[Mapping[str, Any]]) -> list[Tool]:
    """`Tool` objects from a BFCL ``function`` list (schemas translated to JSON-schema)."""
    out: list[Tool] = []
    for i, fn in enumerate(functions):
        if not isinstance(fn, Mapping) or not fn.get("name"):
            raise ValueError(f"BFCL function {i} has no name: {fn!r:.80}")
        out.append(Tool.from_dict(fn))
    return out
