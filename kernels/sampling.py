"""Sampling a token on the GPU in a few launches: repetition penalty, then top-k, temperature, top-p, min-p and
the draw.

Why: the same choice in torch ops (``ffchat.sampling.candidates`` and ``draw``, the references these
kernels are tested against) is some thirty launches, and ``torch.topk``'s radix passes alone take
~47 us of a 128k vocabulary's ~107 us on an H200: at 2000 tokens a second that is a fifth of the
step. Here every value of the vocabulary becomes one int64 key (the float's bits made orderable,
above its id), so ``tl.topk`` carries ids with values:

* ``_chunk_top_kernel``: program p keeps the K2 largest keys of its chunk of the vocabulary;
* ``_merge_top_kernel``, as often as needed: program p keeps the K2 largest of a few chunks' lists,
  until at most ``MERGE`` keys are left (a tree: ``tl.topk`` over 4096 keys in one program takes
  ~32 us on an H200, over 1024 ~5 us, so many small programs beat one large one);
* ``_choose_kernel``: one program keeps the K2 largest of those, scales them by the temperature,
  masks what top-k (ties at the k-th place kept, up to K2 - k of them), top-p and min-p remove,
  draws by inverting the CDF at one uniform number, and writes the token into the recent-token ring.

K2 is the power of two >= 2k, so the candidates hold at least ``candidates``' 2k largest, and tokens
tied with the k-th stay (as transformers keeps them) up to K2 - k + 1 of them.
``penalize_recent`` applies the repetition penalty in place, all reads before any write, so a
token repeated in the window is penalized once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MOST_TOP_K = 128  # larger k: the torch path (K2 <= 256, so a merge pass still shrinks its keys fourfold)
CHUNK = 1024  # vocabulary entries per program of the first pass
MERGE = 1024  # keys per program of a merge pass, and the most the choosing program takes
PENALTY_BLOCK = 1024
LOWEST_KEY: tl.constexpr = tl.constexpr(-(2**63))  # below every real key: padding


@triton.jit
def _keys(values, ids):
    """int64 keys ordered as the fp32 values (negative floats' magnitude bits flipped), the id in the low word."""
    bits = values.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | ids.to(tl.int64)


@triton.jit
def _values_and_ids(keys):
    """The inverse of ``_keys``."""
    ordered = (keys >> 32).to(tl.int32)
    bits = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), (keys & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def _softmax(x):
    e = tl.exp(x - tl.max(x, axis=0))
    return e / tl.sum(e, axis=0)


@triton.jit
def _penalty_kernel(logits_ptr, ids_ptr, scratch_ptr, vocab, count, penalty, BLOCK: tl.constexpr,
                    CHUNKS: tl.constexpr):
    """One program: every penalized value is computed from the unpenalized logits before any is written."""
    for c in range(CHUNKS):
        offs = c * BLOCK + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < count, other=vocab)
        ok = ids < vocab  # id == vocab: an empty slot
        v = tl.load(logits_ptr + ids, mask=ok, other=0.0)
        tl.store(scratch_ptr + offs, tl.where(v < 0, v * penalty, v / penalty), mask=ok)
    tl.debug_barrier()  # the block's global writes below come after all of its reads above
    for c in range(CHUNKS):
        offs = c * BLOCK + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < count, other=vocab)
        ok = ids < vocab
        tl.store(logits_ptr + ids, tl.load(scratch_ptr + offs, mask=ok), mask=ok)


@triton.jit
def _chunk_top_kernel(logits_ptr, keys_ptr, vocab, BLOCK: tl.constexpr, K2: tl.constexpr):
    """The K2 largest keys of vocabulary entries [p * BLOCK, (p + 1) * BLOCK), largest first."""
    p = tl.program_id(0)
    ids = p * BLOCK + tl.arange(0, BLOCK)
    values = tl.load(logits_ptr + ids, mask=ids < vocab, other=float("-inf"))
    keys = tl.where(ids < vocab, _keys(values, ids), LOWEST_KEY)
    tl.store(keys_ptr + p * K2 + tl.arange(0, K2), tl.topk(keys, K2))


