"""Activation statistics for ``wmse``: each INT4 linear's mean square input, per input channel.

The model runs (the reference engine, ``ffchat.model``) on a few sequences of
random tokens: no text to download or ship, and one teacher-forced pass instead
of generation, which on a CPU is far slower. On SmolLM2 statistics from random
tokens, from text the model wrote itself and from licence text gave the INT4 LM
head perplexities within 0.25% of each other (16.49, 16.46, 16.50; RTN 16.69,
unweighted 17.02): what matters is which channels carry large activations, and
that is a property of the model more than of the text.

Inputs are seen by wrapping each target weight in ``_Observed``, a tensor
subclass that records what ``F.linear`` multiplies it with; the engine's code is
untouched. A target that was never seen is an error, not a silent fallback.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ffchat.config import ModelConfig
from ffchat.errors import FfchatError
from ffchat.model import LAYER_TENSORS, Transformer

SEQUENCES = 4
SEQUENCE_LENGTH = 512
SEED = 0
HEAD = "lm_head"
_ATTRIBUTES = {hf_name[: -len(".weight")]: attr for attr, hf_name in LAYER_TENSORS.items()}


class _Observed(torch.Tensor):
    """A weight that adds sum(x**2) over the rows of every ``F.linear`` input to ``stats[name]``."""

    @staticmethod
    def __new__(cls, weight: torch.Tensor, stats: dict, name: str):
        tensor = torch.Tensor._make_subclass(cls, weight)
        tensor.stats, tensor.target = stats, name
        return tensor

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and isinstance(args[1], _Observed):
            x, weight = args[0], args[1]
            rows = x.detach().reshape(-1, x.shape[-1]).float()
            total, count = weight.stats.get(weight.target, (0.0, 0))
            weight.stats[weight.target] = (total + rows.square().sum(dim=0), count + rows.shape[0])
            args = (x, weight.as_subclass(torch.Tensor), *args[2:])
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def input_importance(
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    names: list[str],
    *,
    device: torch.device | str = "cpu",
    sequences: int = SEQUENCES,
    length: int = SEQUENCE_LENGTH,
    seed: int = SEED,
) -> dict[str, torch.Tensor]:
    """INT4 name (``model.layers.0.self_attn.q_proj``, ``lm_head``) -> mean square input [K], fp32 on the CPU."""
    device = torch.device(device)
    length = min(length, config.max_position_embeddings)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = Transformer(config, length, dtype=dtype, device=device)
    model.load_state_dict(state_dict)
    stats: dict[str, tuple[torch.Tensor, int]] = {}
    for name in names:
        owner, attribute = _holder(model, name)
        setattr(owner, attribute, _Observed(getattr(owner, attribute), stats, name))
    for tokens in calibration_tokens(config, sequences, length, seed):
        model.forward(tokens, 0)
    unseen = [name for name in names if name not in stats]
    if unseen:
        raise FfchatError(f"calibration never saw the input of {', '.join(unseen[:3])}")
    return {name: (total / count).cpu() for name, (total, count) in stats.items()}


def calibration_tokens(config: ModelConfig, sequences: int, length: int, seed: int) -> list[torch.Tensor]:
    """Seeded uniform random token ids [length] per sequence, each opening with BOS where the model has one."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(sequences):
        tokens = torch.randint(0, config.vocab_size, (length,), generator=generator)
        if config.bos_token_id is not None:
            tokens[0] = config.bos_token_id
        batches.append(tokens)
    return batches


def _holder(model: Transformer, name: str) -> tuple[object, str]:
    """The object and attribute through which the engine reads INT4 target ``name``'s weight."""
    if name == HEAD:
        return model, "lm_head"
    _, _, index, rest = name.split(".", 3)
    return model.layers[int(index)], _ATTRIBUTES[rest]
