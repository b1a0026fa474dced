"""Everything `ffchat run` does before the first message: model, backend, tokenizer, mode."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.prompt import Confirm

from ffchat.errors import FfchatError
from ffchat.store import Store


@dataclass
class ChatOptions:
    prompt: str | None = None
    system: str | None = None
    each_line: bool = False
    as_json: bool = False
    raw: bool = False
    verbose: bool = False
    backend: str = "auto"
    device: str | None = None
    dtype: str = "auto"
    fp16: bool = False  # run the original weights even when an INT4 artifact exists
    ctx: int | None = None
    tune: bool = True  # tune the kernels on the first run of a shape on this GPU
    stop: list[str] = field(default_factory=list)
    sampling: dict = field(default_factory=dict)  # CLI overrides; None means "not given"


def piped_inputs(options: ChatOptions) -> list[str] | None:
    """The messages to answer non-interactively, or None for an interactive chat."""
    if options.prompt is not None:
        return [options.prompt]
    if sys.stdin.isatty():
        return None
    text = sys.stdin.read()
    if options.each_line:
        messages = [line for line in text.splitlines() if line.strip()]
    else:
        messages = [text.strip("\n")] if text.strip() else []
    if not messages:
        raise FfchatError("no input on stdin", hint="pipe a message in, or pass --prompt")
    return messages


def sampling_params(model_dir, options: ChatOptions):
    from ffchat.sampling import SamplingParams

    path = model_dir / "generation_config.json"
    generation_config = json.loads(path.read_text()) if path.is_file() else {}
    params = SamplingParams.from_generation_config(generation_config)
    for key, value in options.sampling.items():
        if value is not None:
            params.set(key, str(value))
    for stop in options.stop:
        params.set("stop", stop)
    return params


def load_backend(record, choice, *, use_int4: bool, interactive: bool, err: Console):
    """The backend over INT4 weights when the model has an artifact (unless --fp16), offering to redo a stale one."""
    from ffchat import runtime

    try:
        return runtime.load_backend(record, choice, int4=use_int4, notice=err.print)
    except FfchatError as exc:
        if not (use_int4 and interactive and Confirm.ask(escape(str(exc)) + ". Re-quantize now?", console=err,
                                                         default=False)):
            raise
    from ffchat.int4 import quantize_model
    from ffchat.quantize.methods import DEFAULT_METHOD

    quantize_model(record, method=DEFAULT_METHOD, group_size=None, keep_head_fp16=False, console=err)
    return runtime.load_backend(record, choice, int4=True, notice=err.print)


def launch_chat(store: Store, model: str, options: ChatOptions, err: Console) -> None:
    from ffchat import runtime
    from ffchat.chat import InteractiveChat, run_piped
    from ffchat.config import ModelConfig
    from ffchat.describe import int4_group_size
    from ffchat.generate import Generator
    from ffchat.int4 import has_int4
    from ffchat.session import ChatSession
    from ffchat.tokenizer import Tokenizer
    from ffchat.tune import tune_if_untuned

    inputs = piped_inputs(options)
    quiet = inputs is not None
    notice = err.print
    record = runtime.resolve_model(store, model, err)
    config = ModelConfig.from_file(record.model_dir / "config.json")
    tokenizer = Tokenizer.from_dir(record.model_dir)
    params = sampling_params(record.model_dir, options)
    device = runtime.choose_device(options.device, err)
    use_int4 = not options.fp16 and has_int4(record)
    group_size = int4_group_size(record) if use_int4 else None
    backend_name = runtime.choose_backend(options.backend, device, config, int4=use_int4, group_size=group_size)
    if options.tune and device.type == "cuda" and backend_name in runtime.TRITON_BACKENDS and group_size:
        megakernel = options.backend in ("auto", "megakernel")
        if tune_if_untuned(record.name, config, group_size, device, err, megakernel=megakernel):
            backend_name = runtime.choose_backend(options.backend, device, config, int4=use_int4,
                                                  group_size=group_size)
    dtype = runtime.choose_dtype(options.dtype, device, backend_name)
    choice = runtime.RuntimeChoice(
        device=device,
        dtype=dtype,
        context_length=runtime.choose_context(config, options.ctx, device, dtype, err),
        backend=backend_name,
        automatic=options.backend == "auto",
    )
    backend, weights_label = load_backend(record, choice, use_int4=use_int4, interactive=not quiet, err=err)
    if not quiet:
        err.print(f"loaded [bold]{record.name}[/] ({weights_label}) on {device}, {backend.name} backend")
    session = ChatSession(
        Generator(backend, tokenizer), tokenizer, params, system=options.system, raw=options.raw, notice=notice
    )
    if quiet:
        run_piped(session, inputs, as_json=options.as_json, verbose=options.verbose, err=err, model=record.name,
                  backend=backend.name)
        return

    def describe() -> list[tuple[str, str]]:
        return [
            ("model", record.name),
            ("backend", backend.name),
            ("weights", weights_label),
            ("device", f"{device} ({str(dtype).removeprefix('torch.')})"),
            ("context", f"{choice.context_length} tokens"),
        ]

    import readline  # noqa: F401  (line editing and history for input())

    InteractiveChat(session, err, describe, verbose=options.verbose).run()