@triton.jit
def _merge_top_kernel(in_ptr, n_keys, out_ptr, BLOCK: tl.constexpr, K2: tl.constexpr):
    """The K2 largest of keys [p * BLOCK, (p + 1) * BLOCK), largest first."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keys = tl.load(in_ptr + offs, mask=offs < n_keys, other=LOWEST_KEY)
    tl.store(out_ptr + tl.program_id(0) * K2 + tl.arange(0, K2), tl.topk(keys, K2))


@triton.jit
def _choose_kernel(keys_ptr, n_keys, uniform_ptr, token_ptr, ring_ptr, count_ptr, ring_size,
                   temperature, top_k, top_p, min_p,
                   ALL: tl.constexpr, K2: tl.constexpr, TOP_P: tl.constexpr, MIN_P: tl.constexpr,
                   RING: tl.constexpr):
    """One program: the token drawn from the filtered K2 largest of the chunks' candidates."""
    offs = tl.arange(0, ALL)
    best = tl.topk(tl.load(keys_ptr + offs, mask=offs < n_keys, other=LOWEST_KEY), K2)
    values, ids = _values_and_ids(best)
    values = tl.where(best == LOWEST_KEY, float("-inf"), values)  # padding, where the vocabulary is short of K2
    pos = tl.arange(0, K2)
    scaled = values / temperature
    kth = tl.sum(tl.where(pos == top_k - 1, scaled, 0.0), axis=0)
    kept = tl.where(scaled < kth, float("-inf"), scaled)
    if TOP_P:  # a token goes when it and all less probable hold at most 1 - top_p; the first always stays
        mass_up_to = tl.flip(tl.cumsum(tl.flip(_softmax(kept), 0), axis=0), 0)
        kept = tl.where((mass_up_to <= 1 - top_p) & (pos > 0), float("-inf"), kept)
    if MIN_P:
        probs = _softmax(kept)
        kept = tl.where(probs < min_p * tl.max(probs, axis=0), float("-inf"), kept)
    cdf = tl.cumsum(_softmax(kept), axis=0)
    target = tl.load(uniform_ptr) * tl.max(cdf, axis=0)  # the CDF's last value
    index = tl.sum((cdf <= target).to(tl.int32), axis=0)
    index = tl.minimum(index, tl.sum((kept > float("-inf")).to(tl.int32), axis=0) - 1)
    token = tl.sum(tl.where(pos == index, ids, 0), axis=0).to(tl.int64)
    tl.store(token_ptr, token)
    if RING:
        count = tl.load(count_ptr)
        tl.store(ring_ptr + count % ring_size, token)
        tl.store(count_ptr, count + 1)


def penalize_recent(logits: torch.Tensor, ids: torch.Tensor, penalty: float) -> None:
    """``ffchat.sampling.apply_repetition_penalty`` in place on fp32 ``logits``: ids == vocab are empty slots."""
    count = ids.numel()
    scratch = torch.empty(count, dtype=torch.float32, device=logits.device)
    _penalty_kernel[(1,)](logits, ids, scratch, logits.numel(), count, float(penalty),
                          BLOCK=PENALTY_BLOCK, CHUNKS=triton.cdiv(count, PENALTY_BLOCK))


def sample_top_k(logits: torch.Tensor, uniform: torch.Tensor, *, top_k: int, temperature: float, top_p: float,
                 min_p: float, ring: torch.Tensor | None = None, count: torch.Tensor | None = None) -> torch.Tensor:
    """The token [1] (int64) that ``draw(*candidates(logits, params), uniform)`` picks, for 0 < top_k <= 128.

    ``ring``/``count``: a ``RecentTokens``' slots and counter, which get the token appended.
    """
    vocab = logits.numel()
    if not 0 < top_k <= MOST_TOP_K or top_k >= vocab or temperature <= 0:
        raise ValueError(f"sample_top_k needs 0 < top_k <= {MOST_TOP_K}, top_k < vocabulary, temperature > 0")
    k2 = triton.next_power_of_2(2 * top_k)
    block = max(k2, min(CHUNK, triton.next_power_of_2(vocab)))
    programs = triton.cdiv(vocab, block)
    keys = torch.empty(programs * k2, dtype=torch.int64, device=logits.device)
    token = torch.empty(1, dtype=torch.int64, device=logits.device)
    _chunk_top_kernel[(programs,)](logits, keys, vocab, BLOCK=block, K2=k2, num_warps=8)
    while keys.numel() > MERGE:
        merged = torch.empty(triton.cdiv(keys.numel(), MERGE) * k2, dtype=torch.int64, device=logits.device)
        _merge_top_kernel[(merged.numel() // k2,)](keys, keys.numel(), merged, BLOCK=MERGE, K2=k2, num_warps=8)
        keys = merged
    has_ring = ring is not None and ring.numel() > 0
    _choose_kernel[(1,)](keys, keys.numel(), uniform, token, ring if has_ring else token,
                         count if has_ring else token, ring.numel() if has_ring else 1,
                         float(temperature), top_k, float(top_p), float(min_p),
                         ALL=triton.next_power_of_2(keys.numel()), K2=k2, TOP_P=top_p < 1.0, MIN_P=min_p > 0,
                         RING=has_ring, num_warps=8)
    return token
