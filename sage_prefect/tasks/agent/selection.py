"""Tool selection: rank a tool set for each query and keep the ``top_k`` best.

`ToolSelector` methods:

- ``"keyword"``: BM25 (Okapi, ``k1=1.5``, ``b=0.75``) over each tool's name (camel case split,
  plus the whole name) and description; lower-cased alphanumeric tokens, English stop words
  dropped, a light plural/-ing stemmer. Needs no model.
- ``"embedding"``: cosine similarity between the query and ``"name: description"`` of each
  tool, embedded through the control plane (``/v1/embeddings`` with the openai SDK). With
  ``exemplars_path`` (a ``*_dev`` MetaTool selection CSV) the selector is fitted on example
  queries per tool: ``exemplar_mode="centroid"`` mixes the similarity to the mean exemplar
  embedding of each tool in with weight ``exemplar_weight``; ``"knn"`` mixes in a vote of the
  ``knn_k`` nearest exemplar queries (similarity-weighted, per tool).
  ``"classifier"`` replaces the similarities by a fitted model: a multinomial logistic
  regression (softmax with a bias, L2 penalty ``classifier_l2`` on the weights added to the
  mean cross-entropy) over the query embedding times ``classifier_embedding_scale`` joined
  with the TF-IDF vector of its BM25 tokens (``(1 + log tf) * (1 + log((1 + n) / (1 + df)))``,
  L2-normalised; the terms found in at least 2 fitted texts). It is fitted in torch from zero
  weights with at most ``classifier_iterations`` full-batch L-BFGS steps (history 10, strong
  Wolfe line search), so the same inputs give the same model. Its training rows are the
  fitted exemplar queries plus each tool's ``"name: description"`` text, so every tool is a
  class. The score is ``softmax(log p_classifier + knn_weight * log(vote + 1e-6))``, where
  ``vote`` is the vote of the ``knn_k`` nearest exemplar queries (cosine), each weighted
  ``exp((cos - 1) / knn_temperature)``, normalised to sum 1: a probability per tool.
- ``"hybrid"``: reciprocal-rank fusion ``sum 1/(rrf_k + rank)`` of keyword and embedding ranks.
- ``"llm"``: ask the chat model to choose among the hybrid top ``shortlist`` tools and parse
  tool names from its reply (best first). A reply naming no shortlisted tool falls back to
  the shortlist order; ``selection_source`` says which happened (``"llm"`` or ``"fallback"``).

Adds ``selected_tools`` (names, best first), ``selection_scores`` (the method's scores, same
order) and ``selection_source`` (the method, or ``"fallback"``). Tool embeddings and the fit
are computed once in ``setup()``; the query embeddings of a partition go in one request.
The fit reads only ``*_dev`` files; with ``holdout_fraction`` it leaves out the fixed-seed
(``seed``) part that `holdout_split` holds out, so a benchmark can score exactly those rows.

>>> sel = ToolSelector({"method": "keyword", "top_k": 1, "tools": [
...     {"name": "WeatherTool", "description": "Weather forecasts for any city."},
...     {"name": "NewsTool", "description": "Latest news headlines."}]})
>>> sel.run({"query": "will it rain in Paris? weather please"})["selected_tools"]
['WeatherTool']
"""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
from pydantic import Field

from sage_prefect.common.errors import ConfigError, RecordError
from sage_prefect.common.functions import MapFunction
from sage_prefect.common.records import with_columns
from sage_prefect.tasks.agent.data import holdout_split, load_selection, require_dev_file
from sage_prefect.tasks.agent.registry import Tool, tools_from_metatool
from sage_prefect.tasks.base import Operator
from sage_prefect.tasks.client import EndpointConfig, FunctionNames, chat_reply, is_context_length_error

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np
    from openai import OpenAI

__all__ = ["BM25", "ToolSelector", "embed_texts", "parse_tool_names", "tokenize"]

_STOP_WORDS = """a about above after again all also am an and any are as at be been before being below between
    both but by can could did do does doing down during each few for from further get had has have
    having he her here hers him his how i if in into is it its itself just let me more most my myself
    need no nor not now of off on once only or other our ours out over own please same she should so
    some such than that the their theirs them then there these they this those through to too under
    until up very want was we were what when where which while who whom why will with would you your
    yours yourself"""
