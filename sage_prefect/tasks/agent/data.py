"""Loaders for the agent benchmark formats (MetaTool and BFCL), from any path.

Formats (see ``../shared/data/README.md``; a small sample ships in
``sage_prefect/examples/agent_sample``):

- MetaTool ``tools.json`` / ``tools_multi.json``: ``[{"name", "description"}]`` -> `load_tools`
- MetaTool ``selection_*.csv``: header ``query,tool`` -> `load_selection` (``{"query", "tool"}``)
- MetaTool ``multi_tool_*.json``: ``[{"query", "tool": [names]}]`` -> `load_multi_tool`
- MetaTool ``timing_*.json``: ``[{"query", "needs_tool": bool}]`` -> `load_timing`
- BFCL ``BFCL_v4_*.jsonl``: ``{"id", "question": [[{role, content}]], "function": [...]}`` per line
  -> `load_bfcl` (adds ``query``: the last user message); answers ``possible_answer_*.jsonl``
  -> `load_bfcl_answers` (``{id: ground_truth}``).

Every malformed item raises `DataFormatError` naming the file and the line (JSON arrays:
the line the item starts on; CSV: the row's line). Files whose stem ends in ``_dev`` may be
used for fitting (`is_dev_file`, `require_dev_file`); every other file is an evaluation set.
When only ``_dev`` files exist, `holdout_split` gives a fixed-seed split: fit on one part,
evaluate on the other.

>>> is_dev_file("data/selection_dev.csv"), is_dev_file("data/selection_test.csv")
(True, False)
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sage_prefect.common.errors import ConfigError, SageError

__all__ = [
    "DataFormatError",
    "agent_data_folders",
    "bfcl_answer_path",
    "holdout_split",
    "is_dev_file",
    "load_bfcl",
    "load_bfcl_answers",
    "load_multi_tool",
    "load_selection",
    "load_timing",
    "load_tools",
    "require_dev_file",
]

T = TypeVar("T")


class DataFormatError(SageError, ValueError):
    """A data file that does not match its format (``exc.file``, ``exc.line``)."""


def _fail(path: Path, line: int | None, message: str) -> DataFormatError:
    where = f"{path}:{line}" if line is not None else str(path)
    return DataFormatError(f"{where}: {message}", file=str(path), line=line)


def _read_text(path: str | Path) -> tuple[Path, str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataFormatError(f"{p}: no such file", file=str(p), line=None)
    try:
        return p, p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(p, None, f"not UTF-8 text: {exc}") from None


def _json_array(path: str | Path) -> Iterator[tuple[Path, int, Any]]:
    """Yield ``(path, line, item)`` for each item of a top-level JSON array, with the line it starts on."""
    p, text = _read_text(path)
    decoder = json.JSONDecoder()
    n = len(text)

    def skip(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def line_of(i: int) -> int:
        return text.count("\n", 0, i) + 1

    i = skip(0)
    if i < n and text[i] == "\ufeff":
        i = skip(i + 1)
    if i >= n or text[i] != "[":
        raise _fail(p, line_of(i), "expected a JSON array ('[') at the top level")
    i = skip(i + 1)
    if i < n and text[i] == "]":
        return
    while True:
        try:
            item, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise _fail(p, exc.lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
        yield p, line_of(i), item
        i = skip(end)
        if i < n and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < n and text[i] == "]":
            if skip(i + 1) < n:
                raise _fail(p, line_of(skip(i + 1)), "unexpected content after the JSON array")
            return
        raise _fail(p, line_of(i), "expected ',' or ']' between array items")


def _query(p: Path, line: int, item: Any) -> str:
    if not isinstance(item, dict):
        raise _fail(p, line, f"expected an object, got {type(item).__name__}")
    q = item.get("query")
    if not isinstance(q, str) or not q.strip():
        raise _fail(p, line, "field 'query' must be a non-empty string")
    return q


def load_tools(path: str | Path) -> list[dict[str, Any]]:
    """MetaTool tools: ``[{"name", "description", "parameters"?}]`` (names unique and non-empty)."""
    out: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for p, line, item in _json_array(path):
        if not isinstance(item, dict):
            raise _fail(p, line, f"expected a tool object, got {type(item).__name__}")
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _fail(p, line, "field 'name' must be a non-empty string")
        desc = item.get("description", "")
        if not isinstance(desc, str):
            raise _fail(p, line, f"tool {name!r}: field 'description' must be a string")
        params = item.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise _fail(p, line, f"tool {name!r}: field 'parameters' must be an object")
        if name in seen:
            raise _fail(p, line, f"tool {name!r} appears twice (first on line {seen[name]})")
        seen[name] = line
        tool: dict[str, Any] = {"name": name, "description": desc}
        if params is not None:
            tool["parameters"] = params
        out.append(tool)
    if not out:
        raise _fail(Path(path), None, "no tools in the file")
    return out


def load_selection(path: str | Path, tools: Sequence[str] | None = None) -> list[dict[str, str]]:
    """MetaTool selection CSV: ``[{"query", "tool"}]``; with ``tools``, every gold tool must be one of them."""
    p, text = _read_text(path)
    known = set(tools) if tools is not None else None
    rows: list[dict[str, str]] = []
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = next(reader)
    except StopIteration:
        raise _fail(p, 1, "empty file; expected a 'query,tool' header") from None
    header = [h.strip().lstrip("\ufeff") for h in header]
    if "query" not in header or "tool" not in header:
        raise _fail(p, 1, f"header must name columns 'query' and 'tool', got {header}")
    qi, ti = header.index("query"), header.index("tool")
    line = reader.line_num
    try:
        for row in reader:
            start, line = line + 1, reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise _fail(p, start, f"expected {len(header)} columns, got {len(row)}")
            query, tool = row[qi].strip(), row[ti].strip()
            if not query:
                raise _fail(p, start, "empty 'query'")
            if not tool:
                raise _fail(p, start, "empty 'tool'")
            if known is not None and tool not in known:
                raise _fail(p, start, f"tool {tool!r} is not one of the {len(known)} known tools")
            rows.append({"query": query, "tool": tool})
    except csv.Error as exc:
        raise _fail(p, reader.line_num, f"malformed CSV: {exc}") from None
    return rows


def load_multi_tool(path: str | Path, tools: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """MetaTool multi-tool JSON: ``[{"query", "tool": [names, ...]}]`` (at least one tool each)."""
    known = set(tools) if tools is not None else None
    out: list[dict[str, Any]] = []
    for p, line, item in _json_array(path):
        query = _query(p, line, item)
        names = item.get("tool")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise _fail(p, line, "field 'tool' must be a non-empty list of tool names")
        if known is not None:
            unknown = [n for n in names if n not in known]
            if unknown:
                raise _fail(p, line, f"unknown tool(s) {unknown}")
        out.append({"query": query, "tool": list(names)})
    return out


def load_timing(path: str | Path) -> list[dict[str, Any]]:
    """MetaTool timing JSON: ``[{"query", "needs_tool": bool}]`` (a real JSON boolean)."""
    out: list[dict[str, Any]] = []
    for p, line, item in _json_array(path):
        query = _query(p, line, item)
        label = item.get("needs_tool")
        if not isinstance(label, bool):
            raise _fail(p, line, f"field 'needs_tool' must be true or false, got {label!r}")
        out.append({"query": query, "needs_tool": label})
    return out


def _jsonl(path: str | Path) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    p, text = _read_text(path)
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _fail(p, n, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(item, dict):
            raise _fail(p, n, f"expected an object, got {type(item).__name__}")
        yield p, n, item


def load_bfcl(path: str | Path, answers: str | Path | None = None) -> list[dict[str, Any]]:
    """BFCL questions: ``[{"id", "question", "function", "query", "ground_truth"?}]``.

    ``query`` is the content of the last user message of the first turn. With ``answers``
    (a ``possible_answer_*.jsonl``), each item gets its ``ground_truth``; a question without
    an answer there is an error.
    """
    truth = load_bfcl_answers(answers) if answers is not None else None
    out: list[dict[str, Any]] = []
    for p, line, item in _jsonl(path):
        qid = item.get("id")
        if not isinstance(qid, str) or not qid:
            raise _fail(p, line, "field 'id' must be a non-empty string")
        question = item.get("question")
        if (
            not isinstance(question, list)
            or not question
            or not isinstance(question[0], list)
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in question[0])
        ):
            raise _fail(
                p, line, f"{qid}: field 'question' must be a list of turns of {{role, content}} messages"
            )
        users = [m["content"] for m in question[0] if m.get("role") == "user"]
        if not users:
            raise _fail(p, line, f"{qid}: the first turn has no user message")
        functions = item.get("function")
        if not isinstance(functions, list) or not all(
            isinstance(f, dict) and f.get("name") for f in functions
        ):
            raise _fail(
                p, line, f"{qid}: field 'function' must be a list of {{name, description, parameters}}"
            )
        record = {"id": qid, "question": question, "function": functions, "query": users[-1]}
        if truth is not None:
            if qid not in truth:
                raise _fail(p, line, f"{qid}: no answer in {answers}")
            record["ground_truth"] = truth[qid]
        out.append(record)
    return out


def load_bfcl_answers(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """BFCL ``possible_answer_*.jsonl``: ``{id: [{func_name: {arg: [acceptable values]}}]}``."""
    out: dict[str, list[dict[str, Any]]] = {}
    for p, line, item in _jsonl(path):
        qid, truth = item.get("id"), item.get("ground_truth")
        if not isinstance(qid, str) or not qid:
            raise _fail(p, line, "field 'id' must be a non-empty string")
        if not isinstance(truth, list) or not all(isinstance(t, dict) for t in truth):
            raise _fail(
                p, line, f"{qid}: field 'ground_truth' must be a list of {{func_name: {{arg: [values]}}}}"
            )
        out[qid] = truth
    return out


def bfcl_answer_path(question_path: str | Path) -> Path | None:
    """The ``possible_answer_X.jsonl`` next to ``BFCL_v4_X.jsonl``, if it exists."""
    p = Path(question_path)
    stem = p.stem.removeprefix("BFCL_v4_").removeprefix("BFCL_v3_")
    candidate = p.with_name(f"possible_answer_{stem}{p.suffix}")
    return candidate if candidate.is_file() else None


def is_dev_file(path: str | Path) -> bool:
    """Whether ``path`` is a development file (stem ends in ``_dev``): fitting and tuning allowed."""
    return Path(path).stem.endswith("_dev")


def agent_data_folders(root: Path, who: str) -> tuple[Path | None, Path | None]:
    """``(MetaTool folder, BFCL folder)`` of ``root`` as laid out in ``../shared/data/README.md``:
    ``root`` itself when it holds ``tools.json`` or ``BFCL_v4_*.jsonl`` files, else its
    ``metatool/`` and ``bfcl/`` subfolders; a `ConfigError` naming ``who`` when neither is there."""
    if not root.is_dir():
        raise ConfigError(f"{who}: data_dir {root} is not a directory", field="data_dir", file=str(root))
    if (root / "tools.json").is_file():
        return root, None
    if any(root.glob("BFCL_v4_*.jsonl")):
        return None, root
    metatool, bfcl = root / "metatool", root / "bfcl"
    found = (
        metatool if (metatool / "tools.json").is_file() else None,
        bfcl if bfcl.is_dir() and any(bfcl.glob("BFCL_v4_*.jsonl")) else None,
    )
    if found == (None, None):
        raise ConfigError(
            f"{who}: {root} holds neither MetaTool data (tools.json) nor BFCL data "
            "(BFCL_v4_*.jsonl), directly or in metatool/ and bfcl/ (see ../shared/data/README.md)",
            field="data_dir",
            file=str(root),
        )
    return found


def require_dev_file(path: str | Path, operator: str, field: str) -> Path:
    """``path`` if it is a ``*_dev`` file, else a `ConfigError` naming the operator and config key:
    operators never fit on evaluation files."""
    p = Path(path).expanduser()
    if not is_dev_file(p):
        raise ConfigError(
            f"{operator}: config key {field!r}: {p.name} is an evaluation file; fit only on files "
            "whose name ends in '_dev' (e.g. selection_dev.csv)",
            operator=operator,
            field=field,
            file=str(p),
        )
    return p


def holdout_split(items: Sequence[T], fraction: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """Split ``items`` into ``(fit, held_out)`` with a fixed seed; ``fraction`` goes to ``held_out``.

    The same items, fraction and seed always give the same split, so an operator fitting on
    ``fit`` and a benchmark scoring ``held_out`` agree without sharing state.

    >>> fit, held = holdout_split(list(range(10)), 0.3, seed=1)
    >>> len(fit), len(held), sorted(fit + held) == list(range(10))
    (7, 3, True)
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_held = round(len(items) * fraction)
    held = set(order[:n_held])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
