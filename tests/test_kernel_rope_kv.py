"""The fused RoPE + q/k norm + KV-append kernel against its torch reference (Triton interpreter on CPU).

Two comparisons per case: against ``rope_kv_append_reference`` (the reference model's own
ops, which round to the dtype after the norm and inside RoPE: equal up to dtype rounding),
and against that reference run in fp32 then rounded once (what the kernel computes: equal to
within one unit in the last place). v is a copy: equal bit for bit. Cache positions outside
[start, start + T) must keep their old contents.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from factory import FAMILIES  # noqa: E402
from kernel_helpers import rel_err  # noqa: E402

from ffchat.config import ModelConfig  # noqa: E402
from ffchat.kernels import rope_kv  # noqa: E402
from ffchat.model import rope_tables  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}  # vs the model's dtype-rounded ops
ULP = {torch.float32: 2.0**-22, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # relative size of one ulp
MAX_SEQ = 48


def tables(head_dim: int, family: str = "llama", max_seq: int = MAX_SEQ):
    """cos/sin from a tiny config of the family ("llama": llama3 scaling; "qwen3": theta 1e6, plain)."""
    hf = dict(FAMILIES[family], vocab_size=384, head_dim=head_dim)
    cos, sin = rope_tables(ModelConfig.from_hf(hf), max_seq)
    return cos.to(DEVICE), sin.to(DEVICE)


def rand(shape, dtype, seed, scale=1.0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE, dtype)


def assert_within_one_ulp(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype):
    diff = (y.double() - ref.double()).abs()
    bound = ref.double().abs() * ULP[dtype] + 1e-6
    assert (diff <= bound).all(), f"max excess {(diff - bound).max().item():.3g}"


class Case:
    """Fresh random inputs for one call; ``run`` applies the kernel or the reference to its own cache copies."""

    def __init__(self, hq, hkv, d, length, start, dtype, norm=True, seed=0, family="llama", cache_len=MAX_SEQ):
        self.kw = dict(num_heads=hq, num_kv_heads=hkv, head_dim=d)
        self.dtype, self.length, self.start_pos = dtype, length, start
        self.qkv = rand((length, (hq + 2 * hkv) * d), dtype, seed, scale=2.0)
        self.start = torch.tensor([start], dtype=torch.int32, device=DEVICE)
        self.cos, self.sin = tables(d, family)
        self.q_norm = rand(d, dtype, seed + 1, 0.2) + 1 if norm else None
        self.k_norm = rand(d, dtype, seed + 2, 0.2) + 1 if norm else None
        self.k_cache = rand((hkv, cache_len, d), dtype, seed + 3)  # old contents that must survive
        self.v_cache = rand((hkv, cache_len, d), dtype, seed + 4)

    def run(self, fn, upcast=False, **extra):
        cast = (lambda t: t.float()) if upcast else (lambda t: t)
        k_cache, v_cache = cast(self.k_cache.clone()), cast(self.v_cache.clone())
        norms = {name: None if t is None else cast(t) for name, t in (("q_norm", self.q_norm), ("k_norm", self.k_norm))}
        q = fn(cast(self.qkv), self.start, self.cos, self.sin, k_cache, v_cache, **self.kw, **norms, **extra)
        return q, k_cache, v_cache

    def window(self):
        return slice(self.start_pos, self.start_pos + self.length)


def test_interpreter_is_active_without_cuda():
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert "Interpreted" in type(rope_kv._rope_kv_kernel).__name__, "kernel module was imported before the flag"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "qknorm"])
@pytest.mark.parametrize("length, start", [(1, 0), (1, 29), (5, 0), (5, 17)])
@pytest.mark.parametrize("hq, hkv, d", [(4, 2, 16), (6, 2, 32)])
def test_matches_reference(hq, hkv, d, length, start, norm, dtype):
    case = Case(hq, hkv, d, length, start, dtype, norm=norm, seed=hq * 100 + length * 10 + start)
    q, k_cache, v_cache = case.run(rope_kv.rope_kv_append)
    q_ref, k_ref, v_ref = case.run(rope_kv.rope_kv_append_reference)
    w = case.window()
    assert q.shape == (length, hq, d) and q.dtype == dtype
    assert rel_err(q, q_ref) < TOL[dtype]
    assert rel_err(k_cache[:, w], k_ref[:, w]) < TOL[dtype]
    assert torch.equal(v_cache, v_ref), "v is a copy into the window"
    outside = torch.ones(case.k_cache.shape[1], dtype=torch.bool)
    outside[w] = False
    assert torch.equal(k_cache[:, outside], case.k_cache[:, outside]), "k written outside [start, start + T)"
    assert torch.equal(v_cache[:, outside], case.v_cache[:, outside]), "v written outside [start, start + T)"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_rounds_once_from_fp32_math(family, dtype):
    """The kernel computes in fp32 and rounds at the store: within one ulp of the fp32 reference, rounded."""
    case = Case(6, 2, 32, 5, 11, dtype, norm=family == "qwen3", seed=5, family=family)
    q, k_cache, _ = case.run(rope_kv.rope_kv_append)
    q32, k32, _ = case.run(rope_kv.rope_kv_append_reference, upcast=True)
    w = case.window()
    assert_within_one_ulp(q, q32, dtype)
    assert_within_one_ulp(k_cache[:, w], k32[:, w], dtype)
    q_ref, k_ref, _ = case.run(rope_kv.rope_kv_append_reference)  # and the model's own rounding stays close
    assert rel_err(q, q_ref) < TOL[dtype] and rel_err(k_cache[:, w], k_ref[:, w]) < TOL[dtype]


@pytest.mark.parametrize("hq, hkv", [(12, 4), (10, 10)])
def test_many_heads_span_several_programs(hq, hkv):
    """More than 8 q (or kv) heads: several head blocks per token, the last one partly masked."""
    case = Case(hq, hkv, 16, 2, 3, torch.float32, seed=hq + hkv)
    q, k_cache, v_cache = case.run(rope_kv.rope_kv_append)
    q_ref, k_ref, v_ref = case.run(rope_kv.rope_kv_append_reference)
    assert rel_err(q, q_ref) < TOL[torch.float32] and rel_err(k_cache, k_ref) < TOL[torch.float32]
    assert torch.equal(v_cache, v_ref)


def test_q_norm_alone_and_k_norm_alone():
    for which in ("q_norm", "k_norm"):
        case = Case(4, 2, 16, 3, 4, torch.float32, seed=9)
        setattr(case, "k_norm" if which == "q_norm" else "q_norm", None)
        q, k_cache, _ = case.run(rope_kv.rope_kv_append)
        q_ref, k_ref, _ = case.run(rope_kv.rope_kv_append_reference)
        assert rel_err(q, q_ref) < TOL[torch.float32] and rel_err(k_cache, k_ref) < TOL[torch.float32]


def test_prefill_then_decode_with_one_device_position():
    """A decode loop reuses one start tensor and one q_out, as a captured CUDA graph does."""
    hq, hkv, d = 4, 2, 16
    cache = Case(hq, hkv, d, 1, 0, torch.float16, seed=1)
    k_cache, v_cache = cache.k_cache.clone(), cache.v_cache.clone()
    k_ref, v_ref = cache.k_cache.clone(), cache.v_cache.clone()
    start = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    q_out = torch.full((1, hq, d), float("nan"), dtype=torch.float16, device=DEVICE)
    cos, sin = tables(d)
    steps = [rand((6, (hq + 2 * hkv) * d), torch.float16, 20)] + [
        rand((1, (hq + 2 * hkv) * d), torch.float16, 21 + i) for i in range(3)]
    position = 0
    for qkv in steps:
        start.fill_(position)
        out = q_out if qkv.shape[0] == 1 else None
        q = rope_kv.rope_kv_append(qkv, start, cos, sin, k_cache, v_cache, **cache.kw, q_out=out)
        q_ref = rope_kv.rope_kv_append_reference(qkv, start, cos, sin, k_ref, v_ref, **cache.kw)
        if out is not None:
            assert q.data_ptr() == q_out.data_ptr()
        assert rel_err(q, q_ref) < TOL[torch.float16]
        position += qkv.shape[0]
    assert rel_err(k_cache, k_ref) < TOL[torch.float16]
    assert torch.equal(v_cache, v_ref)


def test_writes_one_layer_of_a_full_cache():
    """k_cache/v_cache are usually cache[layer]: the other layers must be untouched."""
    hq, hkv, d, layers = 6, 2, 32, 3
    case = Case(hq, hkv, d, 5, 40, torch.float16, seed=3)
    full_k = rand((layers, hkv, MAX_SEQ, d), torch.float16, 30)
    full_v = rand((layers, hkv, MAX_SEQ, d), torch.float16, 31)
    before_k, before_v = full_k.clone(), full_v.clone()
    case.k_cache, case.v_cache = full_k[1], full_v[1]
    q_ref, k_ref, v_ref = case.run(rope_kv.rope_kv_append_reference)
    rope_kv.rope_kv_append(case.qkv, case.start, case.cos, case.sin, full_k[1], full_v[1], **case.kw,
                           q_norm=case.q_norm, k_norm=case.k_norm)
    for layer in (0, 2):
        assert torch.equal(full_k[layer], before_k[layer]) and torch.equal(full_v[layer], before_v[layer])
    assert rel_err(full_k[1], k_ref) < TOL[torch.float16]
    assert torch.equal(full_v[1], v_ref)


def test_positions_past_the_cache_are_dropped():
    """A caller bug (start + T > S) must not write past the layer: positions >= S are skipped."""
    hq, hkv, d, short = 4, 2, 16, 8
    case = Case(hq, hkv, d, 5, 6, torch.float32, seed=4)
    full_k = torch.zeros((2, hkv, short, d), device=DEVICE)
    full_v = torch.zeros((2, hkv, short, d), device=DEVICE)
    rope_kv.rope_kv_append(case.qkv, case.start, case.cos, case.sin, full_k[0], full_v[0], **case.kw,
                           q_norm=case.q_norm, k_norm=case.k_norm)
    assert not full_k[1].any() and not full_v[1].any(), "wrote into the next layer"
    _, k_ref, v_ref = case.run(rope_kv.rope_kv_append_reference)
    assert rel_err(full_k[0, :, 6:], k_ref[:, 6:8]) < TOL[torch.float32]
    assert torch.equal(full_v[0, :, 6:], v_ref[:, 6:8])


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"head_dim": 24}, AssertionError, "power of two"),
        ({"start_dtype": torch.int64}, ValueError, "int32"),
        ({"width": 7}, ValueError, "qkv"),
        ({"cache_dtype": torch.float16}, ValueError, "k_cache"),
        ({"q_out_shape": (2, 4, 16)}, ValueError, "q_out"),
    ],
)
def test_rejects_bad_inputs(change, error, message):
    hq, hkv, d = 4, 2, 16
    kw = dict(num_heads=hq, num_kv_heads=hkv, head_dim=change.get("head_dim", d))
    qkv = rand((1, (hq + 2 * hkv) * d + change.get("width", 0)), torch.float32, 1)
    start = torch.zeros(1, dtype=change.get("start_dtype", torch.int32))
    cos, sin = tables(d)
    cache = torch.zeros((hkv, MAX_SEQ, d), dtype=change.get("cache_dtype", torch.float32))
    q_out = torch.zeros(change["q_out_shape"]) if "q_out_shape" in change else None
    with pytest.raises(error, match=message):
        rope_kv.rope_kv_append(qkv, start, cos, sin, cache, cache.clone(), **kw, q_out=q_out)
