"""The Triton backend under TRITON_INTERPRET=1 against the reference engine, on tiny INT4 models of each family.

Both backends run the very same INT4 weights (the reference dequantized, in
fp32); the Triton one computes in fp16, so logits agree to fp16 rounding and
greedy tokens agree where the top two logits are not a near-tie.
"""

from __future__ import annotations

import pytest
import torch
from factory import FAMILIES, MAX_POSITIONS, VOCAB_SIZE

from ffchat.config import ModelConfig
from ffchat.errors import FfchatError
from ffchat.model import Transformer, rms_norm
from ffchat.quantize.layout import choose_group_size
from ffchat.reference_backend import ReferenceBackend
from ffchat.sampling import Pick, Sampler, SamplingParams
from ffchat.shapes import random_weights
from ffchat.triton_backend import TritonBackend, prompt_rms_norm, unsupported_reason

CONTEXT = 48
# Relative to the largest logit: fp16 activations and weights rounded once more than the fp32 reference.
TOLERANCE = 2e-2


# The kernels tile a head in one power-of-two block of at least 16; the tiny qwen2 has head_dim 8,
# so it gets 7 heads of 16 here (hidden 112: still odd heads, GQA 7:1, not a multiple of 128).
TRITON_SIZES = {"qwen2": dict(hidden_size=112, intermediate_size=160)}


def tiny_config(family: str) -> ModelConfig:
    return ModelConfig.from_hf({**FAMILIES[family], **TRITON_SIZES.get(family, {}), "vocab_size": VOCAB_SIZE,
                                "max_position_embeddings": MAX_POSITIONS})


