"""The decode-attention kernels against their torch reference (Triton interpreter on CPU, compiled where CUDA exists).

Triton decides interpret-or-compile when a kernel module is imported, so the flag is set
before ``ffchat.kernels.decode_attention`` is imported. S=96 with 3 splits of BLOCK_N=16
keys: lengths 1, 17, 32, 48 and 96 cover one key, a partial block, block and share
boundaries, idle splits and the full cache.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernel_helpers import rel_err  # noqa: E402

from ffchat.kernels import decode_attention as da  # noqa: E402
from ffchat.kernels.interpreter import interpreted  # noqa: E402
from ffchat.model import attention_mask  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
S = 96
CFG = da.DecodeAttentionConfig(splits=3, block_n=16)
LENGTHS = [1, 17, 32, 48, 96]


def make_inputs(hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int, s: int = S):
    """q [Hq, D] as a row view of a wider buffer (like q inside a fused qkv), k/v as layer 1 of a [2, Hkv, S, D] cache."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(hq, 2 * d, generator=gen) * 2).to(DEVICE, dtype)[:, :d]
    k = torch.randn(2, hkv, s, d, generator=gen).to(DEVICE, dtype)
    v = torch.randn(2, hkv, s, d, generator=gen).to(DEVICE, dtype)
    return q, k[1], v[1]


def length_tensor(n: int) -> torch.Tensor:
    return torch.tensor([n], dtype=torch.int32, device=DEVICE)


def test_interpreter_is_active_without_cuda():
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert interpreted(da._partial_kernel), "kernel module was imported before the flag"


