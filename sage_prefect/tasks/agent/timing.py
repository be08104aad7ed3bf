"""Timing: should the agent call a tool for this request, or answer directly?

`TimingDecider` methods:

- ``"rule"``: keyword/pattern rules (`TOOL_RULES`, `DIRECT_RULES`, below). Each matching
  tool rule adds its weight, each matching direct rule subtracts its weight; ``needs_tool``
  is ``score > 0`` and ``timing_score = sigmoid(score)``. Tool rules fire on requests for
  live or external data (weather, prices, news, schedules, "latest", "near me"), on actions
  in the world (book, order, send, download, track, search/find) and on services (apps,
  websites, platforms); direct rules fire on writing, explaining and reasoning tasks the
  model can do from its own knowledge (write/compose/rewrite, explain/why, define, "the
  following text", jokes, poems, essays).
- ``"embedding"``: logistic regression (numpy, L2-regularised, full-batch Newton steps) on
  query embeddings, fitted in ``setup()`` on a labelled ``*_dev`` timing file
  (``train_path``; ``holdout_fraction`` of it left out with a fixed seed).
  ``timing_score`` is the predicted probability that a tool is needed.
- ``"llm"``: ask the chat model "yes" or "no"; a reply with neither word falls back to the
  rules (``timing_source`` says ``"fallback"``).

Adds ``needs_tool`` (bool), ``timing_score`` (float, higher means a tool is more likely
needed) and ``timing_source`` (the method, or ``"fallback"``).

>>> TimingDecider({"method": "rule"}).run({"query": "What is the weather in Oslo tomorrow?"})["needs_tool"]
True
>>> TimingDecider({"method": "rule"}).run({"query": "Write a short poem about autumn."})["needs_tool"]
False
"""

from __future__ import annotations

import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
from pydantic import Field

from sage_prefect.common.errors import ConfigError, RecordError
from sage_prefect.common.functions import MapFunction
from sage_prefect.common.records import with_columns
from sage_prefect.tasks.agent.data import holdout_split, load_timing, require_dev_file
from sage_prefect.tasks.agent.selection import embed_texts
from sage_prefect.tasks.base import Operator
from sage_prefect.tasks.client import EndpointConfig, chat_reply, is_context_length_error

if TYPE_CHECKING:
    import numpy as np
    from openai import OpenAI

__all__ = ["DIRECT_RULES", "TOOL_RULES", "TimingDecider", "rule_score"]


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


# (pattern, weight): live or external information, actions in the world, named services.
TOOL_RULES: list[tuple[re.Pattern[str], float]] = [
    (
        _rx(
            r"\b(latest|current(ly)?|today'?s?|tonight|tomorrow|yesterday'?s?|last (night|week|year)|right now|this (week|weekend|month)|recent(ly)?|up-to-date|real[- ]time|live)\b"
        ),
        1.5,
    ),
    (
        _rx(
            r"\b(weather|forecast|stock|stocks|share price|prices?|exchange rate|crypto\w*|bitcoin|news|headlines?|tweets?|twitter|scores?|results of)\b"
        ),
        1.5,
    ),
    (
        _rx(
            r"\b(flights?|hotels?|restaurants?|reservations?|tickets?|traffic|directions|route|near me|nearby|in my area|listings?|job openings|vacanc\w+|maps?|coordinates|dice|for rent|available)\b"
        ),
        1.5,
    ),
    (
        _rx(
            r"\b(book|order|buy|purchase|shop|shopping|deliver\w*|send|email|remind\w*|download|upload|track\w*|subscribe|install|play)\b"
        ),
        1.0,
    ),
    (_rx(r"\b(search|find|look up|locate|fetch|retrieve|check|show me|get me)\b"), 1.0),
    (_rx(r"\b(app|application|website|platform|online|plugin|api|database|software|service|store)\b"), 1.0),
    (_rx(r"\b(convert|translate|calculate|compute)\b.*\d|\d.*\b(convert|calculate|compute)\b"), 1.0),
    (
        _rx(
            r"\b(create|make|generate|design)\b.{0,40}\b(form|survey|chart|diagram|image|picture|logo|qr code|presentation|video|playlist)\b"
        ),
        1.5,
    ),
    (_rx(r"\b(pdf|url|link|https?://|\.com\b)"), 1.0),
    (
        _rx(
            r"\b(recommend|suggest)\w*\b.{0,40}\b(products?|courses?|games?|places|apps?|tools?|websites?|books?|podcasts?)\b"
        ),
        0.5,
    ),
]

