"""The interface every inference backend implements, and how one is chosen.

A backend owns the weights and the KV cache of one conversation at batch 1.
The generation loop only ever calls these methods, so the reference engine,
the Triton backend and the whole-model kernel are interchangeable.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from ffchat.config import ModelConfig
from ffchat.errors import FfchatError


# Tokens one ``decode_chain`` call decodes and picks on the device at most: the host queues a graph and copies
# the picks back once per chain instead of once per token (BENCHMARKS.md, stop 36).
CHAIN_LENGTH = 8


class Chooser(Protocol):
    def choose(self, logits: torch.Tensor, slot: int = 0) -> torch.Tensor:
        """The next token [1] for fp32 ``logits`` [vocab] (which it may edit), the chain's ``slot``-th pick;
        device work only, so it can be captured with the step (``ffchat.sampling.Choice``)."""


class Backend(Protocol):
    name: str
    config: ModelConfig
    context_length: int  # tokens the KV cache holds
    position: int  # tokens currently in the KV cache
    device: torch.device

    def prefill(self, tokens: Sequence[int]) -> torch.Tensor:
        """Append ``tokens`` to the cache in one pass; return fp32 logits of the last one, shape [vocab]."""

    def decode(self, token: int | torch.Tensor) -> torch.Tensor:
        """Append one token; return its fp32 logits, shape [vocab].

        ``token`` may be an int64 tensor [1] on the device that the host has not read yet
        (``ffchat.sampling.Pick``): the step is then queued without waiting for it.
        """

    def rewind(self, position: int) -> None:
        """Forget every cached token from ``position`` on (0 resets the conversation)."""


class ChainingBackend(Backend, Protocol):
    """A backend that can also run several decode steps with no host work between them."""

    def decode_chain(self, token: torch.Tensor, chooser: Chooser, count: int) -> torch.Tensor:
        """Decode ``token`` (int64 [1] on the device), then ``count`` - 1 tokens picked on the device, each by
        ``chooser`` from the logits of the step before; return all ``count`` picks (int64 [count] on the device,
        valid until the next chain is queued). The position moves ``count`` tokens on."""


# The checks every backend makes the same way, so users see one wording whatever runs.

def check_prompt_fits(backend: Backend, count: int) -> None:
    """A prompt of ``count`` tokens must fit in what is left of the context: never truncate silently."""
    if count == 0:
        raise FfchatError("the prompt is empty")
    free = backend.context_length - backend.position
    if count > free:
        raise FfchatError(
            f"the prompt ({count} tokens) does not fit in the {free} tokens left "
            f"of the {backend.context_length}-token context",
            hint="start a new conversation or raise the context length",
        )


def check_room_for_tokens(backend: Backend, count: int = 1) -> None:
    free = backend.context_length - backend.position
    if count > free:
        raise FfchatError(f"the {backend.context_length}-token context is full" if not free else
                          f"{count} more tokens do not fit in the {free} left of the {backend.context_length}-token "
                          "context", hint="start a new conversation or raise the context length")


def check_rewind(backend: Backend, position: int) -> None:
    if not 0 <= position <= backend.position:
        raise ValueError(f"cannot rewind to {position}: the cache holds {backend.position} tokens")
