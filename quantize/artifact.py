"""The INT4 artifact: a model's quantized state dict plus a manifest, in one directory.

``model.safetensors`` holds ``NAME.qweight`` / ``NAME.scales`` / ``NAME.zeros``
for every INT4 linear (NAME = the Hugging Face weight name without ``.weight``)
and every other tensor as-is in fp16/bf16; ``manifest.yaml`` says how it was
made. A directory is written beside the target and renamed into place, so a
reader never sees a half-written artifact. Layout: quantize/README.md.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ffchat import __version__
from ffchat.errors import FfchatError
from ffchat.quantize.layout import LAYOUT_VERSION, NIBBLES_PER_WORD, choose_group_size, dequantize
from ffchat.quantize.methods import DEFAULT_METHOD, default_device, get_method, quantize_linear
from ffchat.store import replace_directory

MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.yaml"
INT4_PARTS = ("qweight", "scales", "zeros")
HEAD = "lm_head"
EMBEDDINGS = "model.embed_tokens.weight"
LINEAR_WEIGHT = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
FP16_MAX = 65504.0
DEQUANTIZE_CHUNK_ELEMENTS = 1 << 24
MANIFEST_KEYS = ("layout_version", "method", "group_size", "int4_tensors")
REQUANTIZE_HINT = "re-quantize the model with `ffchat quantize`"


def int4_targets(state_dict: dict[str, torch.Tensor], *, keep_head_fp16: bool = False) -> dict[str, str]:
    """INT4 name -> the state-dict key it is made from, in state-dict order (the LM head last).

    With tied embeddings and no ``lm_head.weight``, the head is a quantized copy
    of the embeddings (the embedding lookup itself stays fp16).
    """
    targets = {key[: -len(".weight")]: key for key in state_dict if LINEAR_WEIGHT.match(key)}
    if not keep_head_fp16:
        head = f"{HEAD}.weight" if f"{HEAD}.weight" in state_dict else EMBEDDINGS
        if head in state_dict:
            targets[HEAD] = head
    return targets


def quantize_state_dict(
    state_dict: dict[str, torch.Tensor],
    *,
    method: str = DEFAULT_METHOD,
    group_size: int = 128,
    keep_head_fp16: bool = False,
    progress: Callable[[str], None] | None = None,
    device: torch.device | str | None = None,
    importance: dict[str, torch.Tensor] | None = None,
    exact: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Quantize every block linear and the LM head; return (artifact tensors, manifest fields).

    ``device`` defaults to the GPU when there is one; the result is on the CPU.
    ``progress(name)`` is called after each INT4 tensor (``len(int4_targets(...))`` of them).
    ``importance``: INT4 name -> mean square input activations, for calibrated methods.
    ``exact``: state-dict key -> (qweight, scales, zeros) already in the layout (a GGUF's
    Q4 blocks); used as they are wherever their group size is the one chosen for that
    tensor, and listed in the manifest's ``exact``.
    """
    get_method(method)
    device = device if device is not None else default_device()
    importance, exact = importance or {}, exact or {}
    targets = int4_targets(state_dict, keep_head_fp16=keep_head_fp16)
    replaced = {f"{name}.weight" for name in targets}
    tensors = {key: _as_stored(value) for key, value in state_dict.items() if key not in replaced}
    group_sizes, kept = {}, []
    for name, key in targets.items():
        weight = state_dict[key]
        group_sizes[name] = choose_group_size(weight.shape[1], group_size)
        parts = exact.get(key)
        if fits_exactly(parts, weight, group_size):
            kept.append(name)
        else:
            parts = quantize_linear(weight, group_sizes[name], method=method, device=device,
                                    importance=importance.get(name))
        tensors.update({f"{name}.{part}": value for part, value in zip(INT4_PARTS, parts)})
        if progress is not None:
            progress(name)
    info: dict[str, Any] = {
        "layout_version": LAYOUT_VERSION,
        "method": method,
        "group_size": group_size,
        "int4_tensors": list(targets),
        "lm_head": _head_kind(state_dict, targets),
    }
    differing = {name: g for name, g in group_sizes.items() if g != group_size}
    if differing:
        info["group_sizes"] = differing
    if kept:
        info["exact"] = kept
    return tensors, info


def fits_exactly(parts: tuple | None, weight: torch.Tensor, group_size: int) -> bool:
    """Whether precomputed (qweight, scales, zeros) exist with the group size ``weight`` gets at ``group_size``."""
    k = weight.shape[1]
    return parts is not None and k // parts[1].shape[1] == choose_group_size(k, group_size)


def _head_kind(state_dict: dict[str, torch.Tensor], targets: dict[str, str]) -> str:
    """"int4" (``lm_head.*`` INT4 parts), "fp16" (``lm_head.weight`` kept) or "embeddings" (tied, fp16)."""
    if HEAD in targets:
        return "int4"
    return "fp16" if f"{HEAD}.weight" in state_dict else "embeddings"