# (pattern, weight): tasks the model answers from its own knowledge.
DIRECT_RULES: list[tuple[re.Pattern[str], float]] = [
    (
        _rx(
            r"^\s*(please\s+)?(write|compose|rewrite|paraphrase|summari[sz]e|edit|proofread|explain|describe|define|classify|categori[sz]e|rank|compare|list|name|brainstorm|generate a (list|story|poem|title))\b"
        ),
        2.5,
    ),
    (_rx(r"\b(rewrite|paraphrase|proofread|summari[sz]e) (this|the|my)\b"), 2.0),
    (
        _rx(
            r"\b(why|how come|what causes|what is the (meaning|difference|definition)|what does .{1,30} mean)\b"
        ),
        1.0,
    ),
    (
        _rx(
            r"\b(poem|poetry|story|essay|joke|riddle|haiku|lyrics|parody|slogan|tweet about|dialogue|letter|speech|metaphor|analogy)\b"
        ),
        2.0,
    ),
    (
        _rx(
            r"\b(the (following|given|above|below) (text|sentence|paragraph|passage|code|list|words?|input|article|statement)|given (text|sentence|input)|following)\b"
        ),
        2.0,
    ),
    (
        _rx(
            r"\b(opinion|pros and cons|advice|tips|ideas|examples? of|in your own words|imagine|pretend|hypothetical)\b"
        ),
        1.0,
    ),
    (_rx(r"\b(grammar|synonyms?|antonyms?|rhymes?|spell(ing)?|sentence|adjectives?|verbs?|nouns?)\b"), 1.0),
    (_rx(r"\b(history|historically|philosoph\w+|theory|concept|principle|ethical|moral)\b"), 0.5),
]


def rule_score(query: str) -> float:
    """Sum of matching `TOOL_RULES` weights minus matching `DIRECT_RULES` weights.

    >>> rule_score("Book me a flight to Rome") > 0 > rule_score("Explain why the sky is blue.")
    True
    """
    text = query or ""
    return sum(w for rx, w in TOOL_RULES if rx.search(text)) - sum(
        w for rx, w in DIRECT_RULES if rx.search(text)
    )


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


_YES = re.compile(r"\b(yes|yeah|true|tool)\b", re.IGNORECASE)
_NO = re.compile(r"\b(no|nope|false|direct(ly)?)\b", re.IGNORECASE)


def parse_yes_no(reply: str) -> bool | None:
    """``True`` for a reply whose first yes/no word is yes, ``False`` for no, ``None`` for neither.

    >>> parse_yes_no("Yes."), parse_yes_no("no, answer directly"), parse_yes_no("blue")
    (True, False, None)
    """
    yes, no = _YES.search(reply), _NO.search(reply)
    if yes and (not no or yes.start() < no.start()):
        return True
    if no:
        return False
    return None