_STOP = frozenset(_STOP_WORDS.split())
_WORD = re.compile(r"[a-z0-9]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def _stem(token: str) -> str:
    if len(token) > 4 and token.endswith("ies"):
        return token[:-3] + "y"
    if len(token) > 4 and token.endswith("ie"):  # calorie/calories, movie/movies agree
        return token[:-2] + "y"
    if len(token) > 5 and token.endswith("ing"):
        return token[:-3]
    if len(token) > 3 and token.endswith("s") and not token.endswith(("ss", "us", "is")):
        return token[:-1]
    return token


def tokenize(text: str) -> list[str]:
    """BM25 tokens: camel case split, lower case, alphanumeric runs, stop words out, light stemming.

    >>> tokenize("CompanyInfoTool finds the companies' stock prices")
    ['company', 'info', 'tool', 'find', 'company', 'stock', 'price']
    """
    words = _WORD.findall(_CAMEL.sub(" ", text).lower())
    return [_stem(w) for w in words if w not in _STOP]


class BM25:
    """Okapi BM25 over a small fixed corpus, scored with numpy.

    >>> bm = BM25([["weather", "rain"], ["news", "headline"]])
    >>> [round(float(s), 3) for s in bm.scores(["rain"])]
    [0.693, 0.0]
    """

    def __init__(self, docs: list[list[str]], k1: float = 1.5, b: float = 0.75) -> None:
        import numpy as np

        self.k1, self.b = k1, b
        self.vocab: dict[str, int] = {}
        for doc in docs:
            for tok in doc:
                self.vocab.setdefault(tok, len(self.vocab))
        n_docs = len(docs)
        tf = np.zeros((len(self.vocab), n_docs), dtype=np.float64)
        for j, doc in enumerate(docs):
            for tok in doc:
                tf[self.vocab[tok], j] += 1.0
        lengths = tf.sum(axis=0)
        avgdl = float(lengths.mean()) if n_docs and lengths.mean() > 0 else 1.0
        df = (tf > 0).sum(axis=1)
        self.idf = np.log(1.0 + (n_docs - df + 0.5) / (df + 0.5))
        norm = k1 * (1.0 - b + b * lengths / avgdl)
        self.weights = self.idf[:, None] * tf * (k1 + 1.0) / (tf + norm[None, :])
        self.n_docs = n_docs

    def scores(self, query: list[str]) -> np.ndarray:
        """BM25 score of every document for ``query`` tokens (each distinct term counted once)."""
        import numpy as np

        rows = sorted({self.vocab[t] for t in query if t in self.vocab})
        if not rows:
            return np.zeros(self.n_docs)
        return self.weights[rows].sum(axis=0)


def embed_texts(
    api: OpenAI,
    model: str,
    texts: list[str],
    max_chars: int = 1000,
    chunk: int = 1024,
    truncate: bool = True,
) -> np.ndarray:
    """L2-normalised embeddings of ``texts`` (float32, one row each) from an OpenAI-compatible
    ``/embeddings`` endpoint; texts are cut to their first ``max_chars`` characters and empty
    texts sent as ``"."``; at most ``chunk`` inputs per request. With ``truncate`` the request
    carries vLLM's ``truncate_prompt_tokens: -1`` (the control plane and vLLM accept it), so a
    text still longer than the model's token limit is cut to its last tokens there instead of
    refused; turn it off for endpoints that reject unknown fields (api.openai.com)."""
    import numpy as np

    cleaned = [(t or "").strip()[:max_chars] or "." for t in texts]
    extra = {"truncate_prompt_tokens": -1} if truncate else None
    rows: list[list[float]] = []
    for start in range(0, len(cleaned), chunk):
        resp = api.embeddings.create(model=model, input=cleaned[start : start + chunk], extra_body=extra)
        rows.extend(d.embedding for d in sorted(resp.data, key=lambda d: d.index))
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    vecs = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs / np.maximum(norms, 1e-12)


class _Tfidf:
    """TF-IDF over token lists: ``(1 + log tf) * idf`` with ``idf = 1 + log((1 + n) / (1 + df))``,
    each row L2-normalised; tokens outside the fitted vocabulary are dropped."""

    def __init__(self, docs: list[list[str]], min_df: int = 1) -> None:
        import numpy as np

        df: dict[str, int] = {}
        for doc in docs:
            for tok in set(doc):
                df[tok] = df.get(tok, 0) + 1
        terms = sorted(t for t, c in df.items() if c >= min_df)
        self.vocab = {tok: j for j, tok in enumerate(terms)}
        n = len(docs)
        self.idf = np.asarray([1.0 + math.log((1 + n) / (1 + df[t])) for t in terms], dtype=np.float32)

    def rows(self, docs: list[list[str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(row, column, value)`` arrays of the sparse matrix of ``docs`` (rows in order)."""
        import numpy as np

        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        for i, doc in enumerate(docs):
            counts: dict[int, int] = {}
            for tok in doc:
                j = self.vocab.get(tok)
                if j is not None:
                    counts[j] = counts.get(j, 0) + 1
            if not counts:
                continue
            js = sorted(counts)
            w = [(1.0 + math.log(counts[j])) * float(self.idf[j]) for j in js]
            norm = math.sqrt(sum(v * v for v in w))
            rows.extend([i] * len(js))
            cols.extend(js)
            vals.extend(v / norm for v in w)
        return (
            np.asarray(rows, dtype=np.int64),
            np.asarray(cols, dtype=np.int64),
            np.asarray(vals, dtype=np.float32),
        )


class _SoftmaxClassifier:
    """Multinomial logistic regression on ``[scale * embedding, TF-IDF(tokens)]``, fitted with
    full-batch L-BFGS in torch from zero weights (deterministic); see the module docstring."""

    def __init__(
        self,
        vecs: np.ndarray,
        docs: list[list[str]],
        labels: np.ndarray,
        n_classes: int,
        *,
        l2: float,
        iterations: int,
        scale: float,
        min_df: int = 2,
        history: int = 10,
    ) -> None:
        import warnings

        import numpy as np
        import torch

        self.scale = scale
        self.tfidf = _Tfidf(docs, min_df)
        rows, cols, vals = self.tfidf.rows(docs)
        n, dim = vecs.shape
        n_terms = max(len(self.tfidf.vocab), 1)
        x = torch.from_numpy(np.ascontiguousarray(vecs, dtype=np.float32)) * scale
        y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        at = torch.arange(n)
        w_dense = torch.zeros(dim, n_classes)
        w_sparse = torch.zeros(n_terms, n_classes)
        bias = torch.zeros(n_classes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            coo = torch.sparse_coo_tensor(
                torch.from_numpy(np.stack([rows, cols])), torch.from_numpy(vals), (n, n_terms)
            ).coalesce()
            xs, xs_t = coo.to_sparse_csr(), coo.t().coalesce().to_sparse_csr()
            opt = torch.optim.LBFGS(
                [w_dense, w_sparse, bias],
                lr=1.0,
                max_iter=iterations,
                history_size=history,
                line_search_fn="strong_wolfe",
                tolerance_grad=1e-6,
                tolerance_change=1e-9,
            )

            def closure() -> torch.Tensor:
                # Loss and gradient by hand (cheaper than autograd through the sparse product).
                with torch.no_grad():
                    logp = (torch.addmm(bias, x, w_dense) + xs @ w_sparse).log_softmax(dim=1)
                    penalty = w_dense.square().sum() + w_sparse.square().sum()
                    loss = -logp[at, y].mean() + l2 * penalty
                    grad = logp.exp()
                    grad[at, y] -= 1.0
                    grad /= n
                    w_dense.grad = x.t() @ grad + (2.0 * l2) * w_dense
                    w_sparse.grad = xs_t @ grad + (2.0 * l2) * w_sparse
                    bias.grad = grad.sum(dim=0)
                return loss

            opt.step(closure)
        self.w_dense = w_dense.numpy().astype(np.float64)
        self.w_sparse = w_sparse.numpy().astype(np.float64)
        self.bias = bias.numpy().astype(np.float64)

    def log_proba(self, vecs: np.ndarray, docs: list[list[str]]) -> np.ndarray:
        """``(len(docs), n_classes)`` log probabilities (float64)."""
        import numpy as np

        logits = (self.scale * vecs.astype(np.float64)) @ self.w_dense + self.bias
        rows, cols, vals = self.tfidf.rows(docs)
        np.add.at(logits, rows, self.w_sparse[cols] * vals[:, None])
        logits -= logits.max(axis=1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def parse_tool_names(reply: str, names: list[str]) -> list[str]:
    """Tool names from ``names`` that occur in ``reply`` (case-insensitive, whole words), in the
    order of their first occurrence.

    >>> parse_tool_names("Use NewsTool, then weathertool.", ["WeatherTool", "NewsTool", "MapTool"])
    ['NewsTool', 'WeatherTool']
    """
    found: list[tuple[int, str]] = []
    low = reply.lower()
    for name in names:
        m = re.search(r"(?<![\w.])" + re.escape(name.lower()) + r"(?![\w])", low)
        if m:
            found.append((m.start(), name))
    return [name for _, name in sorted(found)]


def load_tool_specs(tools: list[dict[str, Any]] | None, tools_path: str | None, operator: str) -> list[Tool]:
    """Tools from an inline list or a tools.json path (exactly one of them), as `Tool` objects."""
    if (tools is None) == (tools_path is None):
        raise ConfigError(
            f"{operator}: give exactly one of config keys 'tools' (a list of {{name, description}}) "
            "and 'tools_path' (a tools.json file)",
            operator=operator,
            field="tools",
        )
    if tools_path is not None:
        return tools_from_metatool(tools_path)
    assert tools is not None
    out: list[Tool] = []
    seen: set[str] = set()
    for i, spec in enumerate(tools):
        try:
            tool = Tool.from_dict(spec)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"{operator}: config key 'tools': item {i}: {exc}", operator=operator, field="tools"
            ) from None
        if tool.name in seen:
            raise ConfigError(
                f"{operator}: config key 'tools': item {i}: tool {tool.name!r} appears twice",
                operator=operator,
                field="tools",
            )
        seen.add(tool.name)
        out.append(tool)
    if not out:
        raise ConfigError(f"{operator}: config key 'tools' is empty", operator=operator, field="tools")
    return out


class ToolSelector(Operator, MapFunction):
    """Rank tools for each record's query; add ``selected_tools``, ``selection_scores``, ``selection_source``."""

    class Config(EndpointConfig):
        method: Literal["keyword", "embedding", "hybrid", "llm"] = Field(
            "embedding", description="keyword (BM25), embedding, hybrid (RRF of both) or llm"
        )
        tools: list[dict[str, Any]] | None = Field(None, description="Inline tools [{name, description}]")
        tools_path: str | None = Field(None, description="A MetaTool tools.json (or tools_multi.json)")
        query_field: str = "query"
        top_k: int = Field(5, ge=1, description="Tools kept per query")
        output_field: str = "selected_tools"
        scores_field: str = "selection_scores"
        source_field: str = "selection_source"
        embedding_model: str | None = Field(None, description="Default: settings.embedding_model")
        llm_model: str | None = Field(None, description="Default: settings.llm_model")
        exemplars_path: str | None = Field(
            None, description="A *_dev selection CSV (query,tool) to fit embedding scores on"
        )
        exemplar_mode: Literal["centroid", "knn", "classifier"] = Field(
            "centroid", description="How exemplars are used: centroid, knn or classifier (see the module)"
        )
        exemplar_weight: float = Field(0.7, ge=0.0, le=1.0, description="Weight of the exemplar score")
        max_exemplars_per_tool: int | None = Field(None, ge=1)
        holdout_fraction: float = Field(
            0.0, ge=0.0, lt=1.0, description="Fraction of the exemplar file left out of the fit (fixed seed)"
        )
        seed: int = 0
        knn_k: int = Field(10, ge=1, description="Nearest exemplar queries that vote (knn, classifier)")
        knn_temperature: float = Field(
            0.02, gt=0.0, description="classifier: a neighbour's vote is exp((cos - 1) / knn_temperature)"
        )
        knn_weight: float = Field(
            0.2, ge=0.0, description="classifier: weight of the log kNN vote added to the log probability"
        )
        classifier_l2: float = Field(
            1e-5, gt=0.0, description="classifier: L2 penalty on the weights (per mean cross-entropy)"
        )
        classifier_iterations: int = Field(50, ge=1, description="classifier: L-BFGS iterations")
        classifier_embedding_scale: float = Field(
            1.0, gt=0.0, description="classifier: factor on the query embedding next to its TF-IDF"
        )
        rrf_k: int = Field(60, ge=1)
        shortlist: int = Field(8, ge=1, description="Candidates the llm method chooses from")
        max_tokens: int = Field(48, ge=1)
        temperature: float = Field(0.0, ge=0.0)
        max_chars: int = Field(1000, ge=16, description="Characters of a text sent to the embedding model")
        truncate_inputs: bool = Field(
            True,
            description="Ask the endpoint to cut texts over the embedding model's token limit "
            "(vLLM's truncate_prompt_tokens); off for endpoints that reject unknown fields",
        )
        concurrency: int = Field(8, ge=1, description="Parallel chat requests per partition (llm)")

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if self.cfg.tools is not None or self.cfg.tools_path is None:
            # Inline tools are checked now (no file to read); a path is read in setup().
            load_tool_specs(self.cfg.tools, self.cfg.tools_path, self.name)
        if self.cfg.exemplars_path is not None:
            require_dev_file(self.cfg.exemplars_path, self.name, "exemplars_path")

    def _runtime_attributes(self) -> tuple[str, ...]:
        return (
            "_api",
            "_tools",
            "_bm25",
            "_tool_vecs",
            "_centroids",
            "_has_ex",
            "_ex_vecs",
            "_ex_labels",
            "_ex_queries",
            "_classifier",
            "_tool_texts",
        )

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Load the tools, build BM25, embed the tools and fit on exemplars (model methods only)."""
        import numpy as np

        from sage_prefect.common.settings import load_settings
        from sage_prefect.tasks.client import client

        cfg = self.cfg
        self._tools = load_tool_specs(cfg.tools, cfg.tools_path, self.name)
        self._bm25 = BM25([tokenize(f"{t.name} {t.name.lower()} {t.description}") for t in self._tools])
        self._api: OpenAI | None = None
        self._tool_vecs: np.ndarray | None = None
        self._centroids: np.ndarray | None = None
        self._ex_vecs: np.ndarray | None = None
        self._ex_labels: np.ndarray | None = None
        self._has_ex: np.ndarray | None = None
        self._ex_queries: list[str] = []
        self._classifier: _SoftmaxClassifier | None = None
        if cfg.method != "keyword":
            settings = load_settings()
            self._embedding_model = cfg.embedding_model or settings.embedding_model
            self._llm_model = cfg.llm_model or settings.llm_model
            self._api = client(cfg, self.name)
            self._tool_texts = [
                f"{' '.join(_CAMEL.sub(' ', t.name).split())}: {t.description}" for t in self._tools
            ]
            self._tool_vecs = self._embed(self._tool_texts)
            if cfg.exemplars_path is not None:
                self._fit(np)
        self._ready = True

    def _embed(self, texts: list[str]) -> np.ndarray:
        assert self._api is not None
        return embed_texts(
            self._api, self._embedding_model, texts, self.cfg.max_chars, truncate=self.cfg.truncate_inputs
        )

    def _fit(self, np: Any) -> None:
        cfg = self.cfg
        assert cfg.exemplars_path is not None
        path = require_dev_file(cfg.exemplars_path, self.name, "exemplars_path")
        index = {t.name: i for i, t in enumerate(self._tools)}
        rows, _held_out = holdout_split(load_selection(path), cfg.holdout_fraction, cfg.seed)
        per_tool: dict[int, int] = {}
        queries: list[str] = []
        labels: list[int] = []
        for row in rows:
            j = index.get(row["tool"])
            if j is None:
                continue  # exemplars of tools outside this tool set
            if cfg.max_exemplars_per_tool is not None and per_tool.get(j, 0) >= cfg.max_exemplars_per_tool:
                continue
            per_tool[j] = per_tool.get(j, 0) + 1
            queries.append(row["query"])
            labels.append(j)
        if not queries:
            raise ConfigError(
                f"{self.name}: config key 'exemplars_path': {path} has no queries for any of the "
                f"{len(self._tools)} tools",
                operator=self.name,
                field="exemplars_path",
            )
        ex_vecs = self._embed(queries)
        ex_labels = np.asarray(labels, dtype=np.int64)
        sums = np.zeros((len(self._tools), ex_vecs.shape[1]), dtype=np.float32)
        np.add.at(sums, ex_labels, ex_vecs)
        self._ex_vecs, self._ex_labels = ex_vecs, ex_labels
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        self._centroids = sums / np.maximum(norms, 1e-12)
        self._has_ex = norms[:, 0] > 0
        self._ex_queries = queries
        if cfg.exemplar_mode == "classifier":
            assert self._tool_vecs is not None
            texts = queries + self._tool_texts  # each tool's own text is one more example of it
            self._classifier = _SoftmaxClassifier(
                np.concatenate([ex_vecs, self._tool_vecs]),
                [tokenize(t) for t in texts],
                np.concatenate([ex_labels, np.arange(len(self._tools), dtype=np.int64)]),
                len(self._tools),
                l2=cfg.classifier_l2,
                iterations=cfg.classifier_iterations,
                scale=cfg.classifier_embedding_scale,
            )

    # -- scoring -------------------------------------------------------------------------------
    @property
    def tools(self) -> list[Tool]:
        """The tool set (after ``setup()``)."""
        self.ensure_setup()
        return list(self._tools)

    @property
    def fitted_queries(self) -> list[str]:
        """The exemplar queries the selector was fitted on (after ``setup()``; empty without a fit)."""
        self.ensure_setup()
        return list(self._ex_queries)

    def _knn_votes(self, qv: np.ndarray, weight: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Per tool, the sum of ``weight(cos)`` over the ``knn_k`` nearest exemplar queries."""
        import numpy as np

        assert self._ex_vecs is not None and self._ex_labels is not None
        sims = qv @ self._ex_vecs.T
        k = min(self.cfg.knn_k, sims.shape[1])
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        votes = np.zeros((len(qv), len(self._tools)), dtype=np.float64)
        for i in range(len(qv)):
            np.add.at(votes[i], self._ex_labels[top[i]], weight(sims[i, top[i]].astype(np.float64)))
        return votes

    def _classifier_scores(self, queries: list[str], qv: np.ndarray) -> np.ndarray:
        import numpy as np

        assert self._classifier is not None
        fused = self._classifier.log_proba(qv, [tokenize(q) for q in queries])
        if self.cfg.knn_weight > 0:
            temp = self.cfg.knn_temperature
            votes = self._knn_votes(qv, lambda s: np.exp((s - 1.0) / temp))
            votes /= np.maximum(votes.sum(axis=1, keepdims=True), 1e-300)
            fused = fused + self.cfg.knn_weight * np.log(votes + 1e-6)
        fused -= fused.max(axis=1, keepdims=True)
        probs = np.exp(fused)
        return probs / probs.sum(axis=1, keepdims=True)

    def _keyword_scores(self, queries: list[str]) -> np.ndarray:
        import numpy as np

        return np.stack([self._bm25.scores(tokenize(q)) for q in queries]) if queries else np.zeros((0, 0))

    def _embedding_scores(self, queries: list[str]) -> np.ndarray:
        import numpy as np

        qv = self._embed(queries)
        assert self._tool_vecs is not None
        scores = qv @ self._tool_vecs.T
        if self._ex_vecs is None or self._ex_labels is None or self._has_ex is None:
            return scores
        if self._classifier is not None:
            return self._classifier_scores(queries, qv)
        w = self.cfg.exemplar_weight
        if self.cfg.exemplar_mode == "centroid":
            assert self._centroids is not None
            ex = qv @ self._centroids.T
        else:
            ex = self._knn_votes(qv, lambda s: np.maximum(s, 0.0)).astype(scores.dtype) / min(
                self.cfg.knn_k, len(self._ex_vecs)
            )
        mixed = np.where(self._has_ex[None, :], (1.0 - w) * scores + w * ex, scores)
        return mixed.astype(np.float64)

    def score(self, queries: list[str], method: str | None = None) -> np.ndarray:
        """A ``(len(queries), n_tools)`` score matrix (higher is better) for ``method``
        (default: the configured one; ``"llm"`` scores are the hybrid ones)."""
        import numpy as np

        self.ensure_setup()
        method = method or self.cfg.method
        if method == "keyword":
            return self._keyword_scores(queries)
        if self._api is None:
            raise ConfigError(
                f"{self.name}: method {method!r} needs the embedding model; configure method {method!r}",
                operator=self.name,
                field="method",
            )
        if method == "embedding":
            return self._embedding_scores(queries)
        kw, emb = self._keyword_scores(queries), self._embedding_scores(queries)
        out = np.zeros_like(emb)
        for mat in (kw, emb):
            ranks = np.argsort(np.argsort(-mat, axis=1, kind="stable"), axis=1)
            out += 1.0 / (self.cfg.rrf_k + ranks + 1.0)
        return out

    def rank(
        self, queries: list[str], method: str | None = None, k: int | None = None
    ) -> list[list[tuple[str, float]]]:
        """For each query the ``k`` (default ``top_k``) best ``(tool name, score)``, best first."""
        import numpy as np

        scores = self.score(queries, method)
        k = min(k or self.cfg.top_k, len(self._tools))
        out = []
        for row in scores:
            order = np.argsort(-row, kind="stable")[:k]
            out.append([(self._tools[j].name, float(row[j])) for j in order])
        return out

    # -- llm -------------------------------------------------------------------------------------
    def _ask(self, query: str, shortlist: list[tuple[str, float]]) -> tuple[list[tuple[str, float]], str]:
        assert self._api is not None
        by_name = {t.name: t for t in self._tools}
        names = FunctionNames([name for name, _ in shortlist])
        # the shortlist as OpenAI tools without arguments: the model answers with one call, whose
        # name is its choice (the endpoint's constrained decoding makes it a name from the list)
        tools = names.openai_tools(
            [
                {
                    "name": n,
                    "description": by_name[n].description,
                    "parameters": {"type": "object", "properties": {}},
                }
                for n, _ in shortlist
            ]
        )
        messages = [
            {"role": "system", "content": "Call the one tool that best fits the user's request."},
            {"role": "user", "content": query[: self.cfg.max_chars * 2]},
        ]
        try:
            reply = chat_reply(
                self._api,
                self._llm_model,
                messages,
                self.cfg.max_tokens,
                self.cfg.temperature,
                tools=tools,
                tool_choice="required",
                parallel_tool_calls=False,
            )
        except Exception as exc:
            if is_context_length_error(exc):  # the request is longer than the chat model takes
                return shortlist, "fallback"
            raise
        picked = [t for t in (names.tool(name) for name, _ in reply.calls) if t is not None]
        if not picked:  # an endpoint that answered in text: names in the reply
            picked = parse_tool_names(reply.text, [name for name, _ in shortlist])
        if not picked:
            return shortlist, "fallback"
        scores = dict(shortlist)
        rest = [(n, s) for n, s in shortlist if n not in picked]
        return [(n, scores[n]) for n in picked] + rest, "llm"

    def select(self, queries: list[str]) -> list[tuple[list[tuple[str, float]], str]]:
        """For each query: the ``top_k`` ``(tool, score)`` pairs, best first, and the selection source."""
        self.ensure_setup()
        if self.cfg.method != "llm":
            return [(r, self.cfg.method) for r in self.rank(queries)]
        shortlists = self.rank(queries, "hybrid", max(self.cfg.shortlist, self.cfg.top_k))
        with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, max(1, len(queries)))) as pool:
            answers = list(pool.map(self._ask, queries, shortlists))
        return [(ranked[: self.cfg.top_k], source) for ranked, source in answers]

    # -- operator --------------------------------------------------------------------------------
    def _queries(self, table: pa.Table) -> list[str]:
        field = self.cfg.query_field
        if field not in table.column_names:
            raise RecordError(
                f"operator {self.name!r}: records have no field {field!r} (config key 'query_field'; "
                f"fields: {', '.join(table.column_names)})",
                operator=self.name,
                field=field,
            )
        return ["" if q is None else str(q) for q in table.column(field).to_pylist()]

    def execute_batch(self, table: pa.Table) -> pa.Table:
        """Select tools for every row of a partition (one embedding request for all queries)."""
        self.ensure_setup()
        results = self.select(self._queries(table)) if table.num_rows else []
        cfg = self.cfg
        columns = {
            cfg.output_field: pa.array([[n for n, _ in r] for r, _ in results], type=pa.list_(pa.string())),
            cfg.scores_field: pa.array(
                [[s if math.isfinite(s) else 0.0 for _, s in r] for r, _ in results],
                type=pa.list_(pa.float64()),
            ),
            cfg.source_field: pa.array([s for _, s in results], type=pa.string()),
        }
        return with_columns(table, columns)

    def execute(self, data: dict[str, Any]) -> dict[str, Any]:
        """Select tools for one record."""
        out = self.execute_batch(pa.Table.from_pylist([data]))
        return out.to_pylist()[0]
