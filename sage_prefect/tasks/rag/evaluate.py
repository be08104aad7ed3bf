"""RAG evaluation: answer metrics, retrieval metrics and a latency summary.

Pure functions (`exact_match`, `token_f1`, `recall_at_k`, `mrr`, `latency_summary`) and the
operators that add one metric column per record (`ExactMatch`, `TokenF1`, `RecallAtK`, `MRR`)
from gold fields: ``answers`` (list of acceptable answer strings) and ``relevant_ids`` (chunk
ids, or doc ids with ``level="doc"``). `LatencySummary` turns the ``latency_*`` columns of a
result table into p50/p90/p99/mean figures.

>>> ExactMatch().run([{"answer": "The Eiffel Tower.", "answers": ["eiffel tower"]}])[0]["exact_match"]
1.0
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from sage_prefect.common.errors import RecordError
from sage_prefect.common.functions import MapFunction, Record
from sage_prefect.common.records import with_columns
from sage_prefect.tasks.base import Operator, OperatorConfig

__all__ = [
    "MRR",
    "AnswerContains",
    "ExactMatch",
    "LatencySummary",
    "RecallAtK",
    "TokenF1",
    "exact_match",
    "latency_summary",
    "mrr",
    "normalize_answer",
    "percentile",
    "recall_at_k",
    "to_doc_id",
    "token_f1",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)
_DOC_SUFFIX = re.compile(r"#\d+$")


# -- pure functions ------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces.

    >>> normalize_answer("  The  Eiffel-Tower, in Paris! ")
    'eiffeltower in paris'
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _golds(answers: str | Iterable[str]) -> list[str]:
    return [answers] if isinstance(answers, str) else [str(a) for a in answers]


def exact_match(prediction: str, answers: str | Iterable[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer, else 0.0.

    >>> exact_match("the Beatles!", ["Beatles", "The Rolling Stones"])
    1.0
    >>> exact_match("Beatles band", "Beatles")
    0.0
    >>> exact_match("anything", [])
    0.0
    """
    guess = normalize_answer(prediction)
    return 1.0 if any(guess == normalize_answer(gold) for gold in _golds(answers)) else 0.0


def answer_contains(prediction: str, answers: str | Iterable[str]) -> float:
    """1.0 when a normalised gold answer appears, as whole words, inside the normalised
    prediction (open-domain QA's "has answer"; fair to a model that answers in a sentence).

    >>> answer_contains("The work pool is called sage-process.", ["sage-process"])
    1.0
    >>> answer_contains("It runs at 2 am.", ["nightly at 02:00"])
    0.0
    """
    guess = f" {normalize_answer(prediction)} "
    return 1.0 if any(f" {g} " in guess for g in map(normalize_answer, _golds(answers)) if g) else 0.0


def _f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return 1.0 if pred_tokens == gold_tokens else 0.0
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: str | Iterable[str]) -> float:
    """SQuAD token F1 of the prediction against the best-matching gold answer (bag of
    normalised tokens; two empty answers score 1.0, one empty answer 0.0).

    >>> token_f1("the cat sat on the mat", ["a cat sat"])  # p = 2/4, r = 2/2
    0.6666666666666666
    >>> token_f1("cat sat down", ["the cat sat on a mat"])  # p = 2/3, r = 2/4
    0.5714285714285715
    >>> token_f1("dog", ["cat", "dog house"])
    0.6666666666666666
    >>> token_f1("", [""])
    1.0
    """
    return max((_f1(prediction, gold) for gold in _golds(answers)), default=0.0)


def to_doc_id(chunk_id: str) -> str:
    """The document id of a chunk id (``"{doc_id}#{chunk_index}"``); other ids are returned as is.

    >>> to_doc_id("guide/intro.md#3"), to_doc_id("guide/intro.md")
    ('guide/intro.md', 'guide/intro.md')
    """
    return _DOC_SUFFIX.sub("", chunk_id)


def _ranked(retrieved_ids: Iterable[str], level: str) -> list[str]:
    """Ids in rank order at ``level``; at doc level a document counts at its first chunk's rank."""
    if level == "chunk":
        return list(retrieved_ids)
    seen: list[str] = []
    for rid in retrieved_ids:
        doc = to_doc_id(rid)
        if doc not in seen:
            seen.append(doc)
    return seen


def _relevant(relevant_ids: Iterable[str], level: str) -> set[str]:
    return {to_doc_id(r) if level == "doc" else r for r in relevant_ids}


