"""The decode-attention kernels against their torch reference (Triton interpreter on CPU, compiled where CUDA exists).

The kernels take the token's fused q/k/v row, rotate (and, Qwen3-style, normalize) q and k,
append k and v to the cache at length-1 and attend over keys 0..length-1; the reference
does the same with ``rope_kv_append_reference`` and plain attention. Triton decides
interpret-or-compile when a kernel module is imported, so the flag is set before
``ffchat.kernels.decode_attention`` is imported. S=96 with 3 splits of BLOCK_N=16 keys:
lengths 1, 17, 32, 33, 48 and 96 cover one key, a partial block, block and share boundaries
(the new key alone in its share), idle splits and the full cache.
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
from ffchat.config import ModelConfig  # noqa: E402
from ffchat.model import attention_mask, rope_tables  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
# The interpreter truncates fp32 -> bf16 (compiled code rounds to nearest), and the kernel casts
# the rotated q and k to bf16 as the cache stores them: twice the rounding error, amplified by softmax.
BF16_TOL = 3e-2 if DEVICE == "cpu" else TOL[torch.bfloat16]
S = 96
CFG = da.DecodeAttentionConfig(splits=3, block_n=16)
LENGTHS = [1, 17, 32, 33, 48, 96]


class Case:
    """One layer's inputs: the new token's qkv row, cos/sin tables, and layer 1 of a [2, Hkv, S, D] cache."""

    def __init__(self, hq, hkv, d, dtype, seed, *, norm=False, s=S):
        gen = torch.Generator().manual_seed(seed)
        self.num_heads, self.dtype = hq, dtype
        self.qkv = (torch.randn((hq + 2 * hkv) * d, generator=gen) * 2).to(DEVICE, dtype)
        self.k = torch.randn(2, hkv, s, d, generator=gen).to(DEVICE, dtype)[1]
        self.v = torch.randn(2, hkv, s, d, generator=gen).to(DEVICE, dtype)[1]
        self.norms = {name: (torch.rand(d, generator=gen) + 0.5).to(DEVICE, dtype) if norm else None
                      for name in ("q_norm", "k_norm")}
        hf = dict(model_type="llama", vocab_size=64, hidden_size=hq * d, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=hq,
                  num_key_value_heads=hkv, head_dim=d, rope_theta=10000.0)
        self.cos, self.sin = (t.to(DEVICE) for t in rope_tables(ModelConfig.from_hf(hf), s))

    def run(self, length, k=None, v=None, **kw):
        """The kernel on copies of the caches: (attention, k cache, v cache) after the call."""
        k, v = (self.k if k is None else k).clone(), (self.v if v is None else v).clone()
        y = da.decode_attention(self.qkv, k, v, length_tensor(length) if isinstance(length, int) else length,
                                self.cos, self.sin, num_heads=self.num_heads, **self.norms, **kw)
        return y, k, v

    def reference(self, length, **kw):
        """The reference in fp32 from the same inputs: what the kernel computes before rounding its outputs."""
        k, v = self.k.float(), self.v.float()
        norms = {name: None if t is None else t.float() for name, t in self.norms.items()}
        y = da.decode_attention_reference(self.qkv.float(), k, v, length, self.cos, self.sin,
                                          num_heads=self.num_heads, **norms, **kw)
        return y, k, v


def length_tensor(n: int) -> torch.Tensor:
    return torch.tensor([n], dtype=torch.int32, device=DEVICE)


def test_interpreter_is_active_without_cuda():
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert interpreted(da._partial_kernel), "kernel module was imported before the flag"


@pytest.mark.parametrize("window", [None, 1, 5, 200])
def test_cached_reference_is_the_models_last_query(window):
    """The attention half of the reference equals ffchat.model's attention (mask + SDPA) for the newest token."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(6, 16, generator=gen).to(DEVICE)
    k, v = (torch.randn(3, S, 16, generator=gen).to(DEVICE) for _ in range(2))
    for length in (1, 9, S):
        mask = attention_mask(length - 1, 1, window, torch.device(DEVICE))  # [1, length]
        keys, values = (t[:, :length].repeat_interleave(2, dim=0) for t in (k, v))
        model = F.scaled_dot_product_attention(q[:, None], keys, values, attn_mask=mask)[:, 0]
        ref = da.cached_attention_reference(q, k, v, length, sliding_window=window)
        assert torch.allclose(ref, model, atol=1e-5), (length, window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq, hkv, d, norm", [(4, 2, 16, False), (7, 1, 32, True), (6, 3, 16, False)])
def test_matches_reference(hq, hkv, d, norm, dtype):
    """Attention, the appended key and value, and every other cache row untouched."""
    case = Case(hq, hkv, d, dtype, seed=hq * 100 + d, norm=norm)
    for length in LENGTHS:
        out = torch.full((hq, d), float("nan"), dtype=dtype, device=DEVICE)
        y, k, v = case.run(length, out=out, config=CFG)
        y_ref, k_ref, v_ref = case.reference(length)
        assert y.data_ptr() == out.data_ptr() and y.dtype == dtype
        assert torch.isfinite(y).all(), f"length {length}: some outputs were never written"
        assert rel_err(y, y_ref) < TOL[dtype], length
        assert rel_err(k[:, length - 1], k_ref[:, length - 1]) < TOL[dtype], length
        assert torch.equal(v.float(), v_ref), length
        others = torch.arange(S, device=DEVICE) != length - 1
        assert torch.equal(k[:, others], case.k[:, others]), length


@pytest.mark.parametrize("splits, prefetch_blocks", [(3, 2), (2, 2), (1, 4)])
def test_keys_requested_before_the_wait(splits, prefetch_blocks):
    """A share's first prefetch_blocks blocks load before qkv is read: shares shorter than that (masked), as long,
    and longer (the loop goes on after them), with and without a window."""
    case = Case(4, 2, 16, torch.float32, seed=30 + splits)
    cfg = da.DecodeAttentionConfig(splits=splits, block_n=16, prefetch_blocks=prefetch_blocks)
    for window in (None, 20):
        for length in LENGTHS:
            y, k, _ = case.run(length, config=cfg, sliding_window=window)
            y_ref, k_ref, _ = case.reference(length, sliding_window=window)
            assert rel_err(y, y_ref) < TOL[torch.float32], (window, length)
            assert rel_err(k[:, length - 1], k_ref[:, length - 1]) < TOL[torch.float32], (window, length)


@pytest.mark.parametrize("cache, kv_heads, head_dim, splits, prefetch_blocks", [
    (4352, 8, 64, 32, 2),  # Llama-3.2-1B at a bench-sized cache: 256 programs, two blocks before the wait
    (131072, 8, 64, 64, 1),  # its full cache: 512 programs, more than two an SM
    (4352, 8, 128, 32, 1),  # Llama-3.1-8B's 128-dim heads
    (4352, 2, 64, 32, 2),  # Qwen2.5-0.5B
])
def test_default_config_for_known_shapes(cache, kv_heads, head_dim, splits, prefetch_blocks):
    cfg = da.pick_config(cache, kv_heads, head_dim, num_sms=132)
    assert (cfg.splits, cfg.prefetch_blocks) == (splits, prefetch_blocks)


def test_combine_in_several_steps():
    """Sixty-four shares of 128-dim heads combine in two steps of 32: the running log-sum-exp carries across."""
    cfg = da.DecodeAttentionConfig(splits=64, block_n=16)
    assert da.combine_block(cfg.splits) == 32
    case = Case(2, 1, 128, torch.float32, seed=12, s=1024)
    for length in (600, 1024):  # 38 and 64 shares attend keys
        y, _, _ = case.run(length, config=cfg)
        assert rel_err(y, case.reference(length)[0]) < TOL[torch.float32], length


def test_bf16_and_default_config():
    case = Case(4, 2, 16, torch.bfloat16, seed=5)
    assert da.pick_config(S, 2).splits == 1  # a short cache: one share per KV head
    for length in (1, 50, S):
        y, _, _ = case.run(length)
        assert y.dtype == torch.bfloat16
        assert rel_err(y, case.reference(length)[0]) < BF16_TOL, length


@pytest.mark.parametrize("window", [1, 7, 40, 200])
def test_sliding_window(window):
    case = Case(4, 2, 16, torch.float32, seed=window)
    cfg = da.DecodeAttentionConfig(splits=4, block_n=16)
    for length in (1, 30, S):
        y, _, _ = case.run(length, sliding_window=window, config=cfg)
        assert rel_err(y, case.reference(length, sliding_window=window)[0]) < TOL[torch.float32], (window, length)


def test_scale():
    case = Case(4, 2, 16, torch.float32, seed=8)
    y, _, _ = case.run(40, scale=0.05, config=CFG)
    assert rel_err(y, case.reference(40, scale=0.05)[0]) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_garbage_outside_the_attended_keys_is_never_read(dtype):
    """NaN and huge values at and past length-1 (and before a sliding window) leave the output bit-identical."""
    case = Case(7, 1, 32, dtype, seed=9)
    for length, window in ((1, None), (17, None), (48, None), (70, 20)):
        clean, _, _ = case.run(length, sliding_window=window, config=CFG)
        dirty_k, dirty_v = case.k.clone(), case.v.clone()
        for t, junk in ((dirty_k, float("nan")), (dirty_v, 6e4)):
            t[:, length - 1:] = junk  # the new token's slot too: its key and value come from qkv
            if window is not None:
                t[:, : length - window] = junk
        dirty, _, _ = case.run(length, dirty_k, dirty_v, sliding_window=window, config=CFG)
        assert torch.equal(dirty, clean), (length, window)


def test_one_workspace_serves_every_length():
    """Reused workspace and out (as a captured graph reuses them): same bits as fresh calls, whatever came before."""
    hq, hkv, d = 6, 3, 16
    case = Case(hq, hkv, d, torch.float16, seed=10)
    ws = da.make_workspace(hq, d, S, CFG, device=DEVICE)
    assert ws.config == CFG and tuple(ws.acc.shape) == (hq, CFG.splits, d)
    out = torch.empty(hq, d, dtype=torch.float16, device=DEVICE)
    length = length_tensor(S)
    for n in (S, 1, 50, 17, S, 33):
        length.fill_(n)  # in place, as before a graph replay
        y, _, _ = case.run(length, out=out, workspace=ws)
        assert y.data_ptr() == out.data_ptr()
        assert torch.equal(y, case.run(n, config=CFG)[0]), n


def test_length_past_the_cache_is_clamped():
    case = Case(4, 2, 16, torch.float32, seed=11)
    y, k, _ = case.run(S + 7, config=CFG)
    y_full, k_full, _ = case.run(S, config=CFG)
    assert torch.equal(y, y_full) and torch.equal(k, k_full)


def test_pick_config_and_workspace():
    big = da.pick_config(8192, 8, num_sms=132)
    assert big.splits == 64 and big.block_n == 64
    assert da.pick_config(8192, 2, num_sms=132).splits == 64  # capped: no share of a full cache below 128 keys
    assert da.pick_config(131072, 2, num_sms=132).splits == 256
    assert da.pick_config(100, 8).splits == 1
    tiny = da.pick_config(20, 1)
    assert tiny.splits == 1 and tiny.block_n == 32
    assert tiny.num_warps == 4 and da.pick_config(8192, 8, 128).num_warps == 8  # wide heads: 8 warps
    ws = da.make_workspace(14, 64, 8192, device="cpu")  # no KV heads given: sized for the most splits
    assert ws.config == da.pick_config(8192, 1) and ws.max_logit.shape == (14, ws.config.splits)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hkv": 3}, "cannot share"),
        ({"d": 24}, "power of two"),
        ({"k_dtype": torch.float16}, "share a dtype"),
        ({"width": 1}, "one contiguous"),
        ({"workspace_splits": 5}, "workspace"),
        ({"length_dtype": torch.float32}, "int32"),
        ({"cos_dtype": torch.float16}, "fp32"),
        ({"norm_size": 8}, "q_norm"),
    ],
)
def test_rejects_bad_inputs(change, message):
    hkv, d = change.get("hkv", 2), change.get("d", 16)
    qkv = torch.zeros((4 + 2 * hkv) * d + change.get("width", 0), device=DEVICE)
    k = torch.zeros(hkv, S, d, dtype=change.get("k_dtype", torch.float32), device=DEVICE)
    cos = torch.zeros(S, d, dtype=change.get("cos_dtype", torch.float32), device=DEVICE)
    q_norm = torch.ones(change["norm_size"], device=DEVICE) if "norm_size" in change else None
    length = torch.tensor([3], dtype=change.get("length_dtype", torch.int32), device=DEVICE)
    ws = None
    if "workspace_splits" in change:
        ws = da.make_workspace(4, d, S, da.DecodeAttentionConfig(splits=change["workspace_splits"]), device=DEVICE)
    with pytest.raises(ValueError, match=message):
        da.decode_attention(qkv, k, k, length, cos, cos, num_heads=4, q_norm=q_norm, workspace=ws, config=CFG)
