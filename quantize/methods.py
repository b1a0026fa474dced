"""The quantization methods by name, and one linear weight quantized into the layout.

Each method maps W [N, K] to (q uint8 [N, K], scales fp16, zeros fp16) on W's
device; a method in ``CALIBRATED`` also takes the inputs' mean square
activations (``quantize.calibrate``). ``quantize_linear`` feeds it row chunks
(bounding memory for a 128k-row LM head), packs the codes and collects the
result on the CPU.
"""

from __future__ import annotations

import torch

from ffchat.errors import FfchatError
from ffchat.quantize.layout import NIBBLES_PER_WORD, pack_int4
from ffchat.quantize.rtn import quantize_rtn
from ffchat.quantize.wmse import quantize_wmse

METHODS = {"rtn": quantize_rtn, "wmse": quantize_wmse}
DEFAULT_METHOD = "wmse"
# Methods that weigh errors by activation statistics (without them: the plain squared error).
CALIBRATED = {"wmse"}

# Elements per row chunk: a few arrays of this size stay in a CPU's L2/L3
# cache; a GPU needs big chunks to keep its cores busy.
CHUNK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 24}


def get_method(name: str):
    """The method function for ``name``; an unknown name is the user's error."""
    try:
        return METHODS[name]
    except KeyError:
        raise FfchatError(f"unknown quantization method {name!r}; choose from {', '.join(METHODS)}") from None


def default_device() -> torch.device:
    """Quantize on the GPU when there is one: the methods are elementwise work it does in seconds."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantize_linear(
    w: torch.Tensor,
    group_size: int,
    *,
    method: str = DEFAULT_METHOD,
    device: torch.device | str | None = None,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize W [N, K] on ``device`` (default: W's) -> CPU (qweight int32 [N, K // 8], scales, zeros fp16 [N, K // G]).

    ``importance`` [K] (mean square input activations) is used by ``CALIBRATED`` methods only.
    """
    quantize = get_method(method)
    device = torch.device(device) if device is not None else w.device
    extra = {"importance": importance.to(device)} if method in CALIBRATED and importance is not None else {}
    n, k = w.shape
    qweight = torch.empty(n, k // NIBBLES_PER_WORD, dtype=torch.int32)
    scales = torch.empty(n, k // group_size, dtype=torch.float16)
    zeros = torch.empty_like(scales)
    rows = max(1, CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"]) // k)
    for start in range(0, n, rows):
        chunk = w[start : start + rows].to(device=device, dtype=torch.float32)
        q, s, z = quantize(chunk, group_size, **extra)
        qweight[start : start + rows] = pack_int4(q).cpu()
        scales[start : start + rows] = s.cpu()
        zeros[start : start + rows] = z.cpu()
    return qweight, scales, zeros
