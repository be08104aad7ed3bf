"""Agent-capability evaluation: tool selection, planning and timing on MetaTool and BFCL data.

Data: any folder in the formats of ``../shared/data/agent`` (its README; a small sample ships
in ``sage_prefect/examples/agent_sample``). A MetaTool folder holds ``tools.json`` +
``selection_*.csv``, ``tools_multi.json`` + ``multi_tool_*.json`` and ``timing_*.json``; a BFCL
folder holds ``BFCL_v4_*.jsonl`` with their ``possible_answer_*.jsonl``.

Fit/eval rules (the README's): files whose stem ends in ``_dev`` may be fitted on; every other
matching file is an evaluation set, scored in full and never fitted on. When a folder holds
only ``_dev`` files of a kind, the operators fit on a fixed-seed part of the dev file (their
``holdout_fraction``/``seed`` config keys) and the evaluation scores the rest: the held-out part
of `holdout_split` with the same fraction and seed. Every row names the file it was scored on:
``selection_test.csv``, ``selection_dev.csv[held-out 20%, seed 0]``, ``BFCL_v4_multiple.jsonl``;
``fitted_on`` names what was fitted (``""`` when nothing was).

Pure metrics (hand-checkable): `selection_metrics` (top-k accuracy, recall@k, MRR),
`set_metrics` (macro and micro precision/recall/F1, exact-set accuracy), `binary_metrics`
(accuracy, precision, recall, F1 of "needs a tool"; undefined ratios are NaN, never a fake 0).

Evaluators (`evaluate_selection`, `evaluate_bfcl_selection`, `evaluate_planning`,
`evaluate_timing`) return flat rows ``{"task", "dataset", "eval_file", "method", "n",
<metrics>, "seconds", "setup_seconds", "fitted_on"}``: ``seconds`` is the time spent scoring
that file with that method, ``setup_seconds`` the one-time set-up (embedding tools, fitting)
charged to the first row that needed it. Methods that ask the chat model also report
``fallback_fraction``: the share of items where the model's reply was unusable (or the request
was refused) and the operator fell back; with the random-weight test model expect ~1.0, and
the rows then measure the fallback, not a model. `metric_name` / `row_metrics` turn a row
into MLflow-safe metric keys such as ``selection.metatool.selection_dev_holdout.embedding.top1_accuracy``.

BFCL's own metric: `evaluate_bfcl_calls` sends each BFCL case with its functions as OpenAI
``tools`` to any OpenAI-compatible endpoint and checks the reply's ``tool_calls`` with BFCL's
AST rules (`sage_prefect.benchmark.bfcl`); it returns rows (task ``bfcl_calls``, method
``llm-<tool_choice>``: accuracy, ``<kind>_fraction`` per `BFCL_ANSWER_KINDS`, ``error:<type>``
counts) and per-case records. `score_bfcl_case` and `bfcl_calls_row` are its scoring path,
usable on answers made by hand (`BfclAnswer`).

A folder lacking a kind of file yields no rows for it; a malformed file raises the loaders'
`DataFormatError` naming the file (and line). ``limit`` scores a fixed-seed random subset of
each evaluation set, named in ``eval_file`` (``...; random 200 of 2886, seed 0]``). Inputs
longer than a model takes are the operators' business: the embedding requests ask the control
plane to cut them to the model's token limit, and the llm methods fall back on them.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from sage_prefect.benchmark import bfcl
from sage_prefect.benchmark.bfcl import BfclCase
from sage_prefect.tasks.agent.data import (
    DataFormatError,
    bfcl_answer_path,
    holdout_split,
    is_dev_file,
    load_bfcl,
    load_multi_tool,
    load_selection,
    load_timing,
    load_tools,
)
from sage_prefect.tasks.agent.planning import Planner
from sage_prefect.tasks.agent.selection import ToolSelector
from sage_prefect.tasks.agent.timing import TimingDecider
from sage_prefect.tasks.client import is_context_length_error

__all__ = [
    "BFCL_ANSWER_KINDS",
    "BFCL_CALL_FILES",
    "BFCL_TOOL_CHOICES",
    "DEFAULT_SELECTION_METHODS",
    "BfclAnswer",
    "ID_FIELDS",
    "bfcl_query",
    "bfcl_calls_row",
    "binary_metrics",
    "evaluate_bfcl_calls",
    "evaluate_bfcl_selection",
    "evaluate_planning",
    "evaluate_selection",
    "evaluate_timing",
    "metric_name",
    "row_metrics",
    "score_bfcl_case",
    "selection_metrics",
    "set_metrics",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Label -> `ToolSelector` config of the selection methods (``"embedding"`` is fitted on the
#: dev exemplars when the folder has a ``selection_*_dev.csv``).
DEFAULT_SELECTION_METHODS: dict[str, dict[str, Any]] = {
    "keyword": {"method": "keyword"},
    "embedding": {"method": "embedding"},
    "hybrid": {"method": "hybrid"},
    "llm": {"method": "llm"},
}

#: Row fields that identify a row (the rest: metrics, plus the ``fitted_on`` note).
ID_FIELDS = ("task", "dataset", "eval_file", "method")

_FIT_KEYS = ("holdout_fraction", "seed")
_BASIC_SELECTION = frozenset({"keyword", "embedding", "hybrid"})

# -- pure metrics --------------------------------------------------------------------------------


def _check_lengths(a: Sequence[Any], b: Sequence[Any], what: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{what}: {len(a)} predictions but {len(b)} gold labels")


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def selection_metrics(
    ranked: Sequence[Sequence[str]],
    gold: Sequence[str | set[str] | frozenset[str]],
    ks: Iterable[int] = (1, 3, 5),
) -> dict[str, float]:
    """Ranking quality of ``ranked`` (names, best first) against ``gold`` (a name or a set of names).

    ``top{k}_accuracy``: a gold name is in the top k. ``recall@{k}``: the fraction of the gold
    set in the top k, averaged (the same as top-k accuracy for single names). ``mrr``: mean of
    1/rank of the first gold name (0 when none is in the list). Empty input: NaN metrics, n 0.

    >>> m = selection_metrics([["a", "b", "c"], ["c", "a", "b"]], ["a", {"b", "x"}], ks=(1, 3))
    >>> m["top1_accuracy"], m["top3_accuracy"], m["recall@3"], round(m["mrr"], 4), m["n"]
    (0.5, 1.0, 0.75, 0.6667, 2)
    """
    _check_lengths(ranked, gold, "selection_metrics")
    ks = sorted(set(ks))
    if any(k < 1 for k in ks):
        raise ValueError(f"selection_metrics: every k must be >= 1, got {ks}")
    hits: dict[int, list[float]] = {k: [] for k in ks}
    recalls: dict[int, list[float]] = {k: [] for k in ks}
    rr: list[float] = []
    for names, g in zip(ranked, gold, strict=True):
        gset = {g} if isinstance(g, str) else set(g)
        if not gset:
            raise ValueError("selection_metrics: a gold set is empty")
        names = list(names)
        for k in ks:
            found = len(gset & set(names[:k]))
            hits[k].append(1.0 if found else 0.0)
            recalls[k].append(found / len(gset))
        rank = next((i for i, n in enumerate(names, start=1) if n in gset), None)
        rr.append(1.0 / rank if rank else 0.0)
    out: dict[str, float] = {}
    for k in ks:
        out[f"top{k}_accuracy"] = _mean(hits[k])
    for k in ks:
        out[f"recall@{k}"] = _mean(recalls[k])
    out["mrr"] = _mean(rr)
    out["n"] = len(rr)
    return out


def set_metrics(predicted: Sequence[Iterable[str]], gold: Sequence[Iterable[str]]) -> dict[str, float]:
    """Set overlap of predicted and gold tool sets.

    Macro (per query, averaged): ``precision`` = |P∩G|/|P| (0 for an empty prediction),
    ``recall`` = |P∩G|/|G|, ``f1`` (0 when P and R are 0); ``exact_set_accuracy`` (P == G);
    micro: ``micro_precision``/``micro_recall``/``micro_f1`` from the summed counts (precision
    0 when nothing at all was predicted). Gold sets must be non-empty. Empty input: NaN, n 0.

    >>> m = set_metrics([{"a", "b"}, set()], [{"a"}, {"c"}])
    >>> m["precision"], m["recall"], round(m["f1"], 4), m["exact_set_accuracy"], m["micro_precision"]
    (0.25, 0.5, 0.3333, 0.0, 0.5)
    """
    _check_lengths(predicted, gold, "set_metrics")
    ps: list[float] = []
    rs: list[float] = []
    fs: list[float] = []
    exact: list[float] = []
    inter_sum = pred_sum = gold_sum = 0
    for p_items, g_items in zip(predicted, gold, strict=True):
        p, g = set(p_items), set(g_items)
        if not g:
            raise ValueError("set_metrics: a gold set is empty")
        inter = len(p & g)
        prec = inter / len(p) if p else 0.0
        rec = inter / len(g)
        ps.append(prec)
        rs.append(rec)
        fs.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
        exact.append(1.0 if p == g else 0.0)
        inter_sum += inter
        pred_sum += len(p)
        gold_sum += len(g)
    n = len(ps)
    micro_p = (inter_sum / pred_sum if pred_sum else 0.0) if n else math.nan
    micro_r = _ratio(inter_sum, gold_sum)
    micro_f = (2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r else 0.0) if n else math.nan
    return {
        "precision": _mean(ps),
        "recall": _mean(rs),
        "f1": _mean(fs),
        "exact_set_accuracy": _mean(exact),
        "micro_precision": micro_p,
        "micro_recall": micro_r,
        "micro_f1": micro_f,
        "n": n,
    }


def binary_metrics(predicted: Sequence[bool], gold: Sequence[bool]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and specificity of the positive class ("needs a tool"),
    plus the ``tp``/``fp``/``tn``/``fn`` counts and ``n``.

    A ratio whose denominator is 0 is NaN (undefined), not 0: on a file whose items are all
    negatives (BFCL irrelevance) recall is NaN and only accuracy (= specificity) says anything.
    F1 is NaN when precision or recall is.

    >>> m = binary_metrics([True, False, False], [False, False, False])
    >>> round(m["accuracy"], 4), m["precision"], m["recall"], m["fp"], m["tn"]
    (0.6667, 0.0, nan, 1, 2)
    """
    _check_lengths(predicted, gold, "binary_metrics")
    tp = sum(1 for p, g in zip(predicted, gold, strict=True) if p and g)
    fp = sum(1 for p, g in zip(predicted, gold, strict=True) if p and not g)
    tn = sum(1 for p, g in zip(predicted, gold, strict=True) if not p and not g)
    fn = sum(1 for p, g in zip(predicted, gold, strict=True) if not p and g)
    n = tp + fp + tn + fn
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    if math.isnan(precision) or math.isnan(recall):
        f1 = math.nan
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": _ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "specificity": _ratio(tn, tn + fp),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": n,
    }


