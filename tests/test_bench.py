"""`ffchat bench` without a GPU: shapes, the bytes a decode step reads, the baseline's numerics, the CLI error.

The timing itself needs a GPU (tests/gpu/test_bench_gpu.py); everything it
rests on is checked here.
"""

from __future__ import annotations

import pytest
import torch
from cli_helpers import assert_one_line_error, ffchat
from kernel_helpers import rel_err

from ffchat.bench import (
    BACKENDS,
    BASELINE,
    MAX_CACHE,
    _add_ratios,
    cache_tokens,
    parse_backends,
    parse_cache,
    parse_contexts,
    tables,
)
from ffchat.bench_baseline import Decoder, tinygemm_scales_and_zeros
from ffchat.errors import FfchatError
from ffchat.model import Transformer
from ffchat.quantize.layout import dequantize, unpack_int4
from ffchat.shapes import decode_bytes, random_weights, shape_config

# (hidden, layers, heads, kv heads, head_dim, FFN, vocab, tied, q/k/v bias, parameters as Hugging Face counts them)
REAL_SHAPES = {
    "llama-3.2-1b": (2048, 16, 32, 8, 64, 8192, 128256, True, False, 1_235_814_400),
    "llama-3.1-8b": (4096, 32, 32, 8, 128, 14336, 128256, False, False, 8_030_261_248),
    "qwen2.5-0.5b": (896, 24, 14, 2, 64, 4864, 151936, True, True, 494_032_768),
}


@pytest.mark.parametrize("name", sorted(REAL_SHAPES))
def test_shapes_parse_into_the_real_model_configs(name):
    c = shape_config(name)
    got = (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size,
           c.tie_word_embeddings, c.qkv_bias, c.num_parameters)
    assert got == REAL_SHAPES[name]


def test_llama3_shapes_carry_their_rope_scaling():
    assert shape_config("llama-3.2-1b").rope.kind == "llama3" and shape_config("llama-3.2-1b").rope.factor == 32
    assert shape_config("llama-3.1-8b").rope.factor == 8
    assert shape_config("qwen2.5-0.5b").rope.kind == "default" and shape_config("qwen2.5-0.5b").rope.theta == 1e6


def test_unknown_shape_is_a_user_error():
    with pytest.raises(FfchatError, match="llama-3.2-1b"):
        shape_config("llama-5")


def test_bytes_per_token_of_llama_3_2_1b_int4_by_hand():
    # Per layer, INT4 elements: q, o 2048x2048; k, v 512x2048; gate, up 8192x2048; down 2048x8192.
    elements = 2 * 2048 * 2048 + 2 * 512 * 2048 + 3 * 8192 * 2048  # 60,817,408
    layer = elements // 2 + elements // 128 * 4 + 2 * 2048 * 2  # nibbles + fp16 scale and zero per group + 2 norms
    head = 128256 * 2048 // 2 + 128256 * 2048 // 128 * 4  # tied, but the head is quantized on its own
    kv = 2 * 16 * 8 * 64 * 2 * (512 + 1)  # K and V, 16 layers, 8 heads of 64, bf16, 512 cached + the new token
    parts = decode_bytes(shape_config("llama-3.2-1b"), 512, group_size=128)
    assert parts == {"layers": 16 * layer + 2048 * 2, "lm_head": head, "embedding_row": 2048 * 2, "kv_cache": kv,
                     "total": 673_439_744}
    assert 16 * layer + 2048 * 2 + head + 2048 * 2 + kv == 673_439_744  # ~0.67 GB, GUIDE section 3's 0.68


def test_bytes_per_token_in_bf16_is_every_parameter_twice():
    c = shape_config("llama-3.1-8b")
    parts = decode_bytes(c, 0, group_size=None)
    # untied: all parameters but the embedding table are read, plus one embedding row
    assert parts["total"] - parts["kv_cache"] == 2 * (c.num_parameters - c.vocab_size * c.hidden_size + c.hidden_size)
    assert parts["kv_cache"] == 2 * 32 * 8 * 128 * 2


@pytest.mark.parametrize("shape", ["tiny", "tiny-qwen"])
@pytest.mark.parametrize("int4", [True, False], ids=["int4", "bf16"])
def test_bytes_per_token_matches_the_tensors_a_step_reads(shape, int4):
    weights = random_weights(shape_config(shape), label=shape, int4=int4, device="cpu")
    stored = sum(t.nbytes for linear in weights.int4.values() for t in (linear.qweight, linear.scales, linear.zeros))
    stored += sum(t.nbytes for name, t in weights.dense.items() if name != "model.embed_tokens.weight")
    c = weights.config
    if c.tie_word_embeddings and not int4:
        stored += c.vocab_size * c.hidden_size * 2  # the embedding table is the head
    parts = weights.decode_bytes(0)
    assert parts["layers"] + parts["lm_head"] == stored
    assert ("lm_head" in weights.int4) == int4


def test_random_weights_are_seeded():
    a = random_weights(shape_config("tiny"), label="a", int4=True, seed=3, device="cpu")
    b = random_weights(shape_config("tiny"), label="b", int4=True, seed=3, device="cpu")
    c = random_weights(shape_config("tiny"), label="c", int4=True, seed=4, device="cpu")
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(a.int4[name].qweight, b.int4[name].qweight)
    assert not torch.equal(a.int4[name].qweight, c.int4[name].qweight)


