"""Turn a stored model into a ready backend: device, dtype, context size, backend choice.

These are the decisions `ffchat run` (and later `bench` and `ppl`) make before
the first token, gathered here so every command makes them the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from rich.console import Console

from ffchat.config import ModelConfig
from ffchat.errors import FfchatError
from ffchat.store import ModelRecord, Store

BACKENDS = ("auto", "reference", "triton", "triton-w4a8", "megakernel")
# triton-w4a8: int8 activations for gate/up and the LM head; megakernel: the decode step in one launch
TRITON_BACKENDS = ("triton", "triton-w4a8", "megakernel")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Share of free memory (after the weights) the KV cache may take by default.
KV_CACHE_MEMORY_SHARE = 0.5


@dataclass
class RuntimeChoice:
    device: torch.device
    dtype: torch.dtype
    context_length: int
    backend: str
    automatic: bool = False  # chosen by ``auto``: a megakernel that fails its start-up check falls back to triton


def resolve_model(store: Store, name: str, console: Console) -> ModelRecord:
    """Find a model in the store, pulling a Hub repo id (org/name) on first use."""
    record = store.find(name)
    if record is not None:
        return record
    if "/" in name and not os.path.exists(name):
        from ffchat.pull import pull_model

        console.print(f"{name} is not in the store yet: pulling it")
        return pull_model(store, name, console=console)
    raise FfchatError(f"model {name!r} not found", hint=f"run `ffchat pull {name}` first, or see `ffchat list`")


def choose_device(requested: str | None, console: Console) -> torch.device:
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise FfchatError(f"--device {requested}: no CUDA GPU is available")
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    console.print("no GPU found: running on the CPU (slower)")
    return torch.device("cpu")


def choose_dtype(requested: str | None, device: torch.device, backend: str = "reference") -> torch.dtype:
    """bf16 on a GPU that has it, else fp16; fp32 on the CPU, except for the Triton kernels (16-bit only)."""
    if requested in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if backend in TRITON_BACKENDS else torch.float32
    if requested not in DTYPES:
        raise FfchatError(f"unknown dtype {requested!r}; choose one of: auto, {', '.join(DTYPES)}")
    if backend in TRITON_BACKENDS and DTYPES[requested] == torch.float32:
        raise FfchatError("the triton backend computes in fp16 or bf16", hint="use --dtype bf16, or --backend reference")
    return DTYPES[requested]


def kv_cache_bytes(config: ModelConfig, tokens: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * tokens * element


def weight_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    return config.num_parameters * torch.empty((), dtype=dtype).element_size()


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_context(
    config: ModelConfig, requested: int | None, device: torch.device, dtype: torch.dtype, console: Console
) -> int:
    """The model's context (or --ctx), capped so the KV cache fits in memory, with a notice when capped."""
    limit = config.max_position_embeddings
    if requested is not None:
        if requested < 16:
            raise FfchatError(f"--ctx {requested} is too small (at least 16 tokens)")
        if requested > limit:
            raise FfchatError(f"--ctx {requested} exceeds the model's maximum context of {limit} tokens")
        return requested
    budget = (free_memory(device) - weight_bytes(config, dtype)) * KV_CACHE_MEMORY_SHARE
    per_token = kv_cache_bytes(config, 1, dtype)
    affordable = int(budget // per_token) if budget > 0 else 0
    if affordable >= limit:
        return limit
    capped = max(256, affordable // 256 * 256)
    console.print(
        f"context capped at {capped} tokens (model allows {limit}) to fit the KV cache in memory; "
        "use --ctx to choose"
    )
    return capped


def choose_backend(requested: str, device: torch.device, config: ModelConfig, *, int4: bool,
                   group_size: int | None = None) -> str:
    """``auto``: on a CUDA GPU with INT4 weights (of ``group_size``) the kernels support, the megakernel where
    `ffchat tune` measured it faster than the Triton backend on this GPU, else the Triton backend; elsewhere
    the reference engine."""
    if requested not in BACKENDS:
        raise FfchatError(f"unknown backend {requested!r}; choose one of: {', '.join(BACKENDS)}")
    if requested == "reference" or (requested == "auto" and (device.type != "cuda" or not int4)):
        return "reference"
    from ffchat.triton_backend import unsupported_reason  # imports Triton: only where it may run

    reason = unsupported_reason(config)
    if requested == "auto":
        return "reference" if reason else "megakernel" if megakernel_tuned_faster(device, config, group_size) \
            else "triton"
    if reason:
        raise FfchatError(f"the {requested} backend cannot run this model: {reason}", hint="use --backend reference")
    if not int4:
        raise FfchatError(f"the {requested} backend runs INT4 weights",
                          hint="run `ffchat quantize MODEL` first (and leave out --fp16)")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise FfchatError(f"the {requested} backend needs a CUDA GPU", hint="use --backend reference on the CPU")
    return requested


def megakernel_tuned_faster(device: torch.device, config: ModelConfig, group_size: int | None) -> bool:
    """Whether this GPU's tuning of this shape timed the megakernel's decode step below the Triton backend's."""
    if group_size is None:
        return False
    from ffchat.profiles import GpuIdentity
    from ffchat.tuning_cache import load_tuning

    tuning = load_tuning(GpuIdentity.of(device), config, group_size)
    return bool(tuning and tuning.megakernel and tuning.megakernel.faster)


def load_weights(record: ModelRecord, dtype: torch.dtype, *, int4: bool) -> tuple[dict, str]:
    """The state dict to run (the INT4 artifact dequantized, or the original) and a label for it."""
    if int4:
        from ffchat.int4 import load_int4_state_dict

        state, manifest = load_int4_state_dict(record, dtype)
        return state, f"int4 {manifest['method']} g{manifest['group_size']}"
    from ffchat.weights import load_state_dict

    return load_state_dict(record, dtype=dtype), str(dtype).removeprefix("torch.")


def load_backend(record: ModelRecord, choice: RuntimeChoice, *, int4: bool, notice=print):
    """Build the chosen backend over the record's weights; return (backend, a label for the weights).

    A megakernel ``auto`` chose that fails its start-up check gives way to the Triton backend, with a notice.
    """
    if choice.backend in TRITON_BACKENDS:
        from ffchat.shapes import stored_weights
        from ffchat.triton_backend import TritonBackend

        weights = stored_weights(record, int4=True, device=choice.device)
        backend = None
        if choice.backend == "megakernel":
            from ffchat.megakernel_backend import MegakernelBackend

            try:
                backend = MegakernelBackend(weights, choice.context_length, dtype=choice.dtype)
            except FfchatError as exc:
                if not choice.automatic:
                    raise
                notice(f"{exc}: running the triton backend instead")
        if backend is None:
            backend = TritonBackend(weights, choice.context_length, dtype=choice.dtype,
                                    int8_activations=choice.backend == "triton-w4a8")
        backend.warm_up()  # while loading, not inside the first answer
        return backend, f"int4 {weights.quantizer} g{weights.group_size}"
    from ffchat.model import Transformer
    from ffchat.reference_backend import ReferenceBackend

    state, label = load_weights(record, choice.dtype, int4=int4)
    config = ModelConfig.from_file(record.model_dir / "config.json")
    model = Transformer(config, choice.context_length, dtype=choice.dtype, device=choice.device)
    model.load_state_dict(state)
    return ReferenceBackend(model), label