# -- metric names -------------------------------------------------------------------------------------


def _key_part(text: str) -> str:
    text = text.replace("@", "_at_").replace("+", "-")
    return re.sub(r"[^A-Za-z0-9_\-]", "_", text).strip("_") or "_"


def _eval_key(eval_file: str) -> str:
    base, _, note = eval_file.partition("[")
    stem = base.strip()
    for suffix in (".jsonl", ".json", ".csv"):
        stem = stem.removesuffix(suffix)
    return _key_part(stem) + ("_holdout" if "held-out" in note else "")


def metric_name(row: Mapping[str, Any], metric: str) -> str:
    """The MLflow-safe key of ``metric`` of ``row``: ``task.dataset.eval.method.metric``.

    The eval part is the file stem, plus ``_holdout`` for a held-out part of a dev file;
    ``@`` becomes ``_at_``, ``+`` becomes ``-`` and other characters outside ``[A-Za-z0-9_-]``
    become ``_``.

    >>> row = {"task": "selection", "dataset": "metatool", "method": "embedding+classifier",
    ...        "eval_file": "selection_dev.csv[held-out 20%, seed 0]"}
    >>> metric_name(row, "recall@3")
    'selection.metatool.selection_dev_holdout.embedding-classifier.recall_at_3'
    """
    parts = [
        _key_part(str(row["task"])),
        _key_part(str(row["dataset"])),
        _eval_key(str(row["eval_file"])),
        _key_part(str(row["method"])),
        _key_part(metric),
    ]
    return ".".join(parts)


def row_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """Every numeric field of ``row`` (``n``, ``seconds`` included) under its `metric_name`."""
    return {
        metric_name(row, k): float(v)
        for k, v in row.items()
        if k not in ID_FIELDS and isinstance(v, int | float) and not isinstance(v, bool)
    }


# -- shared plumbing ---------------------------------------------------------------------------------------


@dataclass
class _Target:
    """One evaluation set: the file, the items scored, and how they were chosen."""

    path: Path
    label: str
    items: list[Any]


