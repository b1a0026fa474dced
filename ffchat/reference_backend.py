"""The reference backend: ffchat.model.Transformer behind the Backend protocol.

Slow but exact to Hugging Face; every other backend is checked against it,
and it runs anywhere torch does.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ffchat.backend import check_prompt_fits, check_rewind, check_room_for_tokens
from ffchat.model import Transformer


class ReferenceBackend:
    """One conversation's KV cache on the reference model (see ffchat.backend.Backend)."""

    def __init__(self, model: Transformer, name: str = "reference"):
        self.model = model
        self.name = name
        self.config = model.config
        self.context_length = model.max_seq_len
        self.device = model.device
        self.position = 0

    def prefill(self, tokens: Sequence[int]) -> torch.Tensor:
        check_prompt_fits(self, len(tokens))
        return self._run(tokens)

    def decode(self, token: int | torch.Tensor) -> torch.Tensor:
        check_room_for_tokens(self)
        return self._run(token.view(1) if isinstance(token, torch.Tensor) else [token])

    def rewind(self, position: int) -> None:
        check_rewind(self, position)
        self.position = position  # later tokens are overwritten before they are read again

    def _run(self, tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        logits = self.model.forward(ids, self.position, last_only=True)  # runs under inference_mode
        self.position += len(tokens)
        return logits[0].clone()  # a normal tensor: samplers may edit it in place