def test_tinygemm_scales_and_zeros_follow_its_convention():
    """torch's CPU int4 op reads the same (scale, zero) pairs as the CUDA one: check our conversion with it."""
    weights = random_weights(shape_config("tiny"), label="tiny", int4=True, device="cpu")
    linear = weights.int4["model.layers.0.mlp.gate_proj"]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(linear.qweight).to(torch.int32), 8)
    x = torch.randn(3, 256).bfloat16()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x, packed, linear.group_size, tinygemm_scales_and_zeros(linear.scales, linear.zeros))
    ref = x.float() @ dequantize(linear.qweight, linear.scales, linear.zeros, linear.group_size).T
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("shape", ["tiny", "tiny-qwen"])
@pytest.mark.parametrize("int4", [True, False], ids=["int4", "bf16"])
def test_baseline_model_matches_the_reference_eagerly(shape, int4):
    """The baseline's model (eager, CPU) is as close to the exact fp32 model as our bf16 reference engine is."""
    weights = random_weights(shape_config(shape), label=shape, int4=int4, seed=1, device="cpu")
    config, state = weights.config, weights.reference_state_dict()
    exact = Transformer(config, 64, dtype=torch.float32)  # INT4 dequantized in fp32, not through bf16
    exact.load_state_dict({**{name: tensor.float() for name, tensor in state.items()},
                           **{f"{n}.weight": q.dequantize(torch.float32) for n, q in weights.int4.items()}})
    reference = Transformer(config, 64, dtype=torch.bfloat16)
    reference.load_state_dict(state)
    baseline = Decoder(weights, 64)
    tokens = torch.randint(0, config.vocab_size, (20,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for start, stop in ((0, 16), (16, 17), (17, 18), (18, 20)):
            chunk = tokens[start:stop]
            truth = exact.forward(chunk, start, last_only=True)[0]
            ours = reference.forward(chunk, start, last_only=True)[0]
            theirs = baseline(chunk, torch.arange(start, stop))[0]
            assert rel_err(theirs, truth) < 2 * rel_err(ours, truth) + 5e-3, (start, rel_err(theirs, truth))
            assert rel_err(theirs, ours) < 4e-2


def test_backend_registry_and_option_parsing():
    assert {"reference", BASELINE} <= set(BACKENDS)
    assert parse_backends("torch-compile, reference") == ("torch-compile", "reference")
    assert parse_contexts("128,512,2048") == (128, 512, 2048)
    with pytest.raises(FfchatError, match="reference"):
        parse_backends("vllm")
    for bad in ("", "12,x", "-1"):
        with pytest.raises(FfchatError, match="contexts"):
            parse_contexts(bad)


def test_the_cache_option_sizes_ffchats_kv_cache_like_run():
    assert parse_cache(None) is None and parse_cache("MAX") == MAX_CACHE and parse_cache("8192") == 8192
    for bad in ("", "lots", "0", "-5"):
        with pytest.raises(FfchatError, match="--ctx"):
            parse_cache(bad)
    assert cache_tokens(None, 4353, 131072) == 4353  # default: what the timed contexts need
    assert cache_tokens(MAX_CACHE, 4353, 131072) == 131072
    assert cache_tokens(8192, 4353, 131072) == 8192
    with pytest.raises(FfchatError, match="smaller than the 4353 tokens"):
        cache_tokens(4096, 4353, 131072)
    with pytest.raises(FfchatError, match="maximum context of 32768"):
        cache_tokens(65536, 4353, 32768)


def test_ratios_and_tables_from_a_report():
    def rows(ms):
        return [{"context": 128, "ms_per_token": ms, "tok_per_s": 1e3 / ms, "bytes_per_token": 6.7e8,
                 "roofline_ms": 0.2, "pct_roofline": 20 / ms}]

    def answers(greedy, sampled):
        return [{"sampling": "greedy", "tok_per_s": greedy}, {"sampling": "sampled", "tok_per_s": sampled}]

    backends = [
        {"name": "reference", "decode": rows(4.0), "prefill": {"ms": 30.0, "tok_per_s": 1e4, "ttft_ms": 31.0},
         "generate": answers(210.0, 190.0), "setup_s": 1.0},
        {"name": BASELINE, "decode": rows(1.0), "prefill": {"ms": 60.0, "tok_per_s": 5e3, "ttft_ms": 61.0},
         "generate": answers(870.0, 640.0), "setup_s": 40.0},
    ]
    _add_ratios(backends)
    assert backends[0]["decode"][0]["vs_baseline"] == 0.25 and backends[0]["prefill"]["vs_baseline"] == 2.0
    assert backends[1]["decode"][0]["vs_baseline"] == 1.0
    report = {"model": {"name": "x", "format": "int4", "group_size": 128, "quantizer": "rtn"},
              "copy_bandwidth": {"gb_per_s": 3000.0}, "device": {"name": "Some GPU"}, "prompt_tokens": 512,
              "backends": backends + [{"name": "triton", "error": "out of GPU memory"}],
              "context_length": 2049, "cache_tokens": 131072}
    from rich.console import Console

    console = Console(record=True, width=200)
    for table in tables(report):
        console.print(table)
    text = console.export_text()
    assert "KV cache 131072 tokens" in text
    assert "Some GPU" in text and "0.25x" in text and "2.00x" in text and "failed: out of GPU memory" in text
    assert "870" in text and "640" in text and "1000 (context 128)" in text  # the loop beside the GPU's rate


def test_bench_without_a_gpu_is_a_one_line_error():
    result = ffchat("bench", "--shape", "tiny", CUDA_VISIBLE_DEVICES="")
    assert_one_line_error(result, "GPU")