def backends(family: str, seed: int = 0, *, int8_activations: bool = False):
    """(reference, triton) over the same INT4 weights; with ``int8_activations`` the W4A8 mode and its emulation."""
    config = tiny_config(family)
    weights = random_weights(config, label=family, int4=True, seed=seed, group_size=32, device="cpu")
    group = choose_group_size(config.hidden_size, 32) if int8_activations else None  # the weights' groups along K
    model = Transformer(config, CONTEXT, dtype=torch.float32, int8_activation_group=group)
    model.load_state_dict(weights.reference_state_dict())
    return ReferenceBackend(model), TritonBackend(weights, CONTEXT, dtype=torch.float16,
                                                  int8_activations=int8_activations)


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    error = (got - want).abs().max() / want.abs().max()
    assert error < TOLERANCE, f"relative error {error:.2e}"


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_prefill_and_decode_match_the_reference(family):
    reference, triton = backends(family)
    prompt = torch.randint(0, VOCAB_SIZE, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    assert_close(triton.prefill(prompt), reference.prefill(prompt))
    token = 7
    for _ in range(4):  # past mistral's 16-token sliding window
        want = reference.decode(token)
        assert_close(triton.decode(token), want)
        token = int(want.argmax())
    assert triton.position == reference.position == 24


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_w4a8_mode_matches_its_emulation_and_stays_near_w4a16(family):
    """gate/up and the LM head on int8 activations: the reference model rounding the same inputs agrees."""
    reference, triton = backends(family, int8_activations=True)
    assert triton.name == "triton-w4a8"
    exact, _ = backends(family)  # same seed: same weights, activations kept exact
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    for backend in (reference, triton, exact):
        backend.prefill(prompt)
    token = 7
    for _ in range(3):
        want = reference.decode(token)
        got = triton.decode(token)
        assert_close(got, want)
        w4a16 = exact.decode(token)
        assert (want - w4a16).abs().max() > 0, "the emulation must round something"
        token = int(want.argmax())


def test_a_prompt_after_a_rewind_continues_from_the_cache():
    reference, triton = backends("llama", seed=3)
    for backend in (reference, triton):
        backend.prefill(list(range(10, 22)))
        backend.rewind(6)
    assert_close(triton.prefill([5, 6, 7]), reference.prefill([5, 6, 7]))  # a prefix in the cache, then a chunk
    assert_close(triton.decode(9), reference.decode(9))


def test_warming_up_changes_no_answer(monkeypatch):
    """warm_up runs one step into the cache's next free slot; the answers after it, at the start or after a prompt,
    are exactly those of a backend that never warmed up. On the CPU there is no graph, so the step it would
    capture runs as it is."""
    weights = random_weights(tiny_config("llama"), label="llama", int4=True, seed=5, group_size=32, device="cpu")
    cold, warm = (TritonBackend(weights, CONTEXT, dtype=torch.float16) for _ in range(2))
    warmed_at = []

    def capture() -> None:
        warmed_at.append(int(warm.step_ids[1]) - 1)
        warm._decode_step()

    monkeypatch.setattr(warm, "use_graph", True)
    monkeypatch.setattr(warm, "_capture", capture)
    warm.warm_up()
    assert warmed_at == [0] and warm.position == 0
    assert torch.equal(warm.prefill([4, 8, 15, 16]), cold.prefill([4, 8, 15, 16]))
    warm.warm_up()
    assert warmed_at == [0, 4] and warm.position == 4
    for token in (23, 42):
        assert torch.equal(warm.decode(token), cold.decode(token))


@pytest.mark.parametrize("params", [dict(temperature=0, repeat_penalty=1.0),
                                    dict(temperature=0.9, top_k=20, repeat_penalty=1.3, seed=4)])
def test_a_chain_of_steps_picks_and_caches_what_single_steps_do(params):
    """``decode_chain`` feeds each pick to the next step on the device: the tokens, the cache and the picks'
    recent-token ring are those of one decode and one pick at a time (seeded: the same uniform numbers)."""
    weights = random_weights(tiny_config("llama"), label="llama", int4=True, seed=6, group_size=32, device="cpu")
    single, chained = (TritonBackend(weights, CONTEXT, dtype=torch.float16) for _ in range(2))
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    samplers = [Sampler(SamplingParams(**params), prompt, capacity=CONTEXT) for _ in range(2)]
    pick = samplers[0].pick(single.prefill(prompt))
    want = []
    for _ in range(7):
        pick = samplers[0].pick(single.decode(pick.last))
        want += pick.values()
    pick = samplers[1].pick(chained.prefill(prompt))
    got = []
    for count in (4, 1, 2):
        pick = Pick(chained.decode_chain(pick.last, samplers[1].chooser(count), count))
        got += pick.values()
    assert got == want
    assert chained.position == single.position == len(prompt) + 7
    assert torch.equal(chained.k_cache, single.k_cache) and torch.equal(chained.v_cache, single.v_cache)
    assert torch.equal(samplers[1]._choice.recent.ids, samplers[0]._choice.recent.ids)


def test_a_chain_that_does_not_fit_is_refused_and_changes_nothing():
    _, triton = backends("llama")
    sampler = Sampler(SamplingParams(temperature=0, repeat_penalty=1.0))
    pick = sampler.pick(triton.prefill(list(range(CONTEXT - 2))))
    with pytest.raises(FfchatError, match="3 more tokens do not fit in the 2 left"):
        triton.decode_chain(pick.last, sampler.chooser(3), 3)
    assert triton.position == CONTEXT - 2
    assert len(Pick(triton.decode_chain(pick.last, sampler.chooser(2), 2)).values()) == 2
    with pytest.raises(FfchatError, match="context is full"):
        triton.decode_chain(pick.last, sampler.chooser(1), 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_prompts_rms_norm_is_the_references_within_a_rounding(dtype):
    gen = torch.Generator().manual_seed(9)
    x = (torch.randn(5, 896, generator=gen) * 3).to(dtype)
    weight = (1 + 0.2 * torch.randn(896, generator=gen)).to(dtype)
    got, want = prompt_rms_norm(x, weight, 1e-6), rms_norm(x, weight, 1e-6)
    assert got.dtype == dtype and got.shape == want.shape
    ulp = torch.finfo(dtype).eps * want.float().abs().clamp(min=torch.finfo(dtype).tiny)
    assert ((got.float() - want.float()).abs() <= 2 * ulp).all()
    assert not torch.equal(got, x), "it must normalize"


def test_the_context_is_enforced():
    _, triton = backends("qwen2")
    with pytest.raises(FfchatError, match="does not fit"):
        triton.prefill(list(range(CONTEXT + 1)))
    triton.prefill(list(range(CONTEXT)))
    with pytest.raises(FfchatError, match="context is full"):
        triton.decode(1)


def test_unsupported_models_are_refused_with_a_reason():
    assert unsupported_reason(tiny_config("llama")) is None
    assert "head dimension 24" in unsupported_reason(tiny_config("llama-tied"))
    config = tiny_config("llama")
    bf16 = random_weights(config, label="bf16", int4=False, device="cpu")
    with pytest.raises(FfchatError, match="INT4"):
        TritonBackend(bf16, CONTEXT)


def configs_passed_to(monkeypatch, kernel: str) -> list:
    """Wrap the decode GEMV launcher the Triton backend runs for ``kernel`` (a name of ``GEMV_KERNELS``) so every
    call's ``config`` is appended to the returned list."""
    from ffchat import triton_backend

    seen, real = [], triton_backend.GEMV_KERNELS[kernel]

    def spy(*args, config=None, **kwargs):
        seen.append(config)
        return real(*args, config=config, **kwargs)

    monkeypatch.setitem(triton_backend.GEMV_KERNELS, kernel, spy)
    return seen


def test_tuned_tiles_reach_the_kernels_and_change_nothing_but_speed(monkeypatch):
    """Configs from `ffchat tune` go to the GEMV launches of their role; the logits stay the reference's."""
    from ffchat.kernels.int4_gemv import GemvConfig

    reference, triton = backends("llama", seed=4)
    assert triton.tuning is None and triton.details == {"tuned": False, "kernels": {},  # no tuning cache on a CPU
                                                        "early_release_roles": ["o"]}
    tiles = {"o": GemvConfig(block_n=4, block_k=32, num_warps=1), "down": GemvConfig(block_n=2, block_k=64,
                                                                                      num_warps=1)}
    triton.tuning = tiles
    seen = configs_passed_to(monkeypatch, "w4a16")
    for backend in (reference, triton):
        backend.prefill([3, 1, 4, 1, 5])
    seen.clear()  # the prefill's one GEMV, its LM head, is not a decode launch
    assert_close(triton.decode(9), reference.decode(9))
    layers = triton.config.num_layers
    assert seen.count(tiles["o"]) == layers and seen.count(tiles["down"]) == layers
    assert seen.count(None) == 2 * layers + 1  # q/k/v and gate/up per layer, and the head: the profile's tiles


def test_roles_tuned_to_dp2a_run_it_and_keep_the_logits(monkeypatch):
    """A role `ffchat tune` gave to the dp2a kernel launches it (x coded in the kernel) with its tile; the others keep
    the W4A16 kernel; the logits stay the reference's (int16 codes: ~1e-5)."""
    from ffchat.kernels.int4_gemv import GemvConfig

    reference, triton = backends("qwen2", seed=5)
    head = GemvConfig(block_n=4, block_k=32, num_warps=1)
    triton.use_kernels({"head": head}, {"head": "dp2a", "down": "dp2a"})
    seen = configs_passed_to(monkeypatch, "dp2a")
    for backend in (reference, triton):
        backend.prefill([2, 7, 1, 8])
    seen.clear()
    assert_close(triton.decode(6), reference.decode(6))
    assert seen == [None] * triton.config.num_layers + [head]  # down per layer (the profile's tile), the head


def test_roles_tuned_to_the_word_a_lane_kernel_run_it_and_keep_the_logits(monkeypatch):
    """Roles `ffchat tune` gave to the word-a-lane kernel launch it with their tiles (shapes it runs: group 128,
    rows in 16s, K in whole tiles), the fused norm and SwiGLU included; the logits stay the reference's."""
    from ffchat.kernels.int4_gemv import GemvConfig

    config = ModelConfig.from_hf({**FAMILIES["llama"], "hidden_size": 256, "intermediate_size": 512,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1,
                                  "vocab_size": VOCAB_SIZE, "max_position_embeddings": MAX_POSITIONS})
    weights = random_weights(config, label="lanes", int4=True, seed=6, group_size=128, device="cpu")
    model = Transformer(config, CONTEXT, dtype=torch.float32)
    model.load_state_dict(weights.reference_state_dict())
    reference, triton = ReferenceBackend(model), TritonBackend(weights, CONTEXT, dtype=torch.float16)
    tile, gated = GemvConfig(block_n=16, block_k=256, num_warps=1), GemvConfig(block_n=8, block_k=256, num_warps=1)
    roles = ("qkv", "o", "gate_up", "down")
    triton.use_kernels({role: gated if role == "gate_up" else tile for role in roles}, dict.fromkeys(roles, "lanes"))
    seen = configs_passed_to(monkeypatch, "lanes")
    for backend in (reference, triton):
        backend.prefill([2, 7, 1, 8])
    assert_close(triton.decode(6), reference.decode(6))
    assert seen == [tile, tile, gated, tile]  # the four GEMVs of the one layer


def test_the_roles_tuned_to_release_early_launch_so_and_the_others_do_not(monkeypatch):
    """Untuned, the O projection alone releases the next launch before its wait; `ffchat tune` can settle another
    set (``use_kernels``), which reaches the launches of the next step, role by role."""
    from ffchat import triton_backend

    _, triton = backends("llama", seed=6)
    released, real = [], triton_backend.GEMV_KERNELS["w4a16"]

    def spy(*args, release_early=False, **kwargs):
        released.append(release_early)
        return real(*args, release_early=release_early, **kwargs)

    monkeypatch.setitem(triton_backend.GEMV_KERNELS, "w4a16", spy)
    triton.prefill([3, 1, 4])
    layers = triton.config.num_layers
    for roles, per_layer in ((None, [False, True, False, False]), ({"qkv", "o"}, [True, True, False, False]),
                             (set(), [False] * 4)):
        if roles is not None:
            triton.use_kernels(None, {}, frozenset(roles))
        released.clear()
        triton.decode(2)
        assert released == per_layer * layers + [False], roles  # q/k/v, o, gate/up, down per layer; the head


def test_attention_shares_are_sized_for_the_models_kv_heads():
    """Sized for one KV head, a long cache got 512 shares a head, mostly idle (1B, 128k: 707 vs 506 us a step)."""
    from ffchat.kernels.decode_attention import pick_config

    config = tiny_config("llama")
    weights = random_weights(config, label="llama", int4=True, seed=0, group_size=32, device="cpu")
    capacity = 65536
    backend = TritonBackend(weights, capacity, dtype=torch.float16)
    wanted = pick_config(capacity, config.num_kv_heads, config.head_dim)
    assert config.num_kv_heads > 1 and backend.attention_workspace.config == wanted
    assert wanted.splits < pick_config(capacity, 1, config.head_dim).splits