def _as_stored(tensor: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 and integer tensors as they are; other floats as fp16, or bf16 if fp16 would overflow."""
    tensor = tensor.detach().cpu()
    if not tensor.is_floating_point() or tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor
    fits = tensor.numel() == 0 or tensor.abs().max().item() <= FP16_MAX
    return tensor.to(torch.float16 if fits else torch.bfloat16)


def group_size_of(manifest: dict[str, Any], name: str) -> int:
    """The group size of INT4 tensor ``name`` (per-tensor override, else the artifact's)."""
    return int((manifest.get("group_sizes") or {}).get(name, manifest["group_size"]))


def dequantize_state_dict(
    tensors: dict[str, torch.Tensor], manifest: dict[str, Any], *, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Hugging Face-named weights for the reference engine: INT4 parts become ``NAME.weight`` in ``dtype``.

    An INT4 ``lm_head`` of a tied model appears as ``lm_head.weight``: the engine
    must use it as the head instead of the embeddings.
    """
    int4 = manifest["int4_tensors"]
    parts = {f"{name}.{part}" for name in int4 for part in INT4_PARTS}
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items() if k not in parts}
    for name in int4:
        qweight, scales, zeros = (tensors[f"{name}.{part}"] for part in INT4_PARTS)
        state[f"{name}.weight"] = _dequantize_rows(qweight, scales, zeros, group_size_of(manifest, name), dtype)
    return state


def _dequantize_rows(qweight, scales, zeros, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``layout.dequantize`` in row chunks, bounding the temporaries for a 128k-row LM head."""
    n, words = qweight.shape
    out = torch.empty(n, words * NIBBLES_PER_WORD, dtype=dtype)
    rows = max(1, DEQUANTIZE_CHUNK_ELEMENTS // out.shape[1])
    for start in range(0, n, rows):
        chunk = slice(start, start + rows)
        out[chunk] = dequantize(qweight[chunk], scales[chunk], zeros[chunk], group_size, dtype)
    return out


def write_artifact(directory: Path, quantized: dict[str, torch.Tensor], manifest: dict[str, Any]) -> Path:
    """Write tensors + manifest to ``directory`` atomically, replacing an old artifact there.

    ``manifest`` needs method, group_size, int4_tensors and source (what
    ``quantize_state_dict`` returns plus ``source``); layout_version, the
    ffchat version and the creation time are filled in here.
    """
    directory = Path(directory)
    manifest = {
        **manifest,
        "layout_version": LAYOUT_VERSION,
        "ffchat_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    problem = _problem(quantized, manifest, required=MANIFEST_KEYS + ("source",))
    if problem:
        raise ValueError(f"refusing to write an invalid INT4 artifact: {problem}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.incoming-", dir=directory.parent))
    try:
        save_file(_unshared(quantized), staging / MODEL_FILE, metadata={"format": "pt"})
        (staging / MANIFEST_FILE).write_text(yaml.safe_dump(manifest, sort_keys=False))
        replace_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, copying any that share storage with an earlier one (safetensors refuses those)."""
    seen, out = set(), {}
    for name, tensor in tensors.items():
        tensor = tensor.contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return out


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of the artifact in ``directory``, checked for the layout version this ffchat reads."""
    directory = Path(directory)
    if not (directory / MANIFEST_FILE).is_file():
        raise FfchatError(f"no INT4 artifact in {directory}", hint="quantize the model with `ffchat quantize`")
    try:
        manifest = yaml.safe_load((directory / MANIFEST_FILE).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise FfchatError(f"the INT4 artifact in {directory} is unreadable: {exc}", hint=REQUANTIZE_HINT) from exc
    if not isinstance(manifest, dict):
        raise FfchatError(f"the INT4 artifact in {directory} has no valid manifest", hint=REQUANTIZE_HINT)
    version = manifest.get("layout_version")
    if version != LAYOUT_VERSION:
        raise FfchatError(
            f"the INT4 artifact in {directory} has layout version {version}; this ffchat reads version {LAYOUT_VERSION}",
            hint=REQUANTIZE_HINT,
        )
    return manifest


def read_artifact(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load (tensors, manifest) from ``directory``, checking the layout version and every INT4 tensor."""
    manifest = read_manifest(directory)
    try:
        tensors = load_file(Path(directory) / MODEL_FILE)
    except (OSError, SafetensorError) as exc:
        raise FfchatError(f"the INT4 artifact in {directory} is unreadable: {exc}", hint=REQUANTIZE_HINT) from exc
    problem = _problem(tensors, manifest)
    if problem:
        raise FfchatError(f"the INT4 artifact in {directory} is damaged: {problem}", hint=REQUANTIZE_HINT)
    return tensors, manifest


def _problem(tensors: dict[str, torch.Tensor], manifest: dict[str, Any], required=MANIFEST_KEYS) -> str | None:
    """What is wrong with the manifest or the INT4 tensors it lists, or None."""
    missing = [key for key in required if key not in manifest]
    if missing:
        return f"the manifest lacks {', '.join(missing)}"
    for name in manifest["int4_tensors"]:
        missing = [part for part in INT4_PARTS if f"{name}.{part}" not in tensors]
        if missing:
            return f"{name} lacks {', '.join(missing)}"
        qweight, scales, zeros = (tensors[f"{name}.{part}"] for part in INT4_PARTS)
        group_size = group_size_of(manifest, name)
        if qweight.dtype != torch.int32 or qweight.dim() != 2:
            return f"{name}.qweight is {qweight.dtype} {list(qweight.shape)}, not 2-D int32"
        n, k = qweight.shape[0], qweight.shape[1] * NIBBLES_PER_WORD
        expected = [n, k // group_size]
        if k % group_size:
            return f"{name} has {k} inputs, not a multiple of its group size {group_size}"
        for part, value in (("scales", scales), ("zeros", zeros)):
            if value.dtype != torch.float16 or list(value.shape) != expected:
                return f"{name}.{part} is {value.dtype} {list(value.shape)}, expected float16 {expected}"
    return None


def describe_source(record) -> dict[str, Any]:
    """The manifest's ``source`` for a store record: Hub repo and commit, else sha256 of the weight files."""
    if record.repo_id and record.commit:
        return {"repo": record.repo_id, "commit": record.commit}
    location = Path(record.location)
    files = [location] if location.is_file() else sorted(p for p in location.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    return {"path": str(location), "sha256": {p.name: sha256_file(p) for p in files}}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