NEEDS_TOOL_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {
        "name": "timing",
        "schema": {
            "type": "object",
            "properties": {"needs_tool": {"type": "boolean"}},
            "required": ["needs_tool"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}


def parse_needs_tool(reply: str) -> bool | None:
    """The ``needs_tool`` of a JSON reply (`NEEDS_TOOL_FORMAT`), else the reply read as yes/no.

    >>> parse_needs_tool('{"needs_tool": true}'), parse_needs_tool("No."), parse_needs_tool("blue")
    (True, False, None)
    """
    try:
        value = json.loads(reply)
    except ValueError:
        return parse_yes_no(reply)
    if isinstance(value, dict) and isinstance(value.get("needs_tool"), bool):
        return bool(value["needs_tool"])
    return None


class TimingDecider(Operator, MapFunction):
    """Decide per record whether a tool is needed; add ``needs_tool``, ``timing_score``, ``timing_source``."""

    class Config(EndpointConfig):
        method: Literal["rule", "embedding", "llm"] = Field("rule", description="rule, embedding or llm")
        query_field: str = "query"
        output_field: str = "needs_tool"
        score_field: str = "timing_score"
        source_field: str = "timing_source"
        train_path: str | None = Field(None, description="A labelled *_dev timing JSON (method embedding)")
        holdout_fraction: float = Field(
            0.0, ge=0.0, lt=1.0, description="Part of train_path left out of the fit"
        )
        seed: int = 0
        threshold: float = Field(
            0.5, ge=0.0, le=1.0, description="needs_tool when the probability is above this"
        )
        l2: float = Field(1.0, ge=0.0, description="L2 penalty of the logistic regression")
        embedding_model: str | None = None
        llm_model: str | None = None
        max_tokens: int = Field(16, ge=1)
        temperature: float = Field(0.0, ge=0.0)
        max_chars: int = Field(1000, ge=16)
        truncate_inputs: bool = Field(
            True,
            description="Ask the endpoint to cut texts over the embedding model's token limit "
            "(vLLM's truncate_prompt_tokens); off for endpoints that reject unknown fields",
        )
        concurrency: int = Field(8, ge=1)

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if self.cfg.method == "embedding" and self.cfg.train_path is None:
            raise ConfigError(
                f"{self.name}: method 'embedding' needs config key 'train_path' (a labelled *_dev timing file)",
                operator=self.name,
                field="train_path",
            )
        if self.cfg.train_path is not None:
            require_dev_file(self.cfg.train_path, self.name, "train_path")

    def _runtime_attributes(self) -> tuple[str, ...]:
        return ("_api", "_weights", "_bias")

    def setup(self) -> None:
        """Create the client (model methods) and fit the classifier (method embedding)."""
        from sage_prefect.common.settings import load_settings
        from sage_prefect.tasks.client import client

        cfg = self.cfg
        self._api: OpenAI | None = None
        self._weights: np.ndarray | None = None
        self._bias = 0.0
        if cfg.method != "rule":
            settings = load_settings()
            self._embedding_model = cfg.embedding_model or settings.embedding_model
            self._llm_model = cfg.llm_model or settings.llm_model
            self._api = client(cfg, self.name)
        if cfg.method == "embedding":
            self._fit()
        self._ready = True

    def _fit(self) -> None:
        import numpy as np

        assert self.cfg.train_path is not None and self._api is not None
        path = require_dev_file(self.cfg.train_path, self.name, "train_path")
        items, _held_out = holdout_split(load_timing(path), self.cfg.holdout_fraction, self.cfg.seed)
        labels = np.asarray([1.0 if it["needs_tool"] else 0.0 for it in items])
        if len(set(labels.tolist())) < 2:
            raise ConfigError(
                f"{self.name}: config key 'train_path': {path} needs items of both labels to fit",
                operator=self.name,
                field="train_path",
            )
        x = embed_texts(
            self._api,
            self._embedding_model,
            [it["query"] for it in items],
            self.cfg.max_chars,
            truncate=self.cfg.truncate_inputs,
        )
        self._weights, self._bias = _fit_logistic(x.astype(np.float64), labels, self.cfg.l2)

    def probabilities(self, queries: list[str]) -> list[tuple[float, str]]:
        """For each query: the score that a tool is needed (a probability, except ``"llm"``
        which gives 1/0 or the rule's sigmoid) and its source."""
        import numpy as np

        self.ensure_setup()
        method = self.cfg.method
        if method == "rule":
            return [(_sigmoid(rule_score(q)), "rule") for q in queries]
        assert self._api is not None
        if method == "embedding":
            assert self._weights is not None
            x = embed_texts(
                self._api,
                self._embedding_model,
                queries,
                self.cfg.max_chars,
                truncate=self.cfg.truncate_inputs,
            ).astype(np.float64)
            z = x @ self._weights + self._bias
            return [(float(p), "embedding") for p in 1.0 / (1.0 + np.exp(-z))]
        with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, max(1, len(queries)))) as pool:
            return list(pool.map(self._ask, queries))

    def _ask(self, query: str) -> tuple[float, str]:
        assert self._api is not None
        messages = [
            {
                "role": "system",
                "content": "Decide whether answering the user's request needs an external tool (live data, "
                "search, booking, a service or an action); if you can answer from your own knowledge, "
                'it does not. Answer as JSON: {"needs_tool": true} or {"needs_tool": false}.',
            },
            {"role": "user", "content": query[: self.cfg.max_chars * 2]},
        ]
        try:
            reply = chat_reply(
                self._api,
                self._llm_model,
                messages,
                self.cfg.max_tokens,
                self.cfg.temperature,
                response_format=NEEDS_TOOL_FORMAT,
            )
        except Exception as exc:
            if is_context_length_error(exc):  # the request is longer than the chat model takes
                return _sigmoid(rule_score(query)), "fallback"
            raise
        answer = parse_needs_tool(reply.text)
        if answer is None:
            return _sigmoid(rule_score(query)), "fallback"
        return (1.0 if answer else 0.0), "llm"

    def execute_batch(self, table: pa.Table) -> pa.Table:
        """Decide for every row of a partition (one embedding request for all queries)."""
        field = self.cfg.query_field
        if field not in table.column_names:
            raise RecordError(
                f"operator {self.name!r}: records have no field {field!r} (config key 'query_field')",
                operator=self.name,
                field=field,
            )
        queries = ["" if q is None else str(q) for q in table.column(field).to_pylist()]
        results = self.probabilities(queries) if queries else []
        threshold = self.cfg.threshold
        columns = {
            self.cfg.output_field: pa.array([p > threshold for p, _ in results], type=pa.bool_()),
            self.cfg.score_field: pa.array([p for p, _ in results], type=pa.float64()),
            self.cfg.source_field: pa.array([s for _, s in results], type=pa.string()),
        }
        return with_columns(table, columns)

    def execute(self, data: dict[str, Any]) -> dict[str, Any]:
        """Decide for one record."""
        return self.execute_batch(pa.Table.from_pylist([data])).to_pylist()[0]


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, steps: int = 25) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by Newton's method (bias unpenalised)."""
    import numpy as np

    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    w = np.zeros(d + 1)
    penalty = np.full(d + 1, l2)
    penalty[-1] = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(xb @ w)))
        grad = xb.T @ (p - y) + penalty * w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(penalty) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.max(np.abs(step))) < 1e-8:
            break
    return w[:-1], float(w[-1])
