"""`ffchat ppl`: score a text file with a stored model's original or INT4 weights."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ffchat import runtime
from ffchat.config import ModelConfig
from ffchat.errors import FfchatError
from ffchat.int4 import artifact_dir, has_int4
from ffchat.model import Transformer
from ffchat.perplexity import perplexity
from ffchat.quantize.artifact import read_manifest
from ffchat.quantize.layout import choose_group_size
from ffchat.store import ModelRecord
from ffchat.tokenizer import Tokenizer


def read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise FfchatError(f"no such file: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise FfchatError(f"cannot read {path} as UTF-8 text: {exc}") from exc


def score_file(
    record: ModelRecord,
    path: Path,
    *,
    int4: bool | None,
    window: int,
    stride: int | None,
    device: str | None,
    dtype: str,
    console: Console,
    int8_activations: bool = False,
) -> float:
    """Perplexity of ``path`` under the model; ``int4`` None means INT4 when the model has it.

    ``int8_activations``: emulate the triton-w4a8 backend (``Transformer(int8_activation_group=...)``)
    with the activation groups that mode uses, those of the INT4 weights.
    """
    text = read_text(path)
    config = ModelConfig.from_file(record.model_dir / "config.json")
    tokens = Tokenizer.from_dir(record.model_dir).encode_raw(text)
    window = min(window, config.max_position_embeddings, len(tokens))
    stride = stride or max(1, window // 2)
    use_int4 = has_int4(record) if int4 is None else int4
    torch_device = runtime.choose_device(device, console)
    torch_dtype = runtime.choose_dtype(dtype, torch_device)
    if int8_activations and not use_int4:
        raise FfchatError("--int8-activations scores the INT4 weights", hint="leave out --fp16")
    state, label = runtime.load_weights(record, torch_dtype, int4=use_int4)
    group = None
    if int8_activations:  # the W4A8 GEMVs quantize x in the weights' groups along K = hidden
        group = choose_group_size(config.hidden_size, int(read_manifest(artifact_dir(record))["group_size"]))
        label += f", int8 activations g{group}"
    model = Transformer(config, window, dtype=torch_dtype, device=torch_device, int8_activation_group=group)
    model.load_state_dict(state)
    del state
    console.print(f"scoring {len(tokens):,} tokens of {path.name} with {record.name} ({label}), window {window}, stride {stride}")
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} tokens"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("perplexity", total=len(tokens) - 1)
        return perplexity(
            model.forward, tokens, window=window, stride=stride,
            progress=lambda done, total: progress.update(task, completed=done),
        )