@pytest.mark.parametrize("window", [None, 1, 5, 200])
def test_reference_is_the_models_last_query(window):
    """The reference equals ffchat.model's attention (mask + repeat_interleave + SDPA) for the newest token."""
    q, k, v = make_inputs(6, 3, 16, torch.float32, seed=1)
    for length in (1, 9, S):
        mask = attention_mask(length - 1, 1, window, torch.device(DEVICE))  # [1, length]
        keys, values = (t[:, :length].repeat_interleave(2, dim=0) for t in (k, v))
        model = F.scaled_dot_product_attention(q[:, None], keys, values, attn_mask=mask)[:, 0]
        ref = da.decode_attention_reference(q, k, v, length, sliding_window=window)
        assert torch.allclose(ref, model, atol=1e-5), (length, window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq, hkv, d", [(4, 2, 16), (7, 1, 32), (6, 3, 16)])
def test_matches_reference(hq, hkv, d, dtype):
    q, k, v = make_inputs(hq, hkv, d, dtype, seed=hq * 100 + d)
    for length in LENGTHS:
        out = torch.full((hq, d), float("nan"), dtype=dtype, device=DEVICE)
        y = da.decode_attention(q, k, v, length_tensor(length), out=out, config=CFG)
        assert y.data_ptr() == out.data_ptr() and y.dtype == dtype
        assert torch.isfinite(y).all(), f"length {length}: some outputs were never written"
        assert rel_err(y, da.decode_attention_reference(q, k, v, length)) < TOL[dtype], length


def test_bf16_and_default_config():
    q, k, v = make_inputs(4, 2, 16, torch.bfloat16, seed=5)
    assert da.pick_config(S, 2).splits == 1  # a short cache: one share per KV head
    for length in (1, 50, S):
        y = da.decode_attention(q, k, v, length_tensor(length))
        assert y.dtype == torch.bfloat16
        assert rel_err(y, da.decode_attention_reference(q, k, v, length)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("window", [1, 7, 40, 200])
def test_sliding_window(window):
    q, k, v = make_inputs(4, 2, 16, torch.float32, seed=window)
    cfg = da.DecodeAttentionConfig(splits=4, block_n=16)
    for length in (1, 30, S):
        y = da.decode_attention(q, k, v, length_tensor(length), sliding_window=window, config=cfg)
        ref = da.decode_attention_reference(q, k, v, length, sliding_window=window)
        assert rel_err(y, ref) < TOL[torch.float32], (window, length)


def test_scale():
    q, k, v = make_inputs(4, 2, 16, torch.float32, seed=8)
    y = da.decode_attention(q, k, v, length_tensor(40), scale=0.05, config=CFG)
    assert rel_err(y, da.decode_attention_reference(q, k, v, 40, scale=0.05)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_garbage_outside_the_attended_keys_is_never_read(dtype):
    """NaN and huge values past length (and before a sliding window) leave the output bit-identical."""
    q, k, v = make_inputs(7, 1, 32, dtype, seed=9)
    for length, window in ((1, None), (17, None), (48, None), (70, 20)):
        clean = da.decode_attention(q, k, v, length_tensor(length), sliding_window=window, config=CFG)
        dirty_k, dirty_v = k.clone(), v.clone()
        for t, junk in ((dirty_k, float("nan")), (dirty_v, 6e4)):
            t[:, length:] = junk
            if window is not None:
                t[:, : length - window] = junk
        dirty = da.decode_attention(q, dirty_k, dirty_v, length_tensor(length), sliding_window=window, config=CFG)
        assert torch.equal(dirty, clean), (length, window)


def test_one_workspace_serves_every_length():
    """Reused workspace and out (as a captured graph reuses them): same bits as fresh calls, whatever came before."""
    hq, hkv, d = 6, 3, 16
    q, k, v = make_inputs(hq, hkv, d, torch.float16, seed=10)
    ws = da.make_workspace(hq, d, S, CFG, device=DEVICE)
    assert ws.config == CFG and tuple(ws.acc.shape) == (hq, CFG.splits, d)
    out = torch.empty(hq, d, dtype=torch.float16, device=DEVICE)
    length = length_tensor(S)
    for n in (S, 1, 50, 17, S, 33):
        length.fill_(n)  # in place, as before a graph replay
        y = da.decode_attention(q, k, v, length, out=out, workspace=ws)
        assert y.data_ptr() == out.data_ptr()
        assert torch.equal(y, da.decode_attention(q, k, v, length_tensor(n), config=CFG)), n


def test_length_past_the_cache_is_clamped():
    q, k, v = make_inputs(4, 2, 16, torch.float32, seed=11)
    y = da.decode_attention(q, k, v, length_tensor(S + 7), config=CFG)
    assert torch.equal(y, da.decode_attention(q, k, v, length_tensor(S), config=CFG))


def test_pick_config_and_workspace():
    big = da.pick_config(8192, 8, num_sms=132)
    assert big.splits == 64 and big.block_n == 64
    assert da.pick_config(8192, 2, num_sms=132).splits == 64  # capped: no share of a full cache below 128 keys
    assert da.pick_config(131072, 2, num_sms=132).splits == 256
    assert da.pick_config(100, 8).splits == 1
    tiny = da.pick_config(20, 1)
    assert tiny.splits == 1 and tiny.block_n == 32
    ws = da.make_workspace(14, 64, 8192, device="cpu")  # no KV heads given: sized for the most splits
    assert ws.config == da.pick_config(8192, 1) and ws.max_logit.shape == (14, ws.config.splits)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hkv": 3}, "cannot share"),
        ({"d": 24}, "power of two"),
        ({"k_dtype": torch.float16}, "share a dtype"),
        ({"workspace_splits": 5}, "workspace"),
        ({"length_dtype": torch.float32}, "int32"),
    ],
)
def test_rejects_bad_inputs(change, message):
    hkv, d = change.get("hkv", 2), change.get("d", 16)
    q = torch.zeros(4, d, device=DEVICE)
    k = torch.zeros(hkv, S, d, dtype=change.get("k_dtype", torch.float32), device=DEVICE)
    length = torch.tensor([3], dtype=change.get("length_dtype", torch.int32), device=DEVICE)
    ws = None
    if "workspace_splits" in change:
        ws = da.make_workspace(4, d, S, da.DecodeAttentionConfig(splits=change["workspace_splits"]), device=DEVICE)
    with pytest.raises(ValueError, match=message):
        da.decode_attention(q, k, k, length, workspace=ws, config=CFG)