def _folder(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataFormatError(f"{p}: no such folder ({what})", file=str(p), line=None)
    return p


def _pct(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {fraction}")


def _subsample(items: list[T], limit: int | None, seed: int) -> tuple[list[T], str]:
    """At most ``limit`` items (a fixed-seed random subset, original order) and a note for the label."""
    if limit is None or len(items) <= limit:
        return items, ""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep], f"random {limit} of {len(items)}, seed {seed}"


def _targets(
    files: list[Path], load: Callable[[Path], list[T]], fraction: float, seed: int, limit: int | None
) -> tuple[list[_Target], bool]:
    """The evaluation sets among ``files`` and whether they are held-out parts of dev files.

    Evaluation files (not ``*_dev``) are scored in full; when there are none, each dev file's
    fixed-seed held-out part is.
    """
    evaluation = [f for f in files if not is_dev_file(f)]
    held_out = not evaluation
    out: list[_Target] = []
    for path in evaluation or files:
        items = load(path)
        notes = []
        if held_out:
            items = holdout_split(items, fraction, seed)[1]
            notes.append(f"held-out {_pct(fraction)}, seed {seed}")
        items, note = _subsample(items, limit, seed)
        if note:
            notes.append(note)
        label = path.name + (f"[{'; '.join(notes)}]" if notes else "")
        out.append(_Target(path, label, items))
    return out, held_out


def _dev_file(files: list[Path], preferred: str) -> Path | None:
    dev = [f for f in files if is_dev_file(f)]
    for f in dev:
        if f.name == preferred:
            return f
    return dev[0] if dev else None


def _fit_note(path: str | Path | None, fraction: float, seed: int) -> str:
    """What an operator fitted on: ``selection_dev.csv`` or ``selection_dev.csv[fit 80%, seed 0]``."""
    if path is None:
        return ""
    name = Path(path).name
    return f"{name}[fit {_pct(1 - fraction)}, seed {seed}]" if fraction > 0 else name


def _methods(methods: Sequence[str] | Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{label: config}`` from a mapping, or from method names (``{"method": name}`` each)."""
    if isinstance(methods, Mapping):
        return {str(k): dict(v) for k, v in methods.items()}
    return {str(m): {"method": str(m)} for m in methods}


def _row(
    task: str, dataset: str, target_label: str, method: str, metrics: Mapping[str, float]
) -> dict[str, Any]:
    row: dict[str, Any] = {"task": task, "dataset": dataset, "eval_file": target_label, "method": method}
    row["n"] = metrics.get("n", 0)
    row.update({k: v for k, v in metrics.items() if k != "n"})
    return row


def _fraction(values: Sequence[str], which: str) -> float:
    return _mean([1.0 if v == which else 0.0 for v in values])


def _endpoint(base_url: str | None, api_key: str | None) -> dict[str, Any]:
    return {"base_url": base_url, "api_key": api_key}


def _enforce_fit_split(label: str, cfg: dict[str, Any], fraction: float, seed: int) -> None:
    for key, value in zip(_FIT_KEYS, (fraction, seed), strict=True):
        if key in cfg and cfg[key] != value:
            raise ValueError(
                f"method {label!r}: config key {key!r}={cfg[key]!r} differs from the evaluation's "
                f"{value!r}; the fit would see held-out items"
            )
        cfg[key] = value


# -- selection (MetaTool) --------------------------------------------------------------------------------


def evaluate_selection(
    metatool_dir: str | Path,
    methods: Mapping[str, Mapping[str, Any]] | Sequence[str],
    base_url: str | None = None,
    api_key: str | None = None,
    ks: Sequence[int] = (1, 3, 5),
    holdout_fraction: float = 0.2,
    seed: int = 0,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Tool selection on a MetaTool folder: each ``selection_*.csv`` evaluation file (or the
    held-out part of ``selection_dev.csv``), ranked by each method over ``tools.json``.

    ``methods`` maps a label to a `ToolSelector` config; this adds ``tools_path``,
    ``exemplars_path`` (the dev file, unless the config sets the key itself, ``None`` for no
    fit), ``holdout_fraction``/``seed`` (when scoring a held-out part: the evaluation's, so the
    fit never sees the scored items), the endpoint and ``top_k = max(ks)``. Methods
    ``keyword``/``embedding``/``hybrid`` with otherwise equal configs share one selector (one
    fit); ``llm`` rows add ``fallback_fraction``. ``limit`` scores a fixed-seed random subset of
    at most that many queries per file (named in ``eval_file``).
    """
    _check_fraction(holdout_fraction)
    folder = _folder(metatool_dir, "MetaTool data")
    files = sorted(folder.glob("selection_*.csv"))
    if not files:
        return []
    tools_path = folder / "tools.json"
    names = [t["name"] for t in load_tools(tools_path)]
    targets, held_out = _targets(
        files, lambda p: load_selection(p, tools=names), holdout_fraction, seed, limit
    )
    dev = _dev_file(files, "selection_dev.csv")
    k_max = max(ks)
    configs: dict[str, dict[str, Any]] = {}
    for label, user in _methods(methods).items():
        cfg: dict[str, Any] = {
            "method": "embedding",
            "tools_path": str(tools_path),
            "exemplars_path": str(dev) if dev is not None else None,
            **_endpoint(base_url, api_key),
            **user,
            "top_k": k_max,
        }
        if held_out and cfg["exemplars_path"] is not None:
            _enforce_fit_split(label, cfg, holdout_fraction, seed)
        configs[label] = cfg

    # embedding/hybrid labels whose other keys agree share one selector (one fit); keyword
    # labels get a model-free selector of their own.
    selectors: dict[str, ToolSelector] = {}
    shared: dict[tuple[tuple[str, str], ...], ToolSelector] = {}
    for label, cfg in configs.items():
        if cfg["method"] not in _BASIC_SELECTION:
            selectors[label] = ToolSelector(cfg)
            continue
        build = dict(cfg, method="keyword" if cfg["method"] == "keyword" else "hybrid")
        key = tuple(sorted((k, repr(v)) for k, v in build.items()))
        if key not in shared:
            shared[key] = ToolSelector(build)
        selectors[label] = shared[key]

    rows: list[dict[str, Any]] = []
    for target in targets:
        queries = [it["query"] for it in target.items]
        gold: list[str | set[str]] = [it["tool"] for it in target.items]
        for label, cfg in configs.items():
            sel = selectors[label]
            t0 = time.perf_counter()
            sel.ensure_setup()
            setup_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            extra: dict[str, float] = {}
            if cfg["method"] in _BASIC_SELECTION:
                ranked = [[n for n, _ in r] for r in sel.rank(queries, method=cfg["method"], k=k_max)]
            else:
                results = sel.select(queries) if queries else []
                ranked = [[n for n, _ in r] for r, _ in results]
                extra["fallback_fraction"] = _fraction([s for _, s in results], "fallback")
            seconds = time.perf_counter() - t0
            fit_path = cfg.get("exemplars_path") if cfg["method"] != "keyword" else None
            row = _row("selection", folder.name, target.label, label, selection_metrics(ranked, gold, ks))
            row.update(extra)
            row.update(
                seconds=seconds,
                setup_seconds=setup_s,
                fitted_on=_fit_note(
                    fit_path, float(cfg.get("holdout_fraction", 0.0)), int(cfg.get("seed", 0))
                ),
            )
            rows.append(row)
    return rows


# -- selection (BFCL) ------------------------------------------------------------------------------------


def bfcl_query(item: Mapping[str, Any]) -> str:
    """The user text of a BFCL item: its user messages (every turn), one per line."""
    return "\n".join(
        m["content"]
        for turn in item["question"]
        for m in turn
        if m.get("role") == "user" and m.get("content")
    )


def _bfcl_gold(item: Mapping[str, Any], path: Path) -> str | set[str]:
    names: list[str] = []
    for call in item.get("ground_truth") or []:
        for name in call:
            if name not in names:
                names.append(name)
    candidates = {f["name"] for f in item["function"]}
    if not names or not set(names) <= candidates:
        raise DataFormatError(
            f"{path}: {item['id']}: gold function(s) {names} are not among the item's functions",
            file=str(path),
            line=None,
        )
    return names[0] if len(names) == 1 else set(names)


def _spec(fn: Mapping[str, Any]) -> dict[str, str]:
    return {"name": str(fn["name"]), "description": str(fn.get("description") or "")}


def _group_items(items: list[dict[str, Any]]) -> list[list[int]]:
    """Items grouped so that no two different tools of one group share a name (first fit)."""
    groups: list[tuple[dict[str, str], list[int]]] = []
    for i, item in enumerate(items):
        specs = [_spec(f) for f in item["function"]]
        for tools, members in groups:
            if all(tools.get(s["name"], s["description"]) == s["description"] for s in specs):
                tools.update({s["name"]: s["description"] for s in specs})
                members.append(i)
                break
        else:
            groups.append(({s["name"]: s["description"] for s in specs}, [i]))
    return [members for _, members in groups]


def _rrf(mats: Sequence[np.ndarray], rrf_k: int) -> np.ndarray:
    out = np.zeros_like(mats[0], dtype=np.float64)
    for mat in mats:
        ranks = np.argsort(np.argsort(-mat, axis=1, kind="stable"), axis=1)
        out += 1.0 / (rrf_k + ranks + 1.0)
    return out


def _top(names: list[str], scores: np.ndarray, k: int) -> list[str]:
    return [names[j] for j in np.argsort(-scores, kind="stable")[:k]]


def _bfcl_rank_basic(
    items: list[dict[str, Any]], labels: dict[str, dict[str, Any]], k: int
) -> tuple[dict[str, list[list[str]]], dict[str, float], dict[str, float]]:
    """Per-item rankings of keyword/embedding/hybrid labels, with each label's scoring and
    set-up seconds (set-up shared by labels is charged to the first one).

    Keyword: BM25 over the item's own functions (a per-item selector, as the candidate set
    defines the corpus). Embedding: the cosine of query and tool does not depend on the
    candidate set, so items are grouped into selectors whose tools have distinct names and each
    query is embedded once per embedding config. Hybrid: reciprocal-rank fusion of the item's
    keyword and embedding ranks, as `ToolSelector`'s hybrid method computes it.
    """
    queries = [bfcl_query(it) for it in items]
    cand = [[_spec(f)["name"] for f in it["function"]] for it in items]
    rankings: dict[str, list[list[str]]] = {}
    seconds: dict[str, float] = {}
    setup: dict[str, float] = {}
    t0 = time.perf_counter()
    kw_scores = [
        ToolSelector({"method": "keyword", "tools": [_spec(f) for f in it["function"]], "top_k": 1}).score(
            [q], "keyword"
        )[0]
        for it, q in zip(items, queries, strict=True)
    ]
    kw_time = time.perf_counter() - t0
    cache: dict[tuple[tuple[str, str], ...], tuple[list[np.ndarray], float]] = {}
    for label, cfg in labels.items():
        method = cfg["method"]
        setup[label] = 0.0
        t0 = time.perf_counter()
        if method == "keyword":
            rankings[label] = [_top(c, s, k) for c, s in zip(cand, kw_scores, strict=True)]
            seconds[label] = kw_time + time.perf_counter() - t0
            continue
        emb_cfg = {
            key: v
            for key, v in cfg.items()
            if key not in ("method", "tools", "tools_path", "exemplars_path", "top_k")
        }
        key = tuple(sorted((kk, repr(v)) for kk, v in emb_cfg.items()))
        if key not in cache:
            emb, setup_s, scoring_s = _bfcl_embedding_scores(items, queries, emb_cfg)
            cache[key] = (emb, scoring_s)
            setup[label] = setup_s
        emb, scoring_s = cache[key]
        t0 = time.perf_counter()
        if method == "embedding":
            rankings[label] = [_top(c, s, k) for c, s in zip(cand, emb, strict=True)]
            seconds[label] = scoring_s + time.perf_counter() - t0
        else:
            rrf_k = int(cfg.get("rrf_k", 60))
            rankings[label] = [
                _top(c, _rrf([kw[None, :], e[None, :]], rrf_k)[0], k)
                for c, kw, e in zip(cand, kw_scores, emb, strict=True)
            ]
            seconds[label] = kw_time + scoring_s + time.perf_counter() - t0
    return rankings, seconds, setup


def _bfcl_embedding_scores(
    items: list[dict[str, Any]], queries: list[str], cfg: dict[str, Any]
) -> tuple[list[np.ndarray], float, float]:
    """Embedding scores of each item's functions (item order), set-up and query seconds."""
    scores: list[np.ndarray] = [np.zeros(0)] * len(items)
    setup = scoring = 0.0
    for members in _group_items(items):
        tools: dict[str, str] = {}
        for i in members:
            for f in items[i]["function"]:
                s = _spec(f)
                tools.setdefault(s["name"], s["description"])
        sel = ToolSelector(
            {
                **cfg,
                "method": "embedding",
                "tools": [{"name": n, "description": d} for n, d in tools.items()],
                "top_k": 1,
            }
        )
        t0 = time.perf_counter()
        sel.ensure_setup()
        setup += time.perf_counter() - t0
        t0 = time.perf_counter()
        column = {n: j for j, n in enumerate(tools)}
        mat = sel.score([queries[i] for i in members], "embedding")
        for row, i in zip(mat, members, strict=True):
            scores[i] = np.asarray([row[column[_spec(f)["name"]]] for f in items[i]["function"]])
        scoring += time.perf_counter() - t0
    return scores, setup, scoring


def _bfcl_rank_per_item(
    items: list[dict[str, Any]], cfg: dict[str, Any], k: int, concurrency: int
) -> tuple[list[list[str]], list[str]]:
    """Rank each item's functions with its own `ToolSelector` (any method; ``llm`` via select)."""

    def one(item: dict[str, Any]) -> tuple[list[str], str]:
        sel = ToolSelector(
            {**cfg, "tools": [_spec(f) for f in item["function"]], "top_k": k, "concurrency": 1}
        )
        q = bfcl_query(item)
        if cfg["method"] == "llm":
            ((ranked, source),) = sel.select([q])
            return [n for n, _ in ranked], source
        return [n for n, _ in sel.rank([q])[0]], cfg["method"]

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        results = list(pool.map(one, items))
    return [r for r, _ in results], [s for _, s in results]


def _bfcl_files(folder: Path, stems: Sequence[str]) -> list[Path]:
    out = []
    for path in sorted(folder.glob("BFCL_v*_*.jsonl")):
        stem = re.sub(r"^BFCL_v\d+_", "", path.stem)
        if stem in stems:
            out.append(path)
    return out


def evaluate_bfcl_selection(
    bfcl_dir: str | Path,
    methods: Mapping[str, Mapping[str, Any]] | Sequence[str],
    base_url: str | None = None,
    api_key: str | None = None,
    ks: Sequence[int] = (1, 3),
    limit: int | None = None,
    seed: int = 0,
    concurrency: int = 8,
) -> list[dict[str, Any]]:
    """Function selection on BFCL ``multiple`` / ``live_multiple``: each item's own ``function``
    list ranked for its user text; gold is the function named in its ``possible_answer_*`` line.

    There is no BFCL selection dev data, so nothing is fitted (embedding is description-only;
    exemplar keys are dropped). ``keyword``/``embedding``/``hybrid`` are computed in bulk (see
    `_bfcl_rank_basic`: each query embedded once); ``llm`` and other methods use one
    `ToolSelector` per item, ``concurrency`` items at a time, and add ``fallback_fraction``.
    """
    folder = _folder(bfcl_dir, "BFCL data")
    k_max = max(ks)
    configs = {
        label: {**_endpoint(base_url, api_key), **cfg, "exemplars_path": None}
        for label, cfg in _methods(methods).items()
    }
    for cfg in configs.values():
        cfg.setdefault("method", "embedding")
    rows: list[dict[str, Any]] = []
    for path in _bfcl_files(folder, ("multiple", "live_multiple")):
        answers = bfcl_answer_path(path)
        if answers is None:
            stem = re.sub(r"^BFCL_v\d+_", "", path.stem)
            raise DataFormatError(
                f"{path}: no answers file possible_answer_{stem}.jsonl next to it", file=str(path), line=None
            )
        items, note = _subsample(load_bfcl(path, answers), limit, seed)
        label_file = path.name + (f"[{note}]" if note else "")
        gold = [_bfcl_gold(it, path) for it in items]
        basic = {lb: c for lb, c in configs.items() if c["method"] in _BASIC_SELECTION}
        ranked_basic, basic_seconds, basic_setup = (
            _bfcl_rank_basic(items, basic, k_max) if basic else ({}, {}, {})
        )
        for label, cfg in configs.items():
            extra: dict[str, float] = {}
            if label in ranked_basic:
                ranked, seconds, setup_s = ranked_basic[label], basic_seconds[label], basic_setup[label]
            else:
                t0 = time.perf_counter()
                ranked, sources = _bfcl_rank_per_item(items, cfg, k_max, concurrency)
                seconds, setup_s = time.perf_counter() - t0, 0.0
                if cfg["method"] == "llm":
                    extra["fallback_fraction"] = _fraction(sources, "fallback")
            row = _row("selection", folder.name, label_file, label, selection_metrics(ranked, gold, ks))
            row.update(extra)
            row.update(seconds=seconds, setup_seconds=setup_s, fitted_on="")
            rows.append(row)
    return rows


# -- planning ---------------------------------------------------------------------------------------------


def evaluate_planning(
    metatool_dir: str | Path,
    methods: Mapping[str, Mapping[str, Any]] | Sequence[str] = ("retrieval", "llm"),
    base_url: str | None = None,
    api_key: str | None = None,
    planner_config: Mapping[str, Any] | None = None,
    top_k: int | None = None,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Multi-tool planning on ``multi_tool_*.json`` with ``tools_multi.json``: the predicted set
    is the tools named by a `Planner`'s plan, the gold set the item's ``tool`` list (`set_metrics`).

    ``methods`` are Planner methods (``retrieval``, ``llm``) or ``{label: Planner config}``;
    ``planner_config`` adds keys to every planner (``max_steps``, ``margin``,
    ``selector_method``, ...). Nothing is fitted on the multi-tool file; a dev-only folder is
    still scored on its held-out part, per the rules. ``llm`` rows add ``fallback_fraction``
    (plans that came from retrieval because the model's plan was rejected). One more row,
    ``selector_top{k}``, scores the planner selector's top ``k`` tools as the set: ``k`` is
    ``top_k``, by default the planner's ``max_steps`` (``top_k=0``: no such row).
    """
    _check_fraction(holdout_fraction)
    folder = _folder(metatool_dir, "MetaTool data")
    files = sorted(folder.glob("multi_tool_*.json"))
    if not files:
        return []
    tools_path = folder / "tools_multi.json"
    names = [t["name"] for t in load_tools(tools_path)]
    targets, _held_out = _targets(
        files, lambda p: load_multi_tool(p, tools=names), holdout_fraction, seed, limit
    )
    planners: dict[str, Planner] = {}
    for label, cfg in _methods(methods).items():
        planners[label] = Planner(
            {
                "tools_path": str(tools_path),
                **_endpoint(base_url, api_key),
                **dict(planner_config or {}),
                **cfg,
            }
        )
    base = next((p for p in planners.values() if p.cfg.method == "retrieval"), None)
    base = base or next(iter(planners.values()), None)
    k = top_k if top_k is not None else (base.cfg.max_steps if base is not None else 0)
    rows: list[dict[str, Any]] = []
    for target in targets:
        queries = [it["query"] for it in target.items]
        gold = [set(it["tool"]) for it in target.items]
        for label, planner in planners.items():
            t0 = time.perf_counter()
            planner.ensure_setup()
            setup_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            results = planner.plan(queries) if queries else []
            seconds = time.perf_counter() - t0
            predicted = [{step["tool"] for step in calls} for calls, _, _ in results]
            row = _row("planning", folder.name, target.label, label, set_metrics(predicted, gold))
            row["mean_plan_steps"] = _mean([float(len(calls)) for calls, _, _ in results])
            if planner.cfg.method == "llm":
                row["fallback_fraction"] = _fraction([s for _, s, _ in results], "retrieval")
            row.update(seconds=seconds, setup_seconds=setup_s, fitted_on=_planner_fit(planner))
            rows.append(row)
        if base is not None and k > 0:
            t0 = time.perf_counter()
            ranked = base.selector.rank(queries, k=k) if queries else []
            seconds = time.perf_counter() - t0
            predicted = [{n for n, _ in r} for r in ranked]
            row = _row(
                "planning", folder.name, target.label, f"selector_top{k}", set_metrics(predicted, gold)
            )
            row["mean_plan_steps"] = float(min(k, len(names))) if queries else math.nan
            row.update(seconds=seconds, setup_seconds=0.0, fitted_on=_planner_fit(base))
            rows.append(row)
    return rows


def _planner_fit(planner: Planner) -> str:
    path = planner.cfg.exemplars_path
    return Path(path).name if path and planner.cfg.selector_method != "keyword" else ""


# -- timing -------------------------------------------------------------------------------------------------


def evaluate_timing(
    metatool_dir: str | Path | None,
    bfcl_dir: str | Path | None = None,
    methods: Mapping[str, Mapping[str, Any]] | Sequence[str] = ("rule", "embedding", "llm"),
    base_url: str | None = None,
    api_key: str | None = None,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Timing (call a tool or not): MetaTool ``timing_*.json`` (``needs_tool``) and BFCL
    ``*irrelevance`` (gold False) / ``*relevance`` (gold True) files, each scored separately
    with `binary_metrics`, plus a ``combined[...]`` BFCL row when there are several.

    ``methods`` are `TimingDecider` methods or ``{label: config}``. The embedding method fits
    on the MetaTool ``timing_dev.json`` (``train_path``); when that file is also the one scored,
    it is fitted on the part `holdout_split` keeps and scored on the held-out part. Without a
    dev timing file the embedding method yields no rows (logged). On single-class files
    (BFCL) recall or precision is undefined: NaN; accuracy is the meaningful number there.
    ``llm`` rows add ``fallback_fraction`` (replies with neither yes nor no: the rules decided).
    """
    _check_fraction(holdout_fraction)
    targets: list[tuple[str, _Target, list[bool]]] = []
    timing_files: list[Path] = []
    held_out = False
    meta_name = ""
    if metatool_dir is not None:
        folder = _folder(metatool_dir, "MetaTool data")
        meta_name = folder.name
        timing_files = sorted(folder.glob("timing_*.json"))
        if timing_files:
            meta_targets, held_out = _targets(timing_files, load_timing, holdout_fraction, seed, limit)
            for t in meta_targets:
                targets.append((meta_name, t, [bool(it["needs_tool"]) for it in t.items]))
    bfcl_targets: list[tuple[str, _Target, list[bool]]] = []
    if bfcl_dir is not None:
        bfolder = _folder(bfcl_dir, "BFCL data")
        for path in sorted(bfolder.glob("BFCL_v*_*.jsonl")):
            stem = re.sub(r"^BFCL_v\d+_", "", path.stem)
            if not stem.endswith("relevance"):
                continue
            positive = not stem.endswith("irrelevance")
            items, note = _subsample(load_bfcl(path), limit, seed)
            target = _Target(path, path.name + (f"[{note}]" if note else ""), items)
            bfcl_targets.append((bfolder.name, target, [positive] * len(items)))
    targets += bfcl_targets
    if not targets:
        return []
    dev = _dev_file(timing_files, "timing_dev.json")
    deciders: dict[str, TimingDecider] = {}
    for label, user in _methods(methods).items():
        cfg: dict[str, Any] = {**_endpoint(base_url, api_key), **user}
        cfg.setdefault("method", "rule")
        if cfg["method"] == "embedding" and "train_path" not in cfg:
            if dev is None:
                log.warning("timing: method %r skipped: no timing_*_dev.json to fit on", label)
                continue
            cfg["train_path"] = str(dev)
        if cfg.get("train_path") is not None:
            if held_out:
                _enforce_fit_split(label, cfg, holdout_fraction, seed)
            else:
                cfg.setdefault("holdout_fraction", 0.0)
        deciders[label] = TimingDecider(cfg)

    rows: list[dict[str, Any]] = []
    combined: dict[str, tuple[list[bool], list[bool], list[str], float]] = {}
    for dataset, target, gold in targets:
        queries = [it["query"] if "needs_tool" in it else bfcl_query(it) for it in target.items]
        for label, decider in deciders.items():
            t0 = time.perf_counter()
            decider.ensure_setup()
            setup_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            results = decider.probabilities(queries)
            seconds = time.perf_counter() - t0
            predicted = [p > decider.cfg.threshold for p, _ in results]
            sources = [s for _, s in results]
            row = _timing_row(dataset, target.label, label, decider, predicted, gold, sources, seconds)
            row.update(setup_seconds=setup_s, fitted_on=_timing_fit(decider))
            rows.append(row)
            if any(target is t for _, t, _ in bfcl_targets):
                prev = combined.get(label, ([], [], [], 0.0))
                combined[label] = (prev[0] + predicted, prev[1] + gold, prev[2] + sources, prev[3] + seconds)
    if len(bfcl_targets) > 1:
        name = "combined[" + ", ".join(t.label for _, t, _ in bfcl_targets) + "]"
        for label, (predicted, gold, sources, seconds) in combined.items():
            decider = deciders[label]
            row = _timing_row(bfcl_targets[0][0], name, label, decider, predicted, gold, sources, seconds)
            row.update(setup_seconds=0.0, fitted_on=_timing_fit(decider))
            rows.append(row)
    return rows


def _timing_row(
    dataset: str,
    eval_file: str,
    label: str,
    decider: TimingDecider,
    predicted: list[bool],
    gold: list[bool],
    sources: list[str],
    seconds: float,
) -> dict[str, Any]:
    row = _row("timing", dataset, eval_file, label, binary_metrics(predicted, gold))
    row["predicted_tool_rate"] = _mean([1.0 if p else 0.0 for p in predicted])
    if decider.cfg.method == "llm":
        row["fallback_fraction"] = _fraction(sources, "fallback")
    row["seconds"] = seconds
    return row


def _timing_fit(decider: TimingDecider) -> str:
    cfg = decider.cfg
    return _fit_note(cfg.train_path, cfg.holdout_fraction, cfg.seed) if cfg.method == "embedding" else ""


# -- function calls (BFCL's AST metric) ---------------------------------------------------------------------

#: The BFCL files `evaluate_bfcl_calls` scores by default (stems of ``BFCL_v4_<stem>.jsonl``).
BFCL_CALL_FILES = ("multiple", "live_multiple", "irrelevance", "live_irrelevance")
#: ``tool_choice`` modes of `evaluate_bfcl_calls`.
BFCL_TOOL_CHOICES = ("auto", "required")
#: What an answer can be, one per case (``<kind>_fraction`` in a row; they sum to 1): the request
#: failed or was refused; no call; a call whose arguments are not a JSON object; a call of a
#: function that is not the expected one (every call, on an irrelevance file); more than one call
#: (of the expected function); the expected function with arguments the AST check rejects; the
#: right call.
BFCL_ANSWER_KINDS = (
    "fallback",
    "no_call",
    "unparsable",
    "wrong_function",
    "multiple_calls",
    "wrong_arguments",
    "correct_call",
)


@dataclass(frozen=True)
class BfclAnswer:
    """What an endpoint answered to one BFCL case: its ``tool_calls`` as ``{"name", "arguments"}``
    (the name as sent, the arguments as the raw JSON string), the text, and ``error`` (why the
    request failed or was refused: ``"context_length_exceeded"``, ``"http_400"``, ``"timeout"``,
    ``"refusal"``...; then ``calls`` is empty)."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    content: str = ""
    finish_reason: str | None = None
    error: str | None = None
    detail: str = ""
    seconds: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def _bfcl_kind(stem: str) -> str:
    """``"irrelevance"`` (no call is right), ``"relevance"`` (any call is) or ``"ast"``."""
    if stem.endswith("irrelevance"):
        return "irrelevance"
    return "relevance" if stem.endswith("relevance") else "ast"


def _parses(arguments: Any) -> bool:
    if isinstance(arguments, dict):
        return True
    if not isinstance(arguments, str):
        return False
    try:
        return isinstance(json.loads(arguments) if arguments.strip() else {}, dict)
    except ValueError:
        return False


def score_bfcl_case(case: BfclCase, answer: BfclAnswer, kind: str | None = None) -> dict[str, Any]:
    """Score one answer by BFCL's rules: the per-case record ``{"id", "kind", "answer", "valid",
    "error_type", "error", "calls", "content", "finish_reason", "request_error", "seconds",
    "prompt_tokens", "completion_tokens"}``.

    ``kind`` is ``"ast"`` (``multiple``/``live_multiple``: exactly one call that passes
    `bfcl.check_calls` against the possible answer), ``"irrelevance"`` (right iff no call,
    `bfcl.check_irrelevance`) or ``"relevance"`` (right iff a call with parsable arguments); by
    default ``"ast"`` when the case has a ground truth, else ``"irrelevance"``. Call names are
    mapped back to BFCL's (``math_hypot`` -> ``math.hypot``) with `bfcl.openai_name_map`. A failed
    request is wrong, with the answer kind ``fallback`` and error type ``request_error:<why>``.
    ``answer`` is one of `BFCL_ANSWER_KINDS`; ``valid`` is true exactly when it is
    ``correct_call`` (``no_call`` on an irrelevance case).
    """
    kind = kind or ("ast" if case.ground_truth is not None else "irrelevance")
    if kind not in ("ast", "irrelevance", "relevance"):
        raise ValueError(f"unknown BFCL case kind {kind!r}")
    names = bfcl.openai_name_map(case.functions)
    calls = [
        {"name": names.get(str(c.get("name")), c.get("name")), "arguments": c.get("arguments")}
        for c in answer.calls
    ]
    record: dict[str, Any] = {"id": case.id, "kind": kind}
    if answer.error is not None:
        verdict = bfcl.CallResult(False, answer.detail or answer.error, f"request_error:{answer.error}")
        outcome = "fallback"
    else:
        if kind == "ast":
            assert case.ground_truth is not None
            verdict = bfcl.check_calls(calls, case.functions, case.ground_truth)
            expected = {n for entry in case.ground_truth for n in entry}
        elif kind == "irrelevance":
            verdict = bfcl.check_irrelevance(calls)
            expected = set()
        else:
            expected = {str(f["name"]) for f in case.functions}
        if not calls:
            outcome = "no_call"
        elif not all(_parses(c["arguments"]) for c in calls):
            outcome = "unparsable"
        elif not all(str(c["name"]) in expected for c in calls):
            outcome = "wrong_function"
        elif len(calls) > 1 and kind == "ast":
            outcome = "multiple_calls"
        else:
            outcome = "correct_call" if kind == "relevance" or verdict.valid else "wrong_arguments"
        if kind == "relevance":  # BFCL's relevance rule: any call it can decode
            verdict = (
                bfcl.CallResult(True)
                if outcome == "correct_call"
                else bfcl.CallResult(False, f"expected a call, got {outcome}", f"relevance_error:{outcome}")
            )
    valid = verdict.valid
    if valid != (outcome == ("no_call" if kind == "irrelevance" else "correct_call")):
        raise AssertionError(f"{case.id}: verdict {verdict} disagrees with answer kind {outcome!r}")
    record.update(
        answer=outcome,
        valid=valid,
        error_type=verdict.error_type,
        error=verdict.error,
        calls=calls,
        content=answer.content,
        finish_reason=answer.finish_reason,
        request_error=answer.error,
        seconds=answer.seconds,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
    )
    return record


def bfcl_calls_row(
    records: Sequence[Mapping[str, Any]], *, dataset: str, eval_file: str, method: str, seconds: float = 0.0
) -> dict[str, Any]:
    """One result row of `score_bfcl_case` records: ``n``, ``correct``, ``accuracy`` (NaN when
    empty), ``<kind>_fraction`` for each of `BFCL_ANSWER_KINDS` (``fallback_fraction``: requests
    that failed or were refused), ``error:<BFCL error type>`` counts, mean prompt/completion
    tokens and request seconds, and the time ``seconds``."""
    n = len(records)
    correct = sum(1 for r in records if r["valid"])
    row = _row("bfcl_calls", dataset, eval_file, method, {"n": n})
    row["correct"] = correct
    row["accuracy"] = _ratio(correct, n)
    kinds = Counter(str(r["answer"]) for r in records)
    for kind in BFCL_ANSWER_KINDS:
        row[f"{kind}_fraction"] = _ratio(kinds.get(kind, 0), n)
    for error_type, count in sorted(Counter(str(r["error_type"]) for r in records if not r["valid"]).items()):
        row[f"error:{error_type}"] = count
    for what in ("prompt_tokens", "completion_tokens"):
        known = [float(r[what]) for r in records if r.get(what) is not None]
        row[f"mean_{what}"] = _mean(known)
    row["mean_request_seconds"] = _mean([float(r["seconds"]) for r in records])
    row.update(seconds=seconds, setup_seconds=0.0, fitted_on="")
    return row


def _ask_bfcl(
    api: Any,
    model: str,
    case: BfclCase,
    tool_choice: str,
    max_tokens: int,
    temperature: float,
) -> BfclAnswer:
    """Send one case's first-turn messages with its functions as ``tools``; failures are answers."""
    import openai

    t0 = time.perf_counter()
    try:
        resp = api.chat.completions.create(
            model=model,
            messages=case.messages,
            tools=bfcl.to_openai_tools(case.functions),
            tool_choice=tool_choice,
            parallel_tool_calls=False,
            max_tokens=max_tokens,
            temperature=temperature,
        )
    except openai.APITimeoutError as exc:
        return BfclAnswer(error="timeout", detail=str(exc), seconds=time.perf_counter() - t0)
    except openai.APIStatusError as exc:
        why = "context_length_exceeded" if is_context_length_error(exc) else f"http_{exc.status_code}"
        return BfclAnswer(error=why, detail=str(exc)[:500], seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    usage = getattr(resp, "usage", None)
    prompt_tokens = getattr(usage, "prompt_tokens", None)
    completion_tokens = getattr(usage, "completion_tokens", None)
    if not resp.choices:
        return BfclAnswer(error="no_choices", seconds=seconds)
    choice = resp.choices[0]
    message = choice.message
    refusal = getattr(message, "refusal", None)
    calls = [
        {"name": call.function.name, "arguments": call.function.arguments}
        for call in message.tool_calls or ()
        if getattr(call, "function", None) is not None
    ]
    return BfclAnswer(
        calls=[] if refusal else calls,
        content=message.content or "",
        finish_reason=choice.finish_reason,
        error="refusal" if refusal else None,
        detail=str(refusal or ""),
        seconds=seconds,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )


def _ask_all(
    api: Any,
    model: str,
    cases: list[BfclCase],
    tool_choice: str,
    max_tokens: int,
    temperature: float,
    concurrency: int,
    label: str,
    progress: Callable[[str, int, int], None] | None,
) -> list[BfclAnswer]:
    done = 0
    lock = threading.Lock()

    def one(case: BfclCase) -> BfclAnswer:
        nonlocal done
        answer = _ask_bfcl(api, model, case, tool_choice, max_tokens, temperature)
        with lock:
            done += 1
            if progress is not None:
                progress(label, done, len(cases))
        return answer

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, cases))


def _load_bfcl_cases(path: Path, kind: str) -> list[BfclCase]:
    answers = bfcl_answer_path(path) if kind == "ast" else None
    if kind == "ast" and answers is None:
        stem = re.sub(r"^BFCL_v\d+_", "", path.stem)
        raise DataFormatError(
            f"{path}: no answers file possible_answer_{stem}.jsonl next to it", file=str(path), line=None
        )
    try:
        cases = bfcl.load_bfcl_pairs(path, answers)
        for case in cases:
            bfcl.to_openai_tools(case.functions)  # names and types it can send
    except ValueError as exc:
        raise DataFormatError(str(exc), file=str(path), line=None) from exc
    return cases


def evaluate_bfcl_calls(
    data_dir: str | Path,
    *,
    base_url: str,
    api_key: str | None = None,
    model: str,
    files: Sequence[str] = BFCL_CALL_FILES,
    tool_choice: str = "auto",
    limit: int | None = None,
    seed: int = 0,
    concurrency: int = 8,
    max_tokens: int = 128,
    temperature: float = 0.0,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """BFCL's own metric: the model's function calls on BFCL files, checked by BFCL's AST rules
    (`sage_prefect.benchmark.bfcl`). Returns ``(rows, records)``: one row per file (`bfcl_calls_row`)
    and one `score_bfcl_case` record per case (with ``eval_file`` and ``method``).

    Each case's first-turn ``messages`` go to ``base_url``'s ``/chat/completions`` (any
    OpenAI-compatible endpoint: the control plane, vLLM, OpenAI) with ``model``,
    ``tools=bfcl.to_openai_tools(functions)``, ``tool_choice``, ``parallel_tool_calls=False``,
    ``max_tokens`` and ``temperature``, ``concurrency`` requests at a time; the reply's
    ``message.tool_calls`` are scored (its text is kept in the record, never parsed). ``files``
    are stems of ``BFCL_v*_<stem>.jsonl`` in ``data_dir``: ``multiple``/``live_multiple`` need
    their ``possible_answer_<stem>.jsonl`` (AST check), ``*irrelevance`` files are right iff no
    call, a ``*relevance`` file iff a call. ``tool_choice="required"`` measures argument filling
    when a call is known to be needed: irrelevance files are skipped in that mode. A request the
    endpoint refuses (400 ``context_length_exceeded`` for a prompt longer than the model takes,
    any other HTTP error after the SDK's retries, a timeout, a refusal) is counted as wrong and in
    ``fallback_fraction``; only an endpoint that cannot be reached at all raises.

    ``limit`` scores a fixed-seed random subset of each file (``..jsonl[random 40 of 737, seed
    0]``); ``progress(eval_file, done, total)`` is called after each answer. Rows: task
    ``bfcl_calls``, method ``llm-<tool_choice>``, plus the string fields ``model`` and
    ``tool_choice``.
    """
    from sage_prefect.tasks.client import EndpointConfig, client

    if tool_choice not in BFCL_TOOL_CHOICES:
        raise ValueError(f"tool_choice must be one of {BFCL_TOOL_CHOICES}, got {tool_choice!r}")
    if concurrency < 1 or max_tokens < 1:
        raise ValueError(f"concurrency and max_tokens must be >= 1, got {concurrency} and {max_tokens}")
    folder = _folder(data_dir, "BFCL data")
    api = client(EndpointConfig(base_url=base_url, api_key=api_key), "evaluate_bfcl_calls")
    method = f"llm-{tool_choice}"
    rows: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    for path in _bfcl_files(folder, files):
        kind = _bfcl_kind(re.sub(r"^BFCL_v\d+_", "", path.stem))
        if kind == "irrelevance" and tool_choice == "required":
            log.info("bfcl_calls: %s skipped: tool_choice 'required' forces a call", path.name)
            continue
        cases, note = _subsample(_load_bfcl_cases(path, kind), limit, seed)
        label = path.name + (f"[{note}]" if note else "")
        t0 = time.perf_counter()
        answers = _ask_all(
            api, model, cases, tool_choice, max_tokens, temperature, concurrency, label, progress
        )
        seconds = time.perf_counter() - t0
        file_records = [
            {"eval_file": label, "method": method, **score_bfcl_case(case, answer, kind)}
            for case, answer in zip(cases, answers, strict=True)
        ]
        row = bfcl_calls_row(
            file_records, dataset=folder.name, eval_file=label, method=method, seconds=seconds
        )
        row.update(model=model, tool_choice=tool_choice)
        rows.append(row)
        records += file_records
    return rows, records
