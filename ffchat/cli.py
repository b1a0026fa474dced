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
from rich.markup import escape
from rich.table import Table

from ffchat import DEFAULT_MODEL, __version__
from ffchat.describe import human_size
from ffchat.errors import FfchatError
from ffchat.store import Store

app = typer.Typer(
    name="ffchat",
    help="Fast local LLM chat on one GPU: pull a model, quantize it to INT4, chat with it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err = Console(stderr=True, highlight=False, soft_wrap=True)
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


@app.command()
def pull(
    model: str = typer.Argument(..., help="A Hub repo id (org/name), a local Hugging Face folder, or a .gguf file."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit on the Hub (default: main)."),
    token: Optional[str] = typer.Option(None, "--token", help="Hugging Face token for gated or private repos (default: HF_TOKEN or the saved login)."),
    name: Optional[str] = typer.Option(None, "--name", help="Name to store the model under (default: the repo id, or the folder or file name)."),
) -> None:
    """Download a model from the Hugging Face Hub, or import a local folder or GGUF file.

    Hub downloads go to the shared Hugging Face cache (HF_HOME); run the same
    command again to resume an interrupted one. Local imports are not copied.
    """
    from ffchat.pull import pull_model

    record = pull_model(Store(), model, revision=revision, token=token, name=name, console=err)
    err.print(f"pulled [bold]{escape(record.name)}[/] ({human_size(record.size)})")


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
        source = f"{record.source}: {record.repo_id or record.location}"
        table.add_row(escape(record.name), escape(source), human_size(record.size), escape(quantization_label(record)))
    _stdout().print(table)


@app.command()
def show(model: str = typer.Argument(..., help="Model name (see `ffchat list`).")) -> None:
    """Show a model's architecture, size, chat template and files."""
    from ffchat.describe import describe

    record = Store().get(model)
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in describe(record):
        table.add_row(key, escape(value))
    _stdout().print(table)


def _stdout() -> Console:
    """Where tables go: the terminal's width, or unwrapped lines when piped (for grep and scripts)."""
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 10_000)


@app.command()
def rm(
    model: str = typer.Argument(..., help="Model name (see `ffchat list`)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    purge: bool = typer.Option(False, "--purge", help="Also delete the downloaded files from the shared Hugging Face cache."),
) -> None:
    """Remove a model from ffchat's store (with --purge, also its files in the Hugging Face cache)."""
    from ffchat.pull import purge_hub_cache

    store = Store()
    record = store.get(model)
    purge_cache = purge and record.source == "hub"
    what = record.name + (" and its files in the Hugging Face cache" if purge_cache else "")
    if not yes:
        if not sys.stdin.isatty():
            raise FfchatError(f"not removing {record.name} without confirmation", hint="pass --yes")
        if not typer.confirm(f"Remove {what}?", default=False, err=True):
            err.print("nothing removed")
            raise typer.Exit(1)
    if purge_cache:
        sharing = [r.name for r in store.list() if r.commit == record.commit and r.record_dir != record.record_dir]
        if sharing:
            what = record.name
            err.print(f"keeping the Hugging Face cache files: {escape(', '.join(sharing))} uses them too")
        elif not purge_hub_cache(record):
            err.print("the Hugging Face cache had no files for it")
    elif purge:
        err.print(f"nothing to purge: {escape(record.name)} is a {record.source} import, not a Hub download")
    store.remove(record)
    err.print(f"removed {escape(what)}")


@app.command()
def quantize(
    model: str = typer.Argument(..., help="Model name (see `ffchat list`)."),
    method: str = typer.Option("wmse", "--method", help="wmse (scales and zeros fitted to the model's activations) or rtn (round to nearest)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Weights per scale/zero (default 128; 32 for a Q4_0/Q4_1 GGUF, whose blocks are then kept exactly); falls back to 64, 32... where a dimension is not a multiple."),
    keep_head_fp16: bool = typer.Option(False, "--keep-head-fp16", help="Leave the LM head unquantized."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: the GPU when there is one)."),
) -> None:
    """Quantize a model's weights to INT4 once, offline; `ffchat run` then uses them."""
    from ffchat.int4 import artifact_dir, quantize_model
    from ffchat.quantize.methods import get_method

    get_method(method)
    record = Store().get(model)
    manifest = quantize_model(
        record, method=method, group_size=group_size, keep_head_fp16=keep_head_fp16, console=err, device=device
    )
    if manifest.get("group_size_reason"):
        err.print(f"group size {manifest['group_size']}: {manifest['group_size_reason']}")
    exact = len(manifest.get("exact", []))
    kept = f", {exact} kept exactly from the GGUF" if exact else ""
    size = sum(f.stat().st_size for f in artifact_dir(record).iterdir())
    err.print(
        f"quantized {escape(record.name)} with {method} (group size {manifest['group_size']}, "
        f"{len(manifest['int4_tensors'])} INT4 tensors{kept}, LM head {manifest['lm_head']}) "
        f"in {manifest['seconds']:.1f} s: {human_size(size)}"
    )


@app.command()
def ppl(
    model: str = typer.Argument(..., help="Model name (see `ffchat list`)."),
    file: Path = typer.Option(..., "--file", help="Text file to score (UTF-8)."),
    int4: bool = typer.Option(False, "--int4", help="Score the INT4 weights (the default when the model has them)."),
    fp16: bool = typer.Option(False, "--fp16", help="Score the original weights."),
    window: int = typer.Option(1024, "--window", help="Tokens per window (capped at the model's context)."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Tokens between window starts (default: half the window)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, fp16 or bf16."),
    int8_activations: bool = typer.Option(False, "--int8-activations", help="Round the inputs of gate/up and the LM head to int8 per group, as `--backend triton-w4a8` does."),
) -> None:
    """Perplexity of a model over a text file, to show what quantization costs."""
    from ffchat.scoring import score_file

    if int4 and fp16:
        raise FfchatError("choose one of --int4 and --fp16")
    value = score_file(Store().get(model), file, int4=None if not (int4 or fp16) else int4, window=window,
                       stride=stride, device=device, dtype=dtype, int8_activations=int8_activations, console=err)
    print(f"perplexity {value:.3f}")


@app.command()
def run(
    model: str = typer.Argument(DEFAULT_MODEL, help="Model name (see `ffchat list`) or Hub repo id; pulled on first use."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Answer this one message and exit."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    each_line: bool = typer.Option(False, "--each-line", help="Piped: answer every input line as its own message."),
    as_json: bool = typer.Option(False, "--json", help="Piped: one JSON object per answer (text, token counts, timing)."),
    raw: bool = typer.Option(False, "--raw", help="No chat template: plain text completion."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print timing after each answer (stderr)."),
    backend: str = typer.Option("auto", "--backend", help="auto (on a GPU with INT4 weights: the megakernel where tuning measured it faster, else triton; else reference), reference, triton, triton-w4a8 (int8 activations for gate/up and the LM head: faster, lossy; see `ffchat ppl --int8-activations`), or megakernel (the whole decode step in one persistent launch)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when there is a GPU)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, fp16 or bf16."),
    fp16: bool = typer.Option(False, "--fp16", help="Use the original weights even when INT4 weights exist."),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="Context length in tokens (default: the model's, capped to fit memory)."),
    tune: bool = typer.Option(True, "--tune/--no-tune", help="On the first run of a model shape on this GPU, tune the kernels first (about a minute for a 1B model; cached, as `ffchat tune` does)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="0 for greedy decoding."),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    min_p: Optional[float] = typer.Option(None, "--min-p"),
    repeat_penalty: Optional[float] = typer.Option(None, "--repeat-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", "-n", help="Stop after this many new tokens."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
) -> None:
    """Chat with a model: interactive in a terminal, one answer per input when piped."""
    from ffchat.launch import ChatOptions, launch_chat

    options = ChatOptions(
        prompt=prompt, system=system, each_line=each_line, as_json=as_json, raw=raw, verbose=verbose,
        backend=backend, device=device, dtype=dtype, fp16=fp16, ctx=ctx, tune=tune, stop=stop,
        sampling=dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                      repeat_penalty=repeat_penalty, seed=seed, max_tokens=max_tokens),
    )
    launch_chat(Store(), model, options, err)


@app.command()
def bench(
    model: Optional[str] = typer.Argument(None, help="A stored model (see `ffchat list`) instead of a --shape."),
    shape: Optional[str] = typer.Option(None, "--shape", help="A real model shape with seeded random weights: "
                                        "llama-3.2-1b (default), llama-3.1-8b, qwen2.5-0.5b; tiny, tiny-qwen for a smoke test."),
    backends: Optional[str] = typer.Option(None, "--backends", help="Comma-separated backends to measure: triton, triton-w4a8, megakernel, torch-compile (the baseline), reference (default: triton, torch-compile, reference)."),
    contexts: str = typer.Option("128,512,2048", "--contexts", help="Tokens in the KV cache for the decode timings."),
    prompt: int = typer.Option(512, "--prompt", help="Prompt tokens for prefill speed and time to first token."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write every figure to this JSON file."),
    int4: bool = typer.Option(True, "--int4/--bf16", help="INT4 weights (group 128), or everything unquantized in bf16."),
    steps: int = typer.Option(100, "--steps", help="Timed decode steps per context."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights and tokens."),
    tune: bool = typer.Option(True, "--tune/--no-tune", help="Tune the kernels for the shape first where this GPU has not (as the first `ffchat run` does), so the figures are the ones a user gets."),
    ctx: Optional[str] = typer.Option(None, "--ctx", help="KV cache of ffchat's backends in tokens, or 'max': the model's maximum, what `ffchat run` allocates where memory allows (default: the largest context timed; the baseline's static cache always is)."),
) -> None:
    """Decode and prefill speed of each backend against the GPU's copy-bandwidth roofline (needs a GPU)."""
    from ffchat.bench import DEFAULT_BACKENDS, BenchOptions, parse_backends, parse_cache, parse_contexts, run_bench

    options = BenchOptions(model=model, shape=shape, backends=parse_backends(backends) if backends else DEFAULT_BACKENDS,
                           contexts=parse_contexts(contexts), prompt=prompt, int4=int4, seed=seed, steps=steps,
                           json_path=json_path, tune=tune, cache=parse_cache(ctx))
    run_bench(options, _stdout(), err)


@app.command()
def tune(
    model: Optional[str] = typer.Argument(None, help="A stored, quantized model (see `ffchat list`) instead of a --shape."),
    shape: Optional[str] = typer.Option(None, "--shape", help="A benchmark shape (llama-3.2-1b, llama-3.1-8b, "
                                        "qwen2.5-0.5b, ...) at INT4 group 128."),
) -> None:
    """Time the decode kernels' tiles for a model on this GPU and cache the fastest (needs a GPU)."""
    from ffchat.tune import run_tune

    run_tune(model, shape, _stdout(), err)


def main() -> None:
    """Console entry point: run the app and turn user errors and Ctrl+C into one line."""
    try:
        app()
    except FfchatError as exc:
        if _debug:
            raise
        err.print(f"[red]error:[/] {escape(_one_line(exc))}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, SystemExit) as exc:
        interrupt = _interrupt_behind(exc)
        if interrupt is None:
            raise
        if _debug:
            raise interrupt
        err.print("interrupted" + (f": {escape(_one_line(interrupt))}" if str(interrupt) else ""), soft_wrap=True)
        sys.exit(130)


def _interrupt_behind(exc: BaseException | None) -> KeyboardInterrupt | None:
    """The Ctrl+C itself, or the one behind an exit with status 130: typer turns a Ctrl+C in a command into that."""
    if isinstance(exc, SystemExit) and exc.code != 130:
        return None
    while exc is not None and not isinstance(exc, KeyboardInterrupt):
        exc = exc.__cause__ or exc.__context__
    return exc


def _one_line(exc: BaseException) -> str:
    """An error message on one line, whatever the exception carried."""
    return " ".join(str(exc).split())
