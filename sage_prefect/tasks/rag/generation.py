"""The answer half of RAG: rerank retrieved chunks, build the prompt, generate the answer.

* `Reranker` reorders a record's ``retrieved`` chunks for its question with a cross-encoder
  (``sentence_transformers.CrossEncoder`` from a local model directory) or, without a model,
  with a score-based fallback that fuses the retrieval rank with a BM25 lexical overlap.
* `QAPromptor` renders chat ``messages`` from a Jinja2 template (sandboxed, strict
  undefined) with the numbered context chunks and records which chunk ids it cited.
* `Generator` sends the messages to the control plane's ``/v1/chat/completions`` with the
  ``openai`` SDK, several requests in flight per partition, and adds the answer, token counts
  and per-request latency.

Each works on whole partitions (``execute_batch``) and on single records (``execute``).

>>> p = QAPromptor({"template": "Q: {{ query }} [{{ contexts | length }} chunks]", "system": None})
>>> row = p.run({"question": "why?", "retrieved": [{"chunk_id": "a#0", "doc_id": "a", "text": "t", "score": 1.0}]})
>>> row["messages"], row["cited_ids"]
([{'role': 'user', 'content': 'Q: why? [1 chunks]'}], ['a#0'])
"""

from __future__ import annotations

import math
import re
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
from pydantic import Field

from sage_prefect.common.errors import ConfigError, OperatorError, RecordError
from sage_prefect.common.functions import MapFunction, Record
from sage_prefect.common.records import with_columns
from sage_prefect.common.settings import load_settings
from sage_prefect.tasks.base import Operator, OperatorConfig
from sage_prefect.tasks.client import EndpointConfig, client

if TYPE_CHECKING:
    from jinja2 import Template
    from openai import OpenAI

__all__ = [
    "DEFAULT_QA_SYSTEM",
    "DEFAULT_QA_TEMPLATE",
    "Generator",
    "QAPromptor",
    "Reranker",
    "bm25_scores",
    "fuse_scores",
]


# -- helpers shared by the operators -------------------------------------------------------------


def _column(table: pa.Table, field: str, operator: str, role: str) -> list[Any]:
    if field not in table.column_names:
        raise RecordError(
            f"{operator}: records have no field {field!r} ({role}; config key sets it); "
            f"fields: {', '.join(table.column_names) or 'none'}",
            operator=operator,
            field=field,
        )
    return table.column(field).to_pylist()


def _missing(operator: str, index: int | None, field: str, role: str) -> RecordError:
    where = f"record {index}" if index is not None else "record"
    return RecordError(
        f"{operator}: {where} has no value in field {field!r} ({role})",
        operator=operator,
        record_index=index,
        field=field,
    )


def _one_row(record: Record) -> pa.Table:
    from sage_prefect.common.records import records_to_table

    return records_to_table([record], "record")


# -- Reranker ------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\w+", re.UNICODE)
_STOPWORDS = frozenset(
    {
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "do",
        "does",
        "did",
        "for",
        "from",
        "has",
        "have",
        "how",
        "i",
        "in",
        "is",
        "it",
        "its",
        "of",
        "on",
        "or",
        "that",
        "the",
        "their",
        "there",
        "these",
        "this",
        "to",
        "was",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "you",
    }
)


def _terms(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t not in _STOPWORDS]


def bm25_scores(query: str, texts: Sequence[str], k1: float = 1.2, b: float = 0.75) -> list[float]:
    """Okapi BM25 of ``query`` against each of ``texts``, with document statistics taken from
    ``texts`` themselves (the candidate set); lower-cased word tokens, common English stop words
    dropped, ``idf = ln(1 + (N - df + 0.5) / (df + 0.5))`` (never negative).

    >>> s = bm25_scores("lance vector index", ["the lance index", "a cat sat", "vector search"])
    >>> s[0] > s[2] > s[1] == 0.0
    True
    """
    docs = [_terms(t) for t in texts]
    if not docs:
        return []
    n = len(docs)
    avg = sum(len(d) for d in docs) / n or 1.0
    df: Counter[str] = Counter()
    for d in docs:
        df.update(set(d))
    query_terms = set(_terms(query))
    scores = []
    for d in docs:
        tf = Counter(d)
        score = 0.0
        for term in query_terms:
            f = tf.get(term, 0)
            if not f:
                continue
            idf = math.log(1.0 + (n - df[term] + 0.5) / (df[term] + 0.5))
            score += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len(d) / avg))
        scores.append(score)
    return scores


