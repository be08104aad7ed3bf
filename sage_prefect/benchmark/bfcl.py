"""BFCL's AST function-call checker for the ``multiple``, ``live_multiple`` and irrelevance categories.

A self-contained re-implementation of the rules of the Berkeley Function Calling Leaderboard
(``bfcl_eval/eval_checker/ast_eval/ast_checker.py`` in ShishirPatil/gorilla) for Python-typed
function docs, plus a loader for its JSON Lines files and a converter of its function docs to
OpenAI ``tools``. Standard library only.

A call is ``{"name": str, "arguments": dict}`` (``arguments`` may also be a JSON object string, as
OpenAI's ``tool_calls`` carry it). It is correct when:

- its name is the ground-truth function's name, either as written or with ``.`` replaced by ``_``
  (the name `to_openai_tools` gives it);
- every required parameter is present, and every parameter it passes is both in the function's
  schema and in the possible answer;
- each value has the schema's type (``integer``, ``float``/``number`` (an int is accepted),
  ``string``, ``boolean``, ``array``/``tuple``, ``dict``/``object``, ``any``; arrays and dicts
  are checked element-wise against ``items`` and ``properties``); BFCL's "variable" rule also
  applies: when the possible answer's values have another type than the schema's (a variable name
  written as a string, say), a value of the possible answer's type is accepted;
- each value is one of the acceptable values: strings compare after `standardize_string`
  (lowercase; spaces and ``,./-_*^`` removed; ``'`` read as ``"``), lists element by element with
  the same rule, dicts key by key against each acceptable dict (whose values are lists of
  acceptable values, ``""`` among them marking an optional key), lists of dicts dict by dict;
- every parameter of the possible answer that the call leaves out lists ``""`` (optional) among its
  acceptable values.

``multiple``/``live_multiple`` expect exactly one call (`check_calls`); an irrelevance case is
correct iff no call was made (`check_irrelevance`). ``error_type`` uses BFCL's names
(``simple_function_checker:wrong_func_name``, ``type_error:simple``, ``value_error:string``,
``multiple_function_checker:wrong_count``, ``irrelevance_error:decoder_success``...).

Usage::

    cases = load_bfcl_pairs("BFCL_v4_multiple.jsonl", "possible_answer_multiple.jsonl")
    results = []
    for case in cases:
        tools = to_openai_tools(case.functions)  # send with case.messages to the model
        calls = [{"name": "triangle_properties_get", "arguments": {"side1": 5, "side2": 4, "side3": 3}}]
        results.append(check_calls(calls, case.functions, case.ground_truth))
    summarize(results)  # {"n": ..., "correct": ..., "accuracy": ..., "error_types": {...}}

>>> functions = [{"name": "math.hypot", "description": "Hypotenuse.", "parameters": {
...     "type": "dict", "properties": {"x": {"type": "float"}, "y": {"type": "float"},
...     "unit": {"type": "string"}}, "required": ["x", "y"]}}]
>>> ground_truth = [{"math.hypot": {"x": [3.0], "y": [4.0], "unit": ["", "cm"]}}]
>>> check_call({"name": "math_hypot", "arguments": {"x": 3, "y": 4.0}}, functions, ground_truth)
CallResult(valid=True, error=None, error_type=None)
>>> check_call({"name": "math.hypot", "arguments": {"x": 3, "y": 5}}, functions, ground_truth).error_type
'value_error:others'
>>> check_irrelevance([]).valid
True

Where this differs from BFCL, on purpose:

- Left out: the Java and JavaScript categories' type conversion (string arguments parsed into
  Java/JS values) and the parallel categories (several calls matched without order).
- Nested types are checked at every depth, dict values against ``properties`` too (BFCL checks
  one level of array ``items`` only), and an int is accepted wherever a float is expected (BFCL
  accepts one in an array only when the answer has an int there).
- ``any`` accepts a value of any type (BFCL maps it to ``str`` and relies on the variable rule).
- Values compare by BFCL's rules at every depth (strings inside nested dicts are standardised
  too), but ``True`` never equals ``1``.
- The call name is accepted with or without the dot-to-underscore renaming, whatever the model
  (BFCL renames for the models whose API rejects dots).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BfclCase",
    "CallResult",
    "check_call",
    "check_calls",
    "check_irrelevance",
    "load_bfcl_pairs",
    "openai_name_map",
    "standardize_string",
    "summarize",
    "to_openai_tools",
]

# BFCL's schema types and the Python type a value must have (``any``: no constraint).
_PY_TYPES: dict[str, type | None] = {
    "string": str,
    "integer": int,
    "float": float,
    "number": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "object": dict,
    "any": None,
}
# BFCL's types as JSON Schema types (``None``: drop the ``type`` keyword).
_JSON_TYPES: dict[str, str | None] = {
    "string": "string",
    "integer": "integer",
    "float": "number",
    "number": "number",
    "boolean": "boolean",
    "array": "array",
    "tuple": "array",
    "dict": "object",
    "object": "object",
    "any": None,
}
_STANDARDIZE = re.compile(r"[ ,./\-_*^]")
_OPENAI_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@dataclass(frozen=True)
class CallResult:
    """The verdict on one case: ``error``/``error_type`` are ``None`` when ``valid``."""

    valid: bool
    error: str | None = None
    error_type: str | None = None


@dataclass(frozen=True)
class BfclCase:
    """One BFCL entry: the first turn's ``messages``, the function docs offered, and the possible
    answer (``[{func_name: {param: [acceptable values]}}]``; ``None`` for irrelevance files)."""

    id: str
    messages: list[dict[str, Any]]
    functions: list[dict[str, Any]]
    ground_truth: list[dict[str, Any]] | None


_OK = CallResult(True)


def _fail(error_type: str, error: str) -> CallResult:
    return CallResult(False, error, error_type)


def standardize_string(text: str) -> str:
    """BFCL's string normal form: spaces and ``,./-_*^`` removed, lowercase, ``'`` as ``"``.

    >>> standardize_string("April 1, 2024") == standardize_string("april 1 2024")
    True
    """
    return _STANDARDIZE.sub("", text).lower().replace("'", '"')


# -- types ------------------------------------------------------------------------------------------


def _schema_type(schema: dict[str, Any], where: str) -> str:
    kind = schema.get("type", "any")
    if kind not in _PY_TYPES:
        raise ValueError(f"unsupported BFCL type {kind!r} for {where}")
    return str(kind)


def _type_error(value: Any, schema: dict[str, Any], where: str) -> str | None:
    """Why ``value`` does not have ``schema``'s type (checked recursively), or ``None``. The
    message starts with ``where`` of the value that failed."""
    kind = _schema_type(schema, where)
    expected = _PY_TYPES[kind]
    if expected is None:
        return None
    if expected is float and type(value) is int:
        return None
    if expected is list and kind == "tuple" and type(value) is tuple:
        value = list(value)
    if type(value) is not expected:
        return f"{where}: expected type {kind}, got {type(value).__name__} ({value!r})"
    items = schema.get("items")
    if isinstance(value, list) and isinstance(items, dict):
        for i, item in enumerate(value):
            if (err := _type_error(item, items, f"{where}[{i}]")) is not None:
                return err
    properties = schema.get("properties")
    if isinstance(value, dict) and isinstance(properties, dict):
        for key, item in value.items():
            sub = properties.get(key)
            if isinstance(sub, dict) and (err := _type_error(item, sub, f"{where}[{key!r}]")) is not None:
                return err
    return None


# -- values -----------------------------------------------------------------------------------------


def _as_choices(answers: Any) -> list[Any]:
    return answers if isinstance(answers, list) else [answers]


def _match_any(value: Any, answers: list[Any], where: str) -> tuple[str, str] | None:
    """``None`` if ``value`` matches one of ``answers``, else the error ``(error_type, message)``
    against the first answer that is not ``""``. (A string that standardises to ``""`` matches a
    ``""`` answer, as in BFCL.)"""
    first: tuple[str, str] | None = None
    for answer in answers:
        err = _match_one(value, answer, where)
        if err is None:
            return None
        if first is None and not (isinstance(answer, str) and answer == ""):
            first = err
    return first or ("value_error:others", f"{where}: {value!r} given where the only choice is to omit it")


def _match_one(value: Any, answer: Any, where: str) -> tuple[str, str] | None:
    if isinstance(value, dict) and isinstance(answer, dict):
        for key, item in value.items():
            if key not in answer:
                return "value_error:dict_key", f"{where}: unexpected dict key {key!r}"
            if (err := _match_any(item, _as_choices(answer[key]), f"{where}[{key!r}]")) is not None:
                return "value_error:dict_value", err[1]
        for key, choices in answer.items():
            if key not in value and "" not in _as_choices(choices):
                return "value_error:dict_key", f"{where}: missing dict key {key!r}"
        return None
    if isinstance(value, list | tuple) and isinstance(answer, list):
        dicts = any(isinstance(a, dict) for a in answer)
        if len(value) != len(answer):
            kind = "value_error:list_dict_count" if dicts else "value_error:list/tuple"
            return kind, f"{where}: {len(value)} items, expected {len(answer)} ({answer!r})"
        for i, (item, expected) in enumerate(zip(value, answer, strict=True)):
            if (err := _match_one(item, expected, f"{where}[{i}]")) is not None:
                return err if dicts else ("value_error:list/tuple", err[1])
        return None
    if isinstance(value, str) and isinstance(answer, str):
        if standardize_string(value) == standardize_string(answer):
            return None
        return "value_error:string", f"{where}: {value!r} is not {answer!r} (standardised)"
    if _same(value, answer):
        return None
    return "value_error:others", f"{where}: {value!r} is not {answer!r}"


def _check_param(param: str, value: Any, schema: dict[str, Any], answers: list[Any]) -> CallResult:
    kind = _schema_type(schema, f"parameter {param!r}")
    expected = _PY_TYPES[kind]
    # BFCL's "variable" rule: an answer typed unlike the schema (a variable's name, say) makes a
    # value of the answer's type acceptable, compared as is.
    answer_type = next((type(a) for a in answers if not (isinstance(a, str) and a == "")), None)
    is_variable = expected is not None and answer_type is not None and answer_type is not expected
    err = _type_error(value, schema, f"parameter {param!r}")
    if err is not None:
        nested = not err.startswith(f"parameter {param!r}:")
        if nested:  # elements of the wrong type: no variable excuse (as in BFCL)
            return _fail("type_error:nested", f"Incorrect type for {err}")
        if answer_type is None or type(value) is not answer_type:
            return _fail("type_error:simple", f"Incorrect type for {err}")
        is_variable = True
    if is_variable:
        if any(_same(value, a) for a in answers):
            return _OK
        return _fail(
            "value_error:others",
            f"Invalid value for parameter {param!r}: {value!r}; expected one of {answers!r}",
        )
    found = _match_any(value, answers, f"parameter {param!r}")
    if found is None:
        return _OK
    return _fail(
        found[0],
        f"Invalid value for parameter {param!r}: {value!r}; expected one of {answers!r} ({found[1]})",
    )


def _same(value: Any, answer: Any) -> bool:
    return isinstance(value, bool) == isinstance(answer, bool) and bool(value == answer)


# -- calls ------------------------------------------------------------------------------------------


def _name_matches(call_name: str, doc_name: str) -> bool:
    return call_name == doc_name or call_name == doc_name.replace(".", "_")


def check_call(
    call: dict[str, Any], functions: Sequence[dict[str, Any]], ground_truth: Sequence[dict[str, Any]]
) -> CallResult:
    """Check one call against the ground-truth entries (``[{func_name: {param: [values]}}]``) with
    the function docs of the question. Raises ``ValueError`` when the ground truth names a
    function the docs lack or a schema uses a type BFCL does not have."""
    name = call.get("name")
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            return _fail("ast_decoder:decoder_failed", f"arguments are not JSON: {exc}")
    if not isinstance(name, str) or not isinstance(arguments, dict):
        return _fail(
            "ast_decoder:decoder_wrong_output_format",
            f"not a call with a name and an arguments object: {call!r}",
        )

    for entry in ground_truth:
        for doc_name, possible in entry.items():
            if _name_matches(name, doc_name):
                return _check_against(arguments, _find_doc(functions, doc_name), possible)
    expected = [n for entry in ground_truth for n in entry]
    return _fail(
        "simple_function_checker:wrong_func_name", f"Function name {name!r} is not one of {expected!r}"
    )


def _find_doc(functions: Sequence[dict[str, Any]], doc_name: str) -> dict[str, Any]:
    for doc in functions:
        if doc.get("name") == doc_name:
            return doc
    raise ValueError(f"ground truth names {doc_name!r}, which is not among the functions offered")


def _check_against(
    arguments: dict[str, Any], doc: dict[str, Any], possible: dict[str, list[Any]]
) -> CallResult:
    parameters = doc.get("parameters") or {}
    properties: dict[str, Any] = parameters.get("properties") or {}
    for param in parameters.get("required") or []:
        if param not in arguments:
            return _fail("simple_function_checker:missing_required", f"Missing required parameter: {param!r}")
    for param, value in arguments.items():
        if param not in properties or param not in possible:
            return _fail("simple_function_checker:unexpected_param", f"Unexpected parameter: {param!r}")
        result = _check_param(param, value, properties[param], _as_choices(possible[param]))
        if not result.valid:
            return result
    for param, answers in possible.items():
        if param not in arguments and "" not in _as_choices(answers):
            return _fail(
                "simple_function_checker:missing_optional",
                f"Optional parameter {param!r} not provided and not marked as optional",
            )
    return _OK


def check_calls(
    calls: Sequence[dict[str, Any]],
    functions: Sequence[dict[str, Any]],
    ground_truth: Sequence[dict[str, Any]],
) -> CallResult:
    """The ``multiple``/``live_multiple`` rule: exactly one call, and it passes `check_call`.
    ``ground_truth`` must have exactly one entry (use `check_irrelevance` for irrelevance cases)."""
    if len(ground_truth) != 1:
        raise ValueError(f"expected a ground truth with one function, got {len(ground_truth)}")
    if len(calls) != 1:
        return _fail(
            "multiple_function_checker:wrong_count", f"Wrong number of functions: {len(calls)}, expected 1"
        )
    return check_call(calls[0], functions, ground_truth)


def check_irrelevance(calls: Sequence[dict[str, Any]]) -> CallResult:
    """An irrelevance case is correct iff the model made no call."""
    if calls:
        return _fail(
            "irrelevance_error:decoder_success",
            f"Made {len(calls)} call(s) when none should be made: {[c.get('name') for c in calls]!r}",
        )
    return _OK


def summarize(results: Sequence[CallResult]) -> dict[str, Any]:
    """``{"n", "correct", "accuracy", "error_types": {error_type: count}}``; accuracy is NaN when
    there are no results."""
    correct = sum(r.valid for r in results)
    errors = Counter(r.error_type or "unknown" for r in results if not r.valid)
    return {
        "n": len(results),
        "correct": correct,
        "accuracy": correct / len(results) if results else math.nan,
        "error_types": dict(errors.most_common()),
    }


# -- files ------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {exc}") from exc
            if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a string 'id'")
            rows.append((lineno, row))
    return rows


def load_bfcl_pairs(questions_path: str | Path, answers_path: str | Path | None = None) -> list[BfclCase]:
    """Read a ``BFCL_v4_*.jsonl`` question file and, optionally, its ``possible_answer_*.jsonl``.

    Without ``answers_path`` (irrelevance files) every case's ``ground_truth`` is ``None``. Raises
    ``ValueError`` naming the file and line for a malformed line, a repeated id, or a question
    without an answer."""
    qpath = Path(questions_path)
    answers: dict[str, list[dict[str, Any]]] | None = None
    if answers_path is not None:
        apath = Path(answers_path)
        answers = {}
        for lineno, row in _read_jsonl(apath):
            gt = row.get("ground_truth")
            if not isinstance(gt, list) or not all(
                isinstance(e, dict) and all(isinstance(p, dict) for p in e.values()) for e in gt
            ):
                raise ValueError(
                    f"{apath}:{lineno}: 'ground_truth' must be a list of {{func_name: {{param: [values]}}}}"
                )
            if row["id"] in answers:
                raise ValueError(f"{apath}:{lineno}: repeated id {row['id']!r}")
            answers[row["id"]] = gt
    cases: list[BfclCase] = []
    seen: set[str] = set()
    for lineno, row in _read_jsonl(qpath):
        where = f"{qpath}:{lineno}"
        question = row.get("question")
        if not (isinstance(question, list) and question and isinstance(question[0], list)):
            raise ValueError(f"{where}: 'question' must be a non-empty list of turns (lists of messages)")
        messages = question[0]
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError(f"{where}: each message needs 'role' and 'content'")
        functions = row.get("function")
        if not isinstance(functions, list) or not all(
            isinstance(f, dict)
            and isinstance(f.get("name"), str)
            and isinstance(f.get("parameters", {}), dict)
            for f in functions
        ):
            raise ValueError(f"{where}: 'function' must be a list of {{name, description, parameters}}")
        if row["id"] in seen:
            raise ValueError(f"{where}: repeated id {row['id']!r}")
        seen.add(row["id"])
        ground_truth = None
        if answers is not None:
            if row["id"] not in answers:
                raise ValueError(f"{where}: no answer for {row['id']!r} in {answers_path}")
            ground_truth = answers[row["id"]]
        cases.append(BfclCase(row["id"], messages, functions, ground_truth))
    return cases


# -- OpenAI tools -----------------------------------------------------------------------------------


def _json_schema(schema: dict[str, Any], where: str) -> dict[str, Any]:
    out = {k: v for k, v in schema.items() if k not in ("type", "properties", "items", "optional")}
    if "type" in schema:
        json_type = _JSON_TYPES.get(_schema_type(schema, where))
        if json_type is not None:
            out["type"] = json_type
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {
            k: _json_schema(v, f"{where}.{k}") if isinstance(v, dict) else v
            for k, v in schema["properties"].items()
        }
    if isinstance(schema.get("items"), dict):
        out["items"] = _json_schema(schema["items"], f"{where}[]")
    elif isinstance(
        schema.get("items"), list
    ):  # positional items (tuples): JSON Schema 2020-12's prefixItems
        out["prefixItems"] = [_json_schema(s, f"{where}[]") for s in schema["items"]]
    return out


def openai_name_map(functions: Sequence[dict[str, Any]]) -> dict[str, str]:
    """``{openai_name: bfcl_name}`` for `to_openai_tools`' names (dots become underscores, since
    OpenAI names must match ``^[a-zA-Z0-9_-]{1,64}$``). Raises ``ValueError`` for a name that
    cannot be mapped or two names that map to one. `check_call` accepts either name, so this is
    only needed to show or execute the original function."""
    mapping: dict[str, str] = {}
    for doc in functions:
        original = doc["name"]
        name = original.replace(".", "_")
        if not _OPENAI_NAME.match(name):
            raise ValueError(f"function name {original!r} is not a valid OpenAI tool name even as {name!r}")
        if name in mapping:
            raise ValueError(f"function names {mapping[name]!r} and {original!r} both map to {name!r}")
        mapping[name] = original
    return mapping


def to_openai_tools(functions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """BFCL function docs as OpenAI ``tools``: ``[{"type": "function", "function": {"name",
    "description", "parameters"}}]``. Types become JSON Schema's (``dict`` -> ``object``, ``float``
    -> ``number``, ``tuple`` -> ``array``, ``any`` -> no ``type``), recursively through
    ``properties`` and ``items``; BFCL's non-standard ``optional`` flag is dropped; names get ``_``
    for ``.`` (see `openai_name_map` for the way back)."""
    names = openai_name_map(functions)
    tools = []
    for name, doc in zip(names, functions, strict=True):
        parameters = _json_schema(doc.get("parameters") or {"type": "dict", "properties": {}}, doc["name"])
        tools.append(
            {
                "type": "function",
                "function": {
                    "name": name,
                    "description": doc.get("description", ""),
                    "parameters": parameters,
                },
            }
        )
    return tools
