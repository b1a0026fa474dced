"""Fused RoPE + q/k norm + KV append vs its torch reference on real shapes (compiled Triton on a CUDA GPU).

Run on the GPU machine: ``pytest -m gpu tests/gpu/test_rope_kv_gpu.py``. The kernel module is
imported inside the tests, so collecting this file never decides Triton's interpret mode.
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import GPU_COMPILED, rel_err

pytestmark = GPU_COMPILED

MAX_SEQ = 4096
BF16_ULP = 2.0**-7
# (name, Hq, Hkv, D, q/k norm, rope): Llama-3.2-1B, Llama-3.1-8B, Qwen3-0.6B, Qwen3-8B, Qwen2.5-0.5B
SHAPES = [
    ("llama-3.2-1b", 32, 8, 64, False, "llama3"),
    ("llama-3.1-8b", 32, 8, 128, False, "llama3"),
    ("qwen3-0.6b", 16, 8, 128, True, "default"),
    ("qwen3-8b", 32, 8, 128, True, "default"),
    ("qwen2.5-0.5b", 14, 2, 64, False, "default"),
]


@pytest.fixture(scope="module")
def rope_kv():
    from ffchat.kernels import rope_kv

    return rope_kv


def tables(head_dim: int, rope: str):
    from ffchat.config import ModelConfig, RopeConfig
    from ffchat.model import rope_tables

    scaling = RopeConfig(theta=500000.0, kind="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_position_embeddings=8192)
    config = ModelConfig(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_layers=16, num_heads=32, num_kv_heads=8, head_dim=head_dim,
                         max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope=scaling if rope == "llama3" else RopeConfig(theta=1000000.0))
    cos, sin = rope_tables(config, MAX_SEQ)
    return cos.cuda(), sin.cuda()


def inputs(hq, hkv, d, length, norm, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = (torch.randn(length, (hq + 2 * hkv) * d, device="cuda", generator=gen) * 2).bfloat16()
    k_cache = torch.randn(hkv, MAX_SEQ, d, device="cuda", generator=gen).bfloat16()
    v_cache = torch.randn(hkv, MAX_SEQ, d, device="cuda", generator=gen).bfloat16()
    norms = {}
    if norm:
        norms = {name: (1 + 0.2 * torch.randn(d, device="cuda", generator=gen)).bfloat16() for name in ("q_norm", "k_norm")}
    return qkv, k_cache, v_cache, norms


@pytest.mark.parametrize("length, start", [(1, 0), (1, 1234), (257, 100), (2048, MAX_SEQ - 2048)])
@pytest.mark.parametrize("name, hq, hkv, d, norm, rope", SHAPES, ids=[s[0] for s in SHAPES])
def test_bf16_matches_reference(rope_kv, name, hq, hkv, d, norm, rope, length, start):
    qkv, k_cache, v_cache, norms = inputs(hq, hkv, d, length, norm, seed=hq + d + length)
    cos, sin = tables(d, rope)
    kw = dict(num_heads=hq, num_kv_heads=hkv, head_dim=d, **norms)
    start_t = torch.tensor([start], dtype=torch.int32, device="cuda")
    k_ker, v_ker, k_ref, v_ref = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    q = rope_kv.rope_kv_append(qkv, start_t, cos, sin, k_ker, v_ker, **kw)
    q_ref = rope_kv.rope_kv_append_reference(qkv, start_t, cos, sin, k_ref, v_ref, **kw)
    window = slice(start, start + length)
    assert rel_err(q, q_ref) < 1.5e-2
    assert rel_err(k_ker[:, window], k_ref[:, window]) < 1.5e-2
    assert torch.equal(v_ker, v_ref)
    outside = torch.ones(MAX_SEQ, dtype=torch.bool, device="cuda")
    outside[window] = False
    assert torch.equal(k_ker[:, outside], k_cache[:, outside])
    # fp32 math, one rounding: within one bf16 ulp of the reference computed in fp32.
    k32, v32 = k_cache.float(), v_cache.float()
    q32 = rope_kv.rope_kv_append_reference(qkv.float(), start_t, cos, sin, k32, v32, num_heads=hq, num_kv_heads=hkv,
                                           head_dim=d, **{n: t.float() for n, t in norms.items()})
    for got, ref in ((q, q32), (k_ker[:, window], k32[:, window])):
        assert ((got.double() - ref.double()).abs() <= ref.double().abs() * BF16_ULP + 1e-6).all()


def test_decode_under_cuda_graph_replay(rope_kv):
    """One captured launch, replayed at positions set in the start tensor: writes follow the position."""
    hq, hkv, d = 32, 8, 64
    qkv, k_cache, v_cache, _ = inputs(hq, hkv, d, 1, False, seed=7)
    cos, sin = tables(d, "llama3")
    kw = dict(num_heads=hq, num_kv_heads=hkv, head_dim=d)
    start = torch.zeros(1, dtype=torch.int32, device="cuda")
    q_out = torch.empty(1, hq, d, dtype=torch.bfloat16, device="cuda")
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    rope_kv.rope_kv_append(qkv, start, cos, sin, k_cache, v_cache, **kw, q_out=q_out)  # warm-up: compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rope_kv.rope_kv_append(qkv, start, cos, sin, k_cache, v_cache, **kw, q_out=q_out)
    for position in (0, 1, 2, 500, 4095):
        qkv.copy_(torch.randn_like(qkv, dtype=torch.float32).bfloat16())
        start.fill_(position)
        graph.replay()
        q_ref = rope_kv.rope_kv_append_reference(qkv, start, cos, sin, k_ref, v_ref, **kw)
        torch.cuda.synchronize()
        assert rel_err(q_out, q_ref) < 1.5e-2
    assert rel_err(k_cache, k_ref) < 1.5e-2
    assert torch.equal(v_cache, v_ref)