def fuse_scores(query: str, texts: Sequence[str], lexical_weight: float = 0.5) -> list[float]:
    """The score-based rerank: ``(1 - w) * rank_prior + w * bm25 / max(bm25)``.

    ``rank_prior`` is ``1 - i / n`` for the chunk at retrieval position ``i`` of ``n`` (the
    retriever's order, best first, whatever its score scale: distance or similarity), and the
    BM25 part is normalised to [0, 1] within the candidates. With ``w >= 0.5`` the chunk with
    the strongest lexical match beats every chunk that shares no query term with the question.

    >>> [round(s, 3) for s in fuse_scores("lance index", ["cats", "dogs", "the lance index"])]
    [0.5, 0.333, 0.667]
    """
    n = len(texts)
    lexical = bm25_scores(query, texts)
    top = max(lexical, default=0.0)
    return [
        (1.0 - lexical_weight) * (1.0 - i / n) + lexical_weight * (lexical[i] / top if top > 0 else 0.0)
        for i in range(n)
    ]


class Reranker(Operator, MapFunction):
    """Reorder each record's ``retrieved`` chunks for its question and keep the best ``top_k``.

    ``method``: ``"cross-encoder"`` scores every (question, chunk text) pair with
    ``sentence_transformers.CrossEncoder`` loaded offline from ``model`` (a local directory);
    all pairs of a partition go to one ``predict`` call. ``"score"`` needs no model: it fuses
    the retrieval order with a BM25 lexical overlap between question and chunk (`fuse_scores`).
    ``"auto"`` (default) is the cross-encoder when ``model`` is set, else ``"score"``.

    Each kept chunk's ``score`` becomes the reranker's score (cross-encoder output or fused
    score); ``retrieved_ids`` is rewritten to match; ``latency_rerank_ms`` is the wall time of
    the rerank of the record's partition (the time the record waited for its new order).
    Ties keep the retrieval order.
    """

    class Config(OperatorConfig):
        method: Literal["auto", "cross-encoder", "score"] = Field(
            "auto", description="'cross-encoder', 'score' (lexical fusion) or 'auto' (cross-encoder if model)"
        )
        model: str | None = Field(None, description="Local CrossEncoder model directory")
        top_k: int | None = Field(None, ge=1, description="Chunks kept per record; None keeps all")
        query_field: str = "question"
        retrieved_field: str = "retrieved"
        ids_field: str = "retrieved_ids"
        latency_field: str = "latency_rerank_ms"
        batch_size: int = Field(32, ge=1, description="CrossEncoder.predict batch size")
        max_length: int | None = Field(None, ge=1, description="Token limit of a (query, chunk) pair")
        device: str | None = Field(None, description="torch device; default: CUDA when available")
        lexical_weight: float = Field(0.5, ge=0.0, le=1.0, description="BM25 weight of the 'score' method")

    cfg: Config

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if self.cfg.method == "cross-encoder" and not self.cfg.model:
            raise ConfigError(
                f"{self.name}: method 'cross-encoder' needs config key 'model' (a local model directory)",
                operator=self.name,
                field="model",
            )
        self._uses_model = self.cfg.method == "cross-encoder" or (
            self.cfg.method == "auto" and self.cfg.model is not None
        )

    def _runtime_attributes(self) -> tuple[str, ...]:
        return ("_model",)

    def setup(self) -> None:
        self._model: Any = None
        if not self._uses_model:
            return
        assert self.cfg.model is not None
        path = Path(self.cfg.model).expanduser()
        if not path.is_dir():
            raise ConfigError(
                f"{self.name}: config key 'model': {str(path)!r} is not a local model directory",
                operator=self.name,
                field="model",
            )
        from sentence_transformers import CrossEncoder

        try:
            self._model = CrossEncoder(
                str(path), local_files_only=True, device=self.cfg.device, max_length=self.cfg.max_length
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{self.name}: cannot load the cross-encoder from {str(path)!r}: {exc}",
                operator=self.name,
                field="model",
            ) from exc

    def execute(self, data: Record) -> Record:
        return self.execute_batch(_one_row(data)).to_pylist()[0]

    def execute_batch(self, table: pa.Table) -> pa.Table:
        self.ensure_setup()
        cfg = self.cfg
        started = time.perf_counter()
        retrieved_col = _column(table, cfg.retrieved_field, self.name, "retrieved chunks")
        queries = _column(table, cfg.query_field, self.name, "question")
        candidates: list[list[dict[str, Any]]] = []
        for i, (query, chunks) in enumerate(zip(queries, retrieved_col, strict=True)):
            if not isinstance(query, str):
                raise _missing(self.name, i, cfg.query_field, "question")
            candidates.append(list(chunks or []))
        scores = self._score(queries, candidates)
        reordered: list[list[dict[str, Any]]] = []
        for chunks, chunk_scores in zip(candidates, scores, strict=True):
            order = sorted(range(len(chunks)), key=lambda j: (-chunk_scores[j], j))
            if cfg.top_k is not None:
                order = order[: cfg.top_k]
            reordered.append([{**chunks[j], "score": float(chunk_scores[j])} for j in order])
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        retrieved_type = table.schema.field(cfg.retrieved_field).type
        if pa.types.is_null(retrieved_type):  # every record had an empty or missing list
            retrieved_type = pa.list_(
                pa.struct(
                    [
                        ("chunk_id", pa.string()),
                        ("doc_id", pa.string()),
                        ("text", pa.string()),
                        ("score", pa.float64()),
                    ]
                )
            )
        ids = [[c.get("chunk_id") for c in chunks] for chunks in reordered]
        return with_columns(
            table,
            {
                cfg.retrieved_field: pa.array(reordered, type=retrieved_type),
                cfg.ids_field: pa.array(ids, type=pa.list_(pa.string())),
                cfg.latency_field: pa.array([elapsed_ms] * table.num_rows, type=pa.float64()),
            },
        )

    def _score(self, queries: list[str], candidates: list[list[dict[str, Any]]]) -> list[list[float]]:
        texts = [[str(c.get("text") or "") for c in chunks] for chunks in candidates]
        if self._model is None:
            return [fuse_scores(q, t, self.cfg.lexical_weight) for q, t in zip(queries, texts, strict=True)]
        pairs = [(q, text) for q, chunk_texts in zip(queries, texts, strict=True) for text in chunk_texts]
        if not pairs:
            return [[] for _ in candidates]
        predicted = self._model.predict(pairs, batch_size=self.cfg.batch_size, show_progress_bar=False)
        if getattr(predicted, "ndim", 1) != 1:
            raise ConfigError(
                f"{self.name}: the cross-encoder at {self.cfg.model!r} gives {predicted.shape[-1]} scores per "
                "pair; a reranker needs a model with one output (num_labels=1)",
                operator=self.name,
                field="model",
            )
        flat = [float(s) for s in predicted]
        out: list[list[float]] = []
        start = 0
        for chunk_texts in texts:
            out.append(flat[start : start + len(chunk_texts)])
            start += len(chunk_texts)
        return out


