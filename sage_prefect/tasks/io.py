"""Sources that read files (JSON Lines, CSV, Parquet, a directory of text) and the file sinks.

Every source is a ``BatchFunction`` and an `Operator`: its config is validated when it is
constructed, its files are opened in ``setup()``, and each ``execute()`` call returns the
next ``batch_size`` rows (a list of records, or a ``pyarrow.Table``), then ``None`` at the
end. After the end the source starts over on the next call, so ``op.run()`` can be repeated.

Paths are checked in ``setup()``, not at construction: a pipeline may be declared on a
machine that does not hold its input. A path that does not exist then raises `ConfigError`
naming the operator and the key ``path``. (The kernel sets a source up on the machine that
runs the flow, before the first partition is cut, so the error still comes before any work.)

>>> import json, pathlib, tempfile
>>> file = pathlib.Path(tempfile.mkdtemp()) / "rows.jsonl"
>>> _ = file.write_text('{"id": 1}\\n\\n{"id": 2}\\n')
>>> JSONLSource({"path": str(file)}).run()
[{'id': 1}, {'id': 2}]

The sinks are the data layer's idempotent partition sinks (`JSONLSink`, `ParquetSink`,
`LanceSink`), re-exported here so a pipeline finds sources and sinks in one module.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, TypeAlias

import pyarrow as pa
from pydantic import BeforeValidator, Field, field_validator
from pydantic_core import PydanticCustomError

from sage_prefect.common.errors import ConfigError, RecordError
from sage_prefect.common.functions import BatchFunction, Record
from sage_prefect.data import JSONLSink, LanceSink, ParquetSink
from sage_prefect.tasks.base import Operator, OperatorConfig

__all__ = [
    "CSVSource",
    "JSONLSink",
    "JSONLSource",
    "LanceSink",
    "ParquetSink",
    "ParquetSource",
    "TextDirectorySource",
    "markdown_title",
]


def _fspath(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


PathStr = Annotated[str, BeforeValidator(_fspath), Field(min_length=1)]
"""A path config value: a non-empty ``str`` (an ``os.PathLike`` is accepted and made a ``str``)."""

BatchSize = Annotated[int, Field(gt=0)]

Batch: TypeAlias = list[Record] | pa.Table


class _FileSource(Operator, BatchFunction):
    """Shared machinery: a generator of batches built in ``setup()``, restarted after the end."""

    def _runtime_attributes(self) -> tuple[str, ...]:
        return ("_batches",)

    def setup(self) -> None:
        self._close()
        self._batches: Iterator[Batch] | None = self._open()
        super().setup()

    def execute(self) -> Batch | None:  # type: ignore[override]
        """The next batch of at most ``batch_size`` rows, or ``None`` at the end."""
        if getattr(self, "_batches", None) is None:
            self._ready = False
            self.ensure_setup()
        assert self._batches is not None
        for batch in self._batches:
            if len(batch) if isinstance(batch, list) else batch.num_rows:
                return batch
        # The end: release the files; the next call (or the next run()) starts over.
        self._close()
        self._ready = False
        return None

    def _close(self) -> None:
        batches = getattr(self, "_batches", None)
        if batches is not None and hasattr(batches, "close"):
            batches.close()
        self._batches = None

    def _open(self) -> Iterator[Batch]:
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------------
    def _existing(self, path: str, *, directory: bool | None = None) -> Path:
        """``path`` resolved; `ConfigError` (key ``path``) if it is missing or of the wrong kind."""
        resolved = Path(path).expanduser().resolve()
        if not resolved.exists():
            raise ConfigError(
                f"{self.name}: config key 'path': {path!r} does not exist (resolved to {resolved}) "
                "on this machine",
                operator=self.name,
                field="path",
                file=str(resolved),
            )
        if directory is True and not resolved.is_dir():
            raise ConfigError(
                f"{self.name}: config key 'path': {path!r} is not a directory",
                operator=self.name,
                field="path",
                file=str(resolved),
            )
        if directory is False and resolved.is_dir():
            raise ConfigError(
                f"{self.name}: config key 'path': {path!r} is a directory, expected a file",
                operator=self.name,
                field="path",
                file=str(resolved),
            )
        return resolved

    def _files(self, path: str, suffix: str) -> list[Path]:
        """A file, or every ``*<suffix>`` file under a directory (recursively, sorted by path)."""
        root = self._existing(path)
        if root.is_dir():
            return sorted(p for p in root.rglob(f"*{suffix}") if p.is_file())
        return [root]


def _rebatch(batches: Iterator[pa.RecordBatch], size: int) -> Iterator[pa.Table]:
    """Tables of exactly ``size`` rows (the last one may be shorter) from record batches."""
    pending: list[pa.RecordBatch] = []
    rows = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        pending.append(batch)
        rows += batch.num_rows
        while rows >= size:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, size).combine_chunks()
            rest = table.slice(size)
            pending = rest.to_batches()
            rows = rest.num_rows
    if rows:
        yield pa.Table.from_batches(pending).combine_chunks()


# --------------------------------------------------------------------------- JSON Lines


class JSONLSource(_FileSource):
    """Records from a JSON Lines file, or every ``*.jsonl`` file under a directory (sorted).

    Each non-blank line must be a JSON object; a line that is not valid JSON, is not an
    object, or is not UTF-8 raises `RecordError` naming the file and the line number
    (``exc.file``, ``exc.line``). Returns lists of ``batch_size`` records per call.
    A directory written by `JSONLSink` reads back with this source.

    >>> import pathlib, tempfile
    >>> file = pathlib.Path(tempfile.mkdtemp()) / "bad.jsonl"
    >>> _ = file.write_text('{"id": 1}\\n[1, 2]\\n')
    >>> JSONLSource({"path": str(file)}).run()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    sage_prefect.common.errors.RecordError: JSONLSource: .../bad.jsonl:2: expected a JSON object, got a list ([1, 2])
    """

    class Config(OperatorConfig):
        path: PathStr
        batch_size: BatchSize = 1000

    cfg: Config

    def _open(self) -> Iterator[list[Record]]:
        files = self._files(self.cfg.path, ".jsonl")
        return self._read(files)

    def _read(self, files: list[Path]) -> Iterator[list[Record]]:
        size = self.cfg.batch_size
        batch: list[Record] = []
        for file in files:
            with file.open("rb") as handle:
                for number, raw in enumerate(handle, start=1):
                    record = self._parse(raw, file, number)
                    if record is None:
                        continue
                    batch.append(record)
                    if len(batch) >= size:
                        yield batch
                        batch = []
        if batch:
            yield batch

    def _parse(self, raw: bytes, file: Path, number: int) -> Record | None:
        where = f"{self.name}: {file}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._error(
                f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})", file, number
            ) from None
        if number == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            return None
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise self._error(
                f"{where}: invalid JSON: {exc.msg} (column {exc.colno})", file, number
            ) from None
        if not isinstance(value, dict):
            kind = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
                type(value), "a number"
            )
            shown = line.strip()
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise self._error(f"{where}: expected a JSON object, got {kind} ({shown})", file, number)
        return value

    def _error(self, message: str, file: Path, line: int) -> RecordError:
        return RecordError(message, operator=self.name, file=str(file), line=line)


# --------------------------------------------------------------------------- CSV


class CSVSource(_FileSource):
    """Rows of a CSV file with a header line, read with pyarrow's streaming CSV reader.

    Column types are inferred from the first block of the file; a later value that does
    not fit, or a malformed row, raises `RecordError` naming the file. Returns a
    ``pyarrow.Table`` of ``batch_size`` rows per call.

    >>> import pathlib, tempfile
    >>> file = pathlib.Path(tempfile.mkdtemp()) / "rows.csv"
    >>> _ = file.write_text("id;name\\n1;a\\n2;b\\n")
    >>> CSVSource({"path": str(file), "delimiter": ";"}).run()
    [{'id': 1, 'name': 'a'}, {'id': 2, 'name': 'b'}]
    """

    class Config(OperatorConfig):
        path: PathStr
        batch_size: BatchSize = 1000
        delimiter: str = ","

        @field_validator("delimiter")
        @classmethod
        def _one_character(cls, value: str) -> str:
            if len(value) != 1 or value in "\r\n":
                raise PydanticCustomError("delimiter", "must be one character other than a line break")
            return value

    cfg: Config

    def _open(self) -> Iterator[pa.Table]:
        from pyarrow import csv

        file = self._existing(self.cfg.path, directory=False)
        try:
            reader = csv.open_csv(file, parse_options=csv.ParseOptions(delimiter=self.cfg.delimiter))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
            raise self._error(file, exc) from None
        return self._read(reader, file)

    def _read(self, reader: Any, file: Path) -> Iterator[pa.Table]:
        def batches() -> Iterator[pa.RecordBatch]:
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
                    raise self._error(file, exc) from None
                yield batch

        try:
            yield from _rebatch(batches(), self.cfg.batch_size)
        finally:
            reader.close()

    def _error(self, file: Path, exc: Exception) -> RecordError:
        return RecordError(f"{self.name}: {file}: {exc}", operator=self.name, file=str(file))


# --------------------------------------------------------------------------- Parquet


class ParquetSource(_FileSource):
    """Rows of a Parquet file, or of every ``*.parquet`` file under a directory (sorted).

    ``columns`` (optional) selects columns; one a file lacks raises `ConfigError` naming
    the key and the file. Returns a ``pyarrow.Table`` of at most ``batch_size`` rows per
    call (a batch never spans two files, whose schemas may differ). A directory written by
    `ParquetSink` reads back with this source.

    >>> import pathlib, tempfile, pyarrow.parquet as pq
    >>> file = pathlib.Path(tempfile.mkdtemp()) / "rows.parquet"
    >>> pq.write_table(pa.table({"id": [1, 2], "text": ["a", "b"]}), file)
    >>> ParquetSource({"path": str(file), "columns": ["text"]}).run()
    [{'text': 'a'}, {'text': 'b'}]
    """

    class Config(OperatorConfig):
        path: PathStr
        batch_size: BatchSize = 1000
        columns: list[str] | None = None

    cfg: Config

    def _open(self) -> Iterator[pa.Table]:
        files = self._files(self.cfg.path, ".parquet")
        # The first file is opened (and its columns checked) now, so a wrong path, a file that
        # is not Parquet or a misspelt column fails at setup; the others are opened one by one.
        first = self._parquet(files[0]) if files else None
        return self._read(files, first)

    def _parquet(self, file: Path) -> Any:
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(file)
        except (pa.ArrowInvalid, OSError) as exc:
            raise self._error(file, exc) from None
        names = parquet.schema_arrow.names
        missing = [c for c in self.cfg.columns or [] if c not in names]
        if missing:
            parquet.close()
            raise ConfigError(
                f"{self.name}: config key 'columns': {file} has no column {missing[0]!r} (its columns: {names})",
                operator=self.name,
                field="columns",
                file=str(file),
            )
        return parquet

    def _read(self, files: list[Path], first: Any) -> Iterator[pa.Table]:
        size = self.cfg.batch_size
        for index, file in enumerate(files):
            parquet = first if index == 0 else self._parquet(file)
            try:
                batches = parquet.iter_batches(batch_size=size, columns=self.cfg.columns)
                yield from _rebatch(self._guard(batches, file), size)
            finally:
                parquet.close()

    def _guard(self, batches: Iterator[pa.RecordBatch], file: Path) -> Iterator[pa.RecordBatch]:
        try:
            yield from batches
        except (pa.ArrowInvalid, OSError) as exc:
            raise self._error(file, exc) from None

    def _error(self, file: Path, exc: Exception) -> RecordError:
        return RecordError(f"{self.name}: {file}: {exc}", operator=self.name, file=str(file))


# --------------------------------------------------------------------------- text directory

_HEADING = re.compile(r"^ {0,3}# +(.*?)(?: +#+)? *$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def markdown_title(text: str) -> str | None:
    """The first level-one ATX heading (``# Title``) of ``text`` outside code fences, or None.

    >>> markdown_title("intro\\n```\\n# not a title\\n```\\n#  Getting started ##\\n")
    'Getting started'
    >>> markdown_title("## Only a subheading") is None
    True
    """
    fence: str | None = None
    for line in text.splitlines():
        opened = _FENCE.match(line)
        if fence is not None:
            if opened and opened.group(1) == fence:
                fence = None
            continue
        if opened:
            fence = opened.group(1)
            continue
        match = _HEADING.match(line.rstrip())
        if match and match.group(1).strip():
            return match.group(1).strip()
    return None


class TextDirectorySource(_FileSource):
    """One document record per text file under a directory, sorted by ``doc_id``.

    Config: ``path`` (the directory), ``patterns`` (globs relative to it; default
    ``["**/*.md", "**/*.txt"]``), ``batch_size`` (records per call; default 256) and
    ``encoding`` (default ``"utf-8``; a UTF-8 byte-order mark is dropped). Records:

    - ``doc_id``: the file's path relative to the directory, POSIX style (``"guide/intro.md"``);
    - ``path``: the file's absolute path;
    - ``title``: the first ``# `` heading (`markdown_title`), else the file name's stem;
    - ``text``: the decoded file;
    - ``content_hash``: the SHA-256 (hex) of the file's bytes.

    The file list is taken in ``setup()`` and files are read ``batch_size`` at a time. A file
    that does not decode raises `RecordError` naming it; a missing directory raises
    `ConfigError` (key ``path``).

    >>> import pathlib, tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (root / "notes.txt").write_text("plain")
    >>> _ = (root / "a.md").write_text("# Alpha\\nbody")
    >>> [(r["doc_id"], r["title"]) for r in TextDirectorySource({"path": str(root)}).run()]
    [('a.md', 'Alpha'), ('notes.txt', 'notes')]
    """

    class Config(OperatorConfig):
        path: PathStr
        patterns: list[str] = Field(default_factory=lambda: ["**/*.md", "**/*.txt"], min_length=1)
        batch_size: BatchSize = 256
        encoding: str = "utf-8"

        @field_validator("patterns")
        @classmethod
        def _relative_patterns(cls, value: list[str]) -> list[str]:
            for pattern in value:
                if not pattern or Path(pattern).is_absolute() or ".." in Path(pattern).parts:
                    raise PydanticCustomError(
                        "pattern",
                        "pattern '{pattern}' must be a non-empty glob relative to 'path'",
                        {"pattern": pattern},
                    )
            return value

        @field_validator("encoding")
        @classmethod
        def _known_encoding(cls, value: str) -> str:
            try:
                codecs.lookup(value)
            except LookupError:
                raise PydanticCustomError("encoding", "unknown text encoding") from None
            return value

    cfg: Config

    def _documents(self) -> list[tuple[str, Path]]:
        root = self._existing(self.cfg.path, directory=True)
        found: dict[str, Path] = {}
        for pattern in self.cfg.patterns:
            for file in root.glob(pattern):
                if file.is_file():
                    found.setdefault(file.relative_to(root).as_posix(), file)
        return sorted(found.items())

    def document_ids(self) -> list[str]:
        """The ``doc_id`` of every file the source would read, sorted, without reading them."""
        return [doc_id for doc_id, _ in self._documents()]

    def document_hashes(self) -> dict[str, str]:
        """``{doc_id: content_hash}`` of every file the source would read (reads the bytes, not the text)."""
        return {doc_id: hashlib.sha256(file.read_bytes()).hexdigest() for doc_id, file in self._documents()}

    def _open(self) -> Iterator[list[Record]]:
        return self._read(self._documents())

    def _read(self, files: list[tuple[str, Path]]) -> Iterator[list[Record]]:
        size = self.cfg.batch_size
        for offset in range(0, len(files), size):
            yield [self._document(doc_id, file) for doc_id, file in files[offset : offset + size]]

    def _document(self, doc_id: str, file: Path) -> Record:
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise RecordError(
                f"{self.name}: {file}: cannot be read: {exc}", operator=self.name, file=str(file)
            ) from None
        encoding = self.cfg.encoding
        if codecs.lookup(encoding).name == "utf-8" and data.startswith(codecs.BOM_UTF8):
            encoding = "utf-8-sig"
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError as exc:
            raise RecordError(
                f"{self.name}: {file}: does not decode as {self.cfg.encoding} "
                f"({exc.reason} at byte {exc.start}); set 'encoding' or narrow 'patterns'",
                operator=self.name,
                file=str(file),
            ) from None
        return {
            "doc_id": doc_id,
            "path": str(file),
            "title": markdown_title(text) or file.stem,
            "text": text,
            "content_hash": hashlib.sha256(data).hexdigest(),
        }
