"""The interface every inference backend implements, and how one is chosen.

A backend owns the weights and the KV cache of one conversation at batch 1.
The generation loop only ever calls these methods, so the reference engine,
the Triton backend and the whole-model kernel are interchangeable.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from ffchat.config import ModelConfig


class Backend(Protocol):
    name: str
    config: ModelConfig
    context_length: int  # tokens the KV cache holds
    position: int  # tokens currently in the KV cache
    device: torch.device

    def prefill(self, tokens: Sequence[int]) -> torch.Tensor:
        """Append ``tokens`` to the cache in one pass; return fp32 logits of the last one, shape [vocab]."""

    def decode(self, token: int) -> torch.Tensor:
        """Append one token; return its fp32 logits, shape [vocab]."""

    def rewind(self, position: int) -> None:
        """Forget every cached token from ``position`` on (0 resets the conversation)."""