# -- QAPromptor ----------------------------------------------------------------------------------

# The default prompt suits small models (SmolLM2-135M, the embedded default): the passages' text
# and the question, nothing else to follow. Measured on the shipped questions (docs/benchmarks.md)
# it beats the citing prompt below, whose ids and instructions a 135M model copies into its answer.
# ``cited_ids`` lists the passages included either way.
DEFAULT_QA_SYSTEM = "Answer the question with a short phrase taken from the context."

DEFAULT_QA_TEMPLATE = """\
Context:
{% for c in contexts %}{{ c.text }}

{% else %}(no context passages)

{% endfor %}Question: {{ query }}"""

# For larger models (a vLLM server): numbered passages, answers that cite their ids.
CITING_QA_SYSTEM = (
    "You answer questions using only the context passages you are given. "
    "Cite the passages you rely on by their ids in square brackets."
)

CITING_QA_TEMPLATE = """\
Answer the question using only the numbered context passages below. After each statement, cite \
the passages it comes from by their ids in square brackets, for example [{{ contexts[0].chunk_id \
if contexts else 'doc.md#0' }}]. If the passages do not contain the answer, say that you do not know.

Context:
{% for c in contexts %}[{{ c.n }}] (id: {{ c.chunk_id }}) {{ c.text }}
{% else %}(no context passages)
{% endfor %}
Question: {{ query }}
Answer:"""