def recall_at_k(
    retrieved_ids: Sequence[str],
    relevant_ids: Iterable[str],
    k: int,
    level: Literal["chunk", "doc"] = "chunk",
) -> float:
    """Share of the relevant ids found among the first ``k`` retrieved (0.0 when none is relevant).

    At ``level="doc"`` both sides are reduced to document ids (the ``#n`` suffix stripped) and
    ``k`` counts retrieved *chunks*: the documents of the first ``k`` chunks.

    >>> recall_at_k(["a#0", "b#1", "c#0"], ["b#1", "d#0"], k=2)
    0.5
    >>> recall_at_k(["a#0", "a#1", "b#0"], ["a", "b"], k=2, level="doc")
    0.5
    >>> recall_at_k(["a#0"], [], k=1)
    0.0
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    relevant = _relevant(relevant_ids, level)
    if not relevant:
        return 0.0
    found = set(_ranked(list(retrieved_ids)[:k], level)) & relevant
    return len(found) / len(relevant)


def mrr(
    retrieved_ids: Sequence[str],
    relevant_ids: Iterable[str],
    k: int | None = None,
    level: Literal["chunk", "doc"] = "chunk",
) -> float:
    """Reciprocal rank of the first relevant id (within the first ``k`` retrieved), 0.0 if none.

    At ``level="doc"`` the rank is that of the distinct document (its first chunk's position
    among distinct documents).

    >>> mrr(["a#0", "b#0", "c#0"], ["c#0", "b#0"])
    0.5
    >>> mrr(["a#0", "a#1", "b#0"], ["b"], level="doc")
    0.5
    >>> mrr(["a#0", "b#0"], ["b#0"], k=1)
    0.0
    """
    if k is not None and k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    relevant = _relevant(relevant_ids, level)
    head = list(retrieved_ids) if k is None else list(retrieved_ids)[:k]
    for rank, rid in enumerate(_ranked(head, level), start=1):
        if rid in relevant:
            return 1.0 / rank
    return 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks (numpy's
    default method); NaN for no values.

    >>> percentile([1, 2, 3, 4], 50), percentile([1, 2, 3, 4], 90), percentile([5], 99)
    (2.5, 3.7, 5.0)
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be between 0 and 100, got {q}")
    ordered = sorted(float(v) for v in values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _latency_columns(data: Any, fields: Sequence[str] | None, prefix: str) -> dict[str, list[float]]:
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if isinstance(data, pa.Table):
        names = list(fields) if fields is not None else [n for n in data.column_names if n.startswith(prefix)]
        missing = [n for n in names if n not in data.column_names]
        if missing:
            raise RecordError(f"latency_summary: the table has no column {missing[0]!r}", field=missing[0])
        columns = {n: data.column(n).to_pylist() for n in names}
    else:
        rows: list[Mapping[str, Any]] = list(data)
        names = (
            list(fields)
            if fields is not None
            else sorted({k for r in rows for k in r if isinstance(k, str) and k.startswith(prefix)})
        )
        columns = {n: [r.get(n) for r in rows] for n in names}
    out: dict[str, list[float]] = {}
    for name, values in columns.items():
        kept = []
        for v in values:
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise RecordError(
                    f"latency_summary: column {name!r} holds {type(v).__name__} {v!r}, expected numbers",
                    field=name,
                )
            if not math.isnan(v):
                kept.append(float(v))
        out[name] = kept
    return out


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "count": float(len(values)),
        "mean": sum(values) / len(values) if values else math.nan,
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else math.nan,
    }


def latency_summary(
    data: pa.Table | Iterable[Mapping[str, Any]],
    fields: Sequence[str] | None = None,
    prefix: str = "latency_",
) -> dict[str, dict[str, float]]:
    """``{column: {count, mean, p50, p90, p99, max}}`` for each ``latency_*`` column (or ``fields``)
    of a table or of dict rows; nulls and NaNs are skipped, a column without values gives NaNs.

    >>> s = latency_summary([{"latency_generate_ms": v} for v in (10.0, 20.0, 30.0, 40.0)])
    >>> s["latency_generate_ms"]["p50"], s["latency_generate_ms"]["mean"]
    (25.0, 25.0)
    """
    return {name: _summary(values) for name, values in _latency_columns(data, fields, prefix).items()}


class LatencySummary:
    """Accumulates latency columns over partitions and summarises them like `latency_summary`.

    >>> summary = LatencySummary()
    >>> summary.add([{"latency_rerank_ms": 1.0}]).add([{"latency_rerank_ms": 3.0}]).result()["latency_rerank_ms"]["p50"]
    2.0
    >>> LatencySummary()(pa.table({"latency_x_ms": [1.0, 2.0, 3.0], "other": [0, 0, 0]}))["latency_x_ms"]["max"]
    3.0
    """

    def __init__(self, fields: Sequence[str] | None = None, prefix: str = "latency_") -> None:
        self.fields = list(fields) if fields is not None else None
        self.prefix = prefix
        self._values: dict[str, list[float]] = {}

    def add(self, data: pa.Table | Iterable[Mapping[str, Any]]) -> LatencySummary:
        """Add one table or list of rows; returns ``self`` for chaining."""
        for name, values in _latency_columns(data, self.fields, self.prefix).items():
            self._values.setdefault(name, []).extend(values)
        return self

    def result(self) -> dict[str, dict[str, float]]:
        """The summary of everything added so far."""
        return {name: _summary(values) for name, values in self._values.items()}

    def __call__(self, data: pa.Table | Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
        """Summarise ``data`` alone (nothing accumulated)."""
        return latency_summary(data, self.fields, self.prefix)


# -- operators -----------------------------------------------------------------------------------


class _MetricConfig(OperatorConfig):
    output_field: str


class _MetricOperator(Operator, MapFunction):
    """Adds ``output_field`` (float64) computed per record by ``_metric``."""

    Config = _MetricConfig
    cfg: _MetricConfig

    def _metric(self, record: Record, index: int | None) -> float:
        raise NotImplementedError

    def _field(self, record: Record, field: str, index: int | None, role: str) -> Any:
        value = record.get(field)
        if value is None:
            where = f"record {index}" if index is not None else "record"
            raise RecordError(
                f"{self.name}: {where} has no value in field {field!r} ({role})",
                operator=self.name,
                record_index=index,
                field=field,
            )
        return value

    def _strings(self, record: Record, field: str, index: int | None, role: str) -> list[str]:
        value = self._field(record, field, index, role)
        if isinstance(value, str):
            return [value]
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return list(value)
        where = f"record {index}" if index is not None else "record"
        raise RecordError(
            f"{self.name}: {where}: field {field!r} ({role}) must be a list of strings, got {value!r}",
            operator=self.name,
            record_index=index,
            field=field,
        )

    def execute(self, data: Record) -> Record:
        return {**data, self.cfg.output_field: self._metric(data, None)}

    def execute_batch(self, table: pa.Table) -> pa.Table:
        values = [self._metric(r, i) for i, r in enumerate(table.to_pylist())]
        name = self.cfg.output_field
        return with_columns(table, {name: pa.array(values, type=pa.float64())})


class ExactMatch(_MetricOperator):
    """Adds ``exact_match``: 1.0 when ``answer`` equals one of the gold ``answers`` after SQuAD
    normalisation (`exact_match`), else 0.0."""

    class Config(_MetricConfig):
        prediction_field: str = "answer"
        answers_field: str = "answers"
        output_field: str = "exact_match"

    cfg: Config

    def _metric(self, record: Record, index: int | None) -> float:
        cfg = self.cfg
        prediction = self._strings(record, cfg.prediction_field, index, "predicted answer")[0]
        return exact_match(prediction, self._strings(record, cfg.answers_field, index, "gold answers"))


class AnswerContains(_MetricOperator):
    """Adds ``answer_contains``: 1.0 when a gold answer appears inside ``answer`` after SQuAD
    normalisation (`answer_contains`), else 0.0."""

    class Config(_MetricConfig):
        prediction_field: str = "answer"
        answers_field: str = "answers"
        output_field: str = "answer_contains"

    cfg: Config

    def _metric(self, record: Record, index: int | None) -> float:
        cfg = self.cfg
        prediction = self._strings(record, cfg.prediction_field, index, "predicted answer")[0]
        return answer_contains(prediction, self._strings(record, cfg.answers_field, index, "gold answers"))


class TokenF1(_MetricOperator):
    """Adds ``token_f1``: SQuAD token F1 of ``answer`` against the best gold answer (`token_f1`)."""

    class Config(_MetricConfig):
        prediction_field: str = "answer"
        answers_field: str = "answers"
        output_field: str = "token_f1"

    cfg: Config

    def _metric(self, record: Record, index: int | None) -> float:
        cfg = self.cfg
        prediction = self._strings(record, cfg.prediction_field, index, "predicted answer")[0]
        return token_f1(prediction, self._strings(record, cfg.answers_field, index, "gold answers"))


class RecallAtK(_MetricOperator):
    """Adds ``recall_at_k``: share of the gold ``relevant_ids`` among the first ``k`` of
    ``retrieved_ids`` (`recall_at_k`); ``level="doc"`` compares document ids (``#n`` stripped)."""

    class Config(_MetricConfig):
        k: int = Field(5, ge=1)
        level: Literal["chunk", "doc"] = "chunk"
        retrieved_field: str = "retrieved_ids"
        relevant_field: str = "relevant_ids"
        output_field: str = "recall_at_k"

    cfg: Config

    def _metric(self, record: Record, index: int | None) -> float:
        cfg = self.cfg
        retrieved = self._strings(record, cfg.retrieved_field, index, "retrieved ids")
        relevant = self._strings(record, cfg.relevant_field, index, "gold relevant ids")
        return recall_at_k(retrieved, relevant, cfg.k, cfg.level)


class MRR(_MetricOperator):
    """Adds ``mrr``: reciprocal rank of the first gold relevant id in ``retrieved_ids`` (`mrr`),
    within the first ``k`` when ``k`` is set; ``level="doc"`` compares document ids."""

    class Config(_MetricConfig):
        k: int | None = Field(None, ge=1)
        level: Literal["chunk", "doc"] = "chunk"
        retrieved_field: str = "retrieved_ids"
        relevant_field: str = "relevant_ids"
        output_field: str = "mrr"

    cfg: Config

    def _metric(self, record: Record, index: int | None) -> float:
        cfg = self.cfg
        retrieved = self._strings(record, cfg.retrieved_field, index, "retrieved ids")
        relevant = self._strings(record, cfg.relevant_field, index, "gold relevant ids")
        return mrr(retrieved, relevant, cfg.k, cfg.level)
