"""The `ffchat` command line: Ollama's vocabulary (pull, run, list, show, rm).

Commands stay thin: they parse options and call the module that does the job.
User errors (``FfchatError``) become one line on stderr and a non-zero exit;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ffchat import __version__
from ffchat.errors import FfchatError, NotYetImplemented
from ffchat.store import Store

app = typer.Typer(
    name="ffchat",
    help="Fast local LLM chat on one GPU: pull a model, quantize it to INT4, chat with it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err = Console(stderr=True, highlight=False)
_debug = False


def _version(value: bool) -> None:
    if value:
        print(f"ffchat {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    global _debug
    _debug = debug


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


@app.command()
def pull(
    model: str = typer.Argument(..., help="A Hub repo id (org/name), a local Hugging Face folder, or a .gguf file."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit on the Hub."),
    token: Optional[str] = typer.Option(None, "--token", help="Hugging Face token for gated or private repos (default: HF_TOKEN or the saved login)."),
    name: Optional[str] = typer.Option(None, "--name", help="Name to store a local import under."),
) -> None:
    """Download a model from the Hugging Face Hub, or import a local folder or GGUF file."""
    from ffchat.pull import pull_model

    record = pull_model(Store(), model, revision=revision, token=token, name=name, console=err)
    err.print(f"pulled [bold]{record.name}[/] ({human_size(record.size)})")


@app.command("list")
def list_models() -> None:
    """List the models in the store."""
    from ffchat.describe import quantization_label

    records = Store().list()
    if not records:
        err.print("no models yet: try `ffchat pull HuggingFaceTB/SmolLM2-135M-Instruct`")
        return
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "SOURCE", "SIZE", "QUANTIZED"):
        table.add_column(column)
    for record in records:
        source = record.repo_id or record.location
        table.add_row(record.name, f"{record.source}: {source}", human_size(record.size), quantization_label(record))
    Console(highlight=False, soft_wrap=True).print(table)


@app.command()
def show(model: str = typer.Argument(..., help="Model name (see `ffchat list`).")) -> None:
    """Show a model's architecture, size, chat template and files."""
    from ffchat.describe import describe

    record = Store().get(model)
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in describe(record):
        table.add_row(key, value)
    Console(highlight=False, soft_wrap=True).print(table)


@app.command()
def rm(
    model: str = typer.Argument(..., help="Model name (see `ffchat list`)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    purge: bool = typer.Option(False, "--purge", help="Also delete the downloaded files from the shared Hugging Face cache."),
) -> None:
    """Remove a model from ffchat's store (and with --purge, its Hugging Face cache files)."""
    from ffchat.pull import purge_hub_cache

    store = Store()
    record = store.get(model)
    what = f"{record.name}" + (" and its files in the Hugging Face cache" if purge and record.source == "hub" else "")
    if not yes:
        if not sys.stdin.isatty():
            raise FfchatError(f"not removing {record.name} without confirmation", hint="pass --yes")
        if not typer.confirm(f"Remove {what}?", default=False, err=True):
            raise typer.Exit(1)
    if purge and record.source == "hub":
        purge_hub_cache(record)
    store.remove(record)
    err.print(f"removed {what}")


@app.command()
def quantize(model: str = typer.Argument(..., help="Model name (see `ffchat list`).")) -> None:
    """Quantize a model's weights to INT4 once, offline."""
    raise NotYetImplemented("`ffchat quantize` is not available yet")


@app.command()
def run(model: str = typer.Argument("HuggingFaceTB/SmolLM2-135M-Instruct", help="Model name or Hub repo id.")) -> None:
    """Chat with a model: interactive in a terminal, one answer per input when piped."""
    raise NotYetImplemented("`ffchat run` is not available yet")


def main() -> None:
    """Console entry point: run the app and turn user errors into one line."""
    try:
        app()
    except FfchatError as exc:
        if _debug:
            raise
        err.print(f"[red]error:[/] {exc}", markup=True, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        if _debug:
            raise
        err.print("interrupted")
        sys.exit(130)