_INLINE = "<template>"


class QAPromptor(Operator, MapFunction):
    """Render chat ``messages`` for each record from a Jinja2 template and the retrieved chunks.

    The template (``template`` inline, or ``template_path`` a file; default
    `DEFAULT_QA_TEMPLATE`) runs in Jinja2's sandbox with ``StrictUndefined`` and sees:
    every field of the record, ``record`` (the whole record), ``query`` (the value of
    ``query_field``) and ``contexts``: the chunks that fit, best first, each a dict with
    ``n`` (1-based number), ``chunk_id``, ``doc_id``, ``text``, ``score`` and any other field
    the chunk carries.

    Chunks are taken in order while their texts fit in ``max_context_chars`` (and at most
    ``max_chunks``); the first that does not fit ends the context, except that a first chunk
    longer than the whole budget is cut to it. ``cited_ids`` lists the chunk ids included.

    ``messages`` is ``[{"role": "system", ...}, {"role": "user", "content": <rendered>}]``
    (no system message when ``system`` is None). A template syntax error is a `ConfigError`
    at construction; an error while rendering (an undefined variable, a missing field, a
    sandbox violation) is a `RecordError` naming the operator, the template (file and line)
    and the record index.
    """

    class Config(OperatorConfig):
        template: str | None = Field(None, description="Inline Jinja2 template of the user message")
        template_path: str | None = Field(None, description="File holding the Jinja2 template")
        system: str | None = Field(DEFAULT_QA_SYSTEM, description="System message; None sends none")
        query_field: str = "question"
        contexts_field: str | None = Field("retrieved", description="Chunks field; None: no context")
        max_context_chars: int = Field(4000, ge=1, description="Budget of context text in characters")
        max_chunks: int | None = Field(None, ge=1, description="At most this many chunks")
        messages_field: str = "messages"
        cited_field: str = "cited_ids"

    cfg: Config

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        cfg = self.cfg
        if cfg.template is not None and cfg.template_path is not None:
            raise ConfigError(
                f"{self.name}: set config key 'template' or 'template_path', not both",
                operator=self.name,
                field="template_path",
            )
        if cfg.template_path is not None:
            path = Path(cfg.template_path).expanduser().resolve()
            try:
                self._source = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(
                    f"{self.name}: config key 'template_path': cannot read {str(path)!r}: {exc.strerror or exc}",
                    operator=self.name,
                    field="template_path",
                ) from None
            self._template_name = str(path)
        else:
            self._source = cfg.template if cfg.template is not None else DEFAULT_QA_TEMPLATE
            self._template_name = _INLINE
        self._compile()  # syntax errors surface where the pipeline is declared

    def _describe(self, line: int | None = None) -> str:
        name = "inline template" if self._template_name == _INLINE else f"template {self._template_name}"
        return f"{name}, line {line}" if line is not None else name

    def _compile(self) -> Template:
        from jinja2 import StrictUndefined, TemplateSyntaxError
        from jinja2.sandbox import SandboxedEnvironment

        env = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)
        field = "template_path" if self._template_name != _INLINE else "template"
        try:
            code = env.compile(self._source, name=self._template_name, filename=self._template_name)
        except TemplateSyntaxError as exc:
            raise ConfigError(
                f"{self.name}: {self._describe(exc.lineno)}: syntax error: {exc.message}",
                operator=self.name,
                field=field,
                file=self._template_name,
                line=exc.lineno,
            ) from None
        return env.template_class.from_code(env, code, env.make_globals(None))

    def _runtime_attributes(self) -> tuple[str, ...]:
        return ("_template",)

    def setup(self) -> None:
        self._template = self._compile()

    def execute(self, data: Record) -> Record:
        return self.execute_batch(_one_row(data)).to_pylist()[0]

    def execute_batch(self, table: pa.Table) -> pa.Table:
        self.ensure_setup()
        cfg = self.cfg
        records = table.to_pylist()
        messages: list[list[dict[str, str]]] = []
        cited: list[list[str]] = []
        for i, record in enumerate(records):
            m, c = self._prompt(record, i)
            messages.append(m)
            cited.append(c)
        message_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
        return with_columns(
            table,
            {
                cfg.messages_field: pa.array(messages, type=message_type),
                cfg.cited_field: pa.array(cited, type=pa.list_(pa.string())),
            },
        )

    def _contexts(self, record: Record, index: int) -> list[dict[str, Any]]:
        cfg = self.cfg
        if cfg.contexts_field is None:
            return []
        if cfg.contexts_field not in record:
            raise RecordError(
                f"{self.name}: record {index} has no field {cfg.contexts_field!r} (context chunks; "
                f"{self._describe()}); set config key 'contexts_field' (None for no context)",
                operator=self.name,
                record_index=index,
                field=cfg.contexts_field,
            )
        chunks = record[cfg.contexts_field] or []
        contexts: list[dict[str, Any]] = []
        used = 0
        for chunk in chunks:
            if cfg.max_chunks is not None and len(contexts) >= cfg.max_chunks:
                break
            text = str(chunk.get("text") or "")
            if used + len(text) > cfg.max_context_chars:
                if contexts:
                    break
                text = text[: cfg.max_context_chars]
            used += len(text)
            contexts.append({**chunk, "text": text, "n": len(contexts) + 1})
        return contexts

    def _prompt(self, record: Record, index: int) -> tuple[list[dict[str, str]], list[str]]:
        from jinja2 import TemplateError

        cfg = self.cfg
        query = record.get(cfg.query_field)
        if query is None:
            raise RecordError(
                f"{self.name}: record {index} has no value in field {cfg.query_field!r} "
                f"(the question; {self._describe()})",
                operator=self.name,
                record_index=index,
                field=cfg.query_field,
                template=self._template_name,
            )
        contexts = self._contexts(record, index)
        variables = {**record, "record": record, "query": query, "contexts": contexts}
        try:
            content = self._template.render(variables)
        except TemplateError as exc:
            line = self._error_line(exc)
            raise RecordError(
                f"{self.name}: {self._describe(line)}: record {index}: {type(exc).__name__}: {exc}",
                operator=self.name,
                record_index=index,
                template=self._template_name,
                line=line,
            ) from None
        messages = [{"role": "system", "content": cfg.system}] if cfg.system is not None else []
        messages.append({"role": "user", "content": content})
        return messages, [str(c.get("chunk_id")) for c in contexts]

    def _error_line(self, exc: BaseException) -> int | None:
        lines = [
            f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == self._template_name
        ]
        return lines[-1] if lines else None


# -- Generator -----------------------------------------------------------------------------------


class Generator(Operator, MapFunction):
    """Generate an answer per record with the control plane's chat completions (``openai`` SDK).

    Reads chat messages from ``messages_field`` (a list of ``{role, content}``), or a plain
    string from ``prompt_field`` (sent as one user message; it wins when set). ``model``
    defaults to settings' ``llm_model``. ``slo_class`` and ``priority`` go to the gateway as
    the ``x-slo-class`` / ``x-priority`` headers. Up to ``concurrency`` requests per partition
    are in flight at once (threads over the process's shared client); results keep the input
    order.

    Adds ``answer`` (``output_field``), ``prompt_tokens``, ``completion_tokens`` and
    ``latency_generate_ms`` (each request's own wall time). A failed request raises
    `OperatorError` naming the operator, the row and the server's message (``.status``,
    ``.record_index``); the requests not yet sent are cancelled.
    """

    class Config(EndpointConfig):
        model: str | None = Field(None, description="Chat model; default settings.llm_model")
        messages_field: str = "messages"
        prompt_field: str | None = Field(None, description="Plain-string prompt field (instead of messages)")
        max_tokens: int = Field(128, ge=1)
        temperature: float = Field(0.0, ge=0.0, le=2.0)
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        seed: int | None = None
        stop: str | list[str] | None = None
        priority: int | None = Field(None, description="Sent as x-priority (lower runs first)")
        concurrency: int = Field(8, ge=1, le=256, description="Requests in flight per partition")
        output_field: str = "answer"
        prompt_tokens_field: str = "prompt_tokens"
        completion_tokens_field: str = "completion_tokens"
        latency_field: str = "latency_generate_ms"

    cfg: Config

    def _runtime_attributes(self) -> tuple[str, ...]:
        return ("_client",)

    def setup(self) -> None:
        self._client: OpenAI = client(self.cfg, self.name)
        self._model = self.cfg.model or load_settings().llm_model
        headers: dict[str, str] = {}
        if self.cfg.slo_class is not None:
            headers["x-slo-class"] = self.cfg.slo_class
        if self.cfg.priority is not None:
            headers["x-priority"] = str(self.cfg.priority)
        self._headers = headers

    def execute(self, data: Record) -> Record:
        return self.execute_batch(_one_row(data)).to_pylist()[0]

    def execute_batch(self, table: pa.Table) -> pa.Table:
        self.ensure_setup()
        cfg = self.cfg
        conversations = self._conversations(table)
        n = len(conversations)
        results: list[tuple[str, int, int, float] | None] = [None] * n
        if n:
            with ThreadPoolExecutor(
                max_workers=min(cfg.concurrency, n), thread_name_prefix=self.name
            ) as pool:
                futures: dict[Future[tuple[str, int, int, float]], int] = {
                    pool.submit(self._complete, messages, i): i for i, messages in enumerate(conversations)
                }
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                failed = sorted(futures[f] for f in done if f.exception() is not None)
                if failed:
                    for f in futures:
                        f.cancel()
                    error = next(f for f in done if futures[f] == failed[0]).exception()
                    assert error is not None
                    raise error
                for f, i in futures.items():
                    results[i] = f.result()
        answers = [r[0] if r else "" for r in results]
        columns = {cfg.output_field: pa.array(answers, type=pa.string())}
        for field, k, kind in (
            (cfg.prompt_tokens_field, 1, pa.int64()),
            (cfg.completion_tokens_field, 2, pa.int64()),
            (cfg.latency_field, 3, pa.float64()),
        ):
            columns[field] = pa.array([r[k] if r else None for r in results], type=kind)
        return with_columns(table, columns)

    def _conversations(self, table: pa.Table) -> list[list[dict[str, str]]]:
        cfg = self.cfg
        if cfg.prompt_field is not None:
            prompts = _column(table, cfg.prompt_field, self.name, "prompt")
            out = []
            for i, prompt in enumerate(prompts):
                if not isinstance(prompt, str) or not prompt:
                    raise _missing(self.name, i, cfg.prompt_field, "a non-empty prompt string")
                out.append([{"role": "user", "content": prompt}])
            return out
        conversations = []
        for i, messages in enumerate(_column(table, cfg.messages_field, self.name, "chat messages")):
            if not messages:
                raise _missing(self.name, i, cfg.messages_field, "a non-empty list of chat messages")
            # Arrow structs carry every key of the column's union schema: drop the null ones
            conversations.append([{k: v for k, v in m.items() if v is not None} for m in messages])
        return conversations

    def _complete(self, messages: list[dict[str, str]], index: int) -> tuple[str, int, int, float]:
        from openai import APIError, APIStatusError

        cfg = self.cfg
        options: dict[str, Any] = {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature}
        if cfg.top_p is not None:
            options["top_p"] = cfg.top_p
        if cfg.seed is not None:
            options["seed"] = cfg.seed
        if cfg.stop is not None:
            options["stop"] = cfg.stop
        started = time.perf_counter()
        try:
            response = self._client.chat.completions.create(
                model=self._model,
                messages=messages,  # type: ignore[arg-type]
                extra_headers=self._headers or None,
                **options,
            )
        except APIStatusError as exc:
            raise OperatorError(
                f"{self.name}: row {index}: the server answered {exc.status_code}: {_server_message(exc)}",
                operator=self.name,
                record_index=index,
                status=exc.status_code,
            ) from None
        except APIError as exc:
            raise OperatorError(
                f"{self.name}: row {index}: request to {self._client.base_url} failed: {exc}",
                operator=self.name,
                record_index=index,
                status=None,
            ) from None
        latency = (time.perf_counter() - started) * 1000.0
        text = response.choices[0].message.content if response.choices else None
        usage = response.usage
        return (
            text or "",
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
            latency,
        )


def _server_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
    return str(getattr(exc, "message", exc))
