"""Fused q/k RMSNorm (Qwen3, optional) + RoPE + KV-cache append for T tokens (the Triton backend's prefill).

At decode the same work happens inside ``ffchat.kernels.decode_attention``'s partial kernel.

Input is the fused QKV projection ``qkv`` [T, (Hq + 2 Hkv) * D] (q heads, then k heads, then
v heads). One launch rotates q into ``q_out`` [T, Hq, D], rotates k into the cache and copies v
into the cache, at positions ``start[0] + t``.

Why it looks the way it does:

* CUDA-graph friendly: the position is read from a device tensor inside the kernel, so a
  captured graph replays at whatever position ``start`` holds; no host sync, no allocation
  that depends on data (``q_out`` may be preallocated).
* "Rotate half" RoPE pairs dim j with j + D/2, so ``norm_rope_rows`` (shared with decode
  attention) loads each head twice, as itself and with its halves swapped, and never shuffles
  inside a vector. Everything is computed in fp32 from the stored values and rounded once at
  the store (the reference model rounds after the norm and again inside RoPE, so half-precision
  results differ from it by dtype rounding only).
* Programs own a block of heads of one kind (q, or k with its v), over (token, head block):
  few programs per token at decode, plenty at prefill, no masks on the kind.
* Positions outside the cache [0, S) are never written, outside the cos/sin table never read:
  a caller bug gives a wrong q, not corrupted memory.
* Under the interpreter (CPU tests) the fp32 -> bf16 store truncates instead of rounding to
  nearest: still within one bf16 ulp. Compiled, every store rounds to nearest even.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ffchat.kernels.pdl import launch_options, release_dependents, wait_for_inputs
from ffchat.model import apply_rope, rms_norm


@triton.jit
def norm_rope_rows(rows_ptr, row_ok, w_ptr, cos, sin, eps, D: tl.constexpr, HAS_NORM: tl.constexpr):
    """Heads [R, D] read from ``rows_ptr`` [R, 1]: RMSNorm (if HAS_NORM) then rotate-half RoPE, all in fp32.

    Each row is read twice, as itself and as its partner dims (d + D/2) mod D, so the rotation
    needs no shuffle inside a vector; ``cos``/``sin`` are the position's table rows [D].
    """
    offs_d = tl.arange(0, D)
    partner = (offs_d + D // 2) % D
    x = tl.load(rows_ptr + offs_d[None, :], mask=row_ok, other=0.0).to(tl.float32)
    xp = tl.load(rows_ptr + partner[None, :], mask=row_ok, other=0.0).to(tl.float32)
    if HAS_NORM:
        inv = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        x = x * inv[:, None] * tl.load(w_ptr + offs_d).to(tl.float32)[None, :]
        xp = xp * inv[:, None] * tl.load(w_ptr + partner).to(tl.float32)[None, :]
    sign = tl.where(offs_d < D // 2, -1.0, 1.0)
    return x * cos[None, :] + sign[None, :] * xp * sin[None, :]


@triton.jit
def _rope_kv_kernel(
    qkv_ptr, start_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, q_out_ptr, q_norm_ptr, k_norm_ptr,
    table_len, cache_len, eps,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, Q_BLOCKS: tl.constexpr,
    HAS_Q_NORM: tl.constexpr, HAS_K_NORM: tl.constexpr, PDL: tl.constexpr,
):
    ROW: tl.constexpr = (HQ + 2 * HKV) * D  # elements per token in qkv
    t = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    wait_for_inputs(PDL)
    release_dependents(PDL)
    pos = tl.load(start_ptr).to(tl.int64) + t
    offs_d = tl.arange(0, D)
    hh = tl.arange(0, BLOCK_H)
    in_table = ((offs_d * 0 + pos) < table_len) & (pos >= 0)  # [D] mask: the scalar position broadcast
    cos = tl.load(cos_ptr + pos * D + offs_d, mask=in_table, other=0.0)
    sin = tl.load(sin_ptr + pos * D + offs_d, mask=in_table, other=0.0)
    row = qkv_ptr + t * ROW
    if block < Q_BLOCKS:  # q heads: norm, rotate, write q_out
        heads = block * BLOCK_H + hh
        ok = (heads < HQ)[:, None] & (offs_d < D)[None, :]
        q = norm_rope_rows(row + heads[:, None] * D, ok, q_norm_ptr, cos, sin, eps, D, HAS_Q_NORM)
        dst = q_out_ptr + t * (HQ * D) + heads[:, None] * D + offs_d[None, :]
        tl.store(dst, q.to(q_out_ptr.dtype.element_ty), mask=ok)
    else:  # k heads (norm, rotate) and their v heads (copied), into the cache at pos
        heads = (block - Q_BLOCKS) * BLOCK_H + hh
        head_ok = (heads < HKV) & (pos < cache_len) & (pos >= 0)
        ok = head_ok[:, None] & (offs_d < D)[None, :]
        k = norm_rope_rows(row + (HQ + heads)[:, None] * D, ok, k_norm_ptr, cos, sin, eps, D, HAS_K_NORM)
        cache_offs = heads[:, None].to(tl.int64) * cache_len * D + pos * D + offs_d[None, :]
        tl.store(k_cache_ptr + cache_offs, k.to(k_cache_ptr.dtype.element_ty), mask=ok)
        v = tl.load(row + (HQ + HKV + heads)[:, None] * D + offs_d[None, :], mask=ok)
        tl.store(v_cache_ptr + cache_offs, v, mask=ok)


def _check_inputs(qkv, start, cos, sin, k_cache, v_cache, num_heads, num_kv_heads, head_dim, q_norm, k_norm, q_out):
    """Validate shapes, dtypes, devices and contiguity; return T."""
    hq, hkv, d = num_heads, num_kv_heads, head_dim
    assert d >= 2 and d & (d - 1) == 0, f"head_dim {d} must be a power of two"
    if qkv.dim() != 2 or qkv.shape[1] != (hq + 2 * hkv) * d or not qkv.is_contiguous():
        raise ValueError(f"qkv must be a contiguous [T, {(hq + 2 * hkv) * d}] tensor, got {tuple(qkv.shape)}")
    if qkv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"qkv must be fp16/bf16/fp32, got {qkv.dtype}")
    if start.dtype != torch.int32 or start.numel() != 1:
        raise ValueError(f"start must be an int32 tensor of one element, got {start.dtype} {tuple(start.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.shape[1] != d or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous fp32 [max_seq, {d}] table, got {tuple(t.shape)} {t.dtype}")
    if cos.shape != sin.shape:
        raise ValueError("cos and sin tables differ in shape")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 3 or t.shape[0] != hkv or t.shape[2] != d or t.dtype != qkv.dtype or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [{hkv}, S, {d}] {qkv.dtype} tensor, got "
                             f"{tuple(t.shape)} {t.dtype}")
    if k_cache.shape != v_cache.shape:
        raise ValueError("k_cache and v_cache differ in shape")
    for name, t in (("q_norm", q_norm), ("k_norm", k_norm)):
        if t is not None and (tuple(t.shape) != (d,) or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous [{d}] tensor, got {tuple(t.shape)}")
    length = qkv.shape[0]
    if q_out is not None and (tuple(q_out.shape) != (length, hq, d) or q_out.dtype != qkv.dtype
                              or not q_out.is_contiguous()):
        raise ValueError(f"q_out must be a contiguous [{length}, {hq}, {d}] {qkv.dtype} tensor")
    tensors = [t for t in (qkv, start, cos, sin, k_cache, v_cache, q_norm, k_norm, q_out) if t is not None]
    if any(t.device != qkv.device for t in tensors):
        raise ValueError("all tensors must be on one device")
    return length


def rope_kv_append(
    qkv: torch.Tensor,
    start: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotated q [T, Hq, D]; rotated k and v written to the caches [Hkv, S, D] at positions start[0] + t.

    ``cos``/``sin`` are ``ffchat.model.rope_tables`` (fp32 [max_seq, D]); ``q_norm``/``k_norm``
    (Qwen3) are applied per head before RoPE. Positions must lie below both S and max_seq:
    the kernel skips cache writes past S and rotates by zero past the table, it cannot raise.
    """
    length = _check_inputs(qkv, start, cos, sin, k_cache, v_cache, num_heads, num_kv_heads, head_dim,
                           q_norm, k_norm, q_out)
    if q_out is None:
        q_out = torch.empty((length, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if length == 0:
        return q_out
    # Up to 8 heads (and 2048 elements) per program: a few programs per token at decode.
    block_h = min(triton.next_power_of_2(max(num_heads, num_kv_heads)), 8, max(1, 2048 // head_dim))
    q_blocks = triton.cdiv(num_heads, block_h)
    grid = (length, q_blocks + triton.cdiv(num_kv_heads, block_h))
    _rope_kv_kernel[grid](
        qkv, start, cos, sin, k_cache, v_cache, q_out,
        q_norm if q_norm is not None else q_out, k_norm if k_norm is not None else q_out,
        cos.shape[0], k_cache.shape[1], eps,
        HQ=num_heads, HKV=num_kv_heads, D=head_dim, BLOCK_H=block_h, Q_BLOCKS=q_blocks,
        HAS_Q_NORM=q_norm is not None, HAS_K_NORM=k_norm is not None,
        num_warps=max(1, min(4, block_h * head_dim // 256)), **launch_options(qkv.device),
    )
    return q_out


def rope_kv_append_reference(
    qkv: torch.Tensor,
    start: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain torch, exactly as ``ffchat.model.Transformer._attention`` does it (reads start on the host)."""
    length, pos = qkv.shape[0], int(start.reshape(-1)[0])
    q, k, v = qkv.view(length, num_heads + 2 * num_kv_heads, head_dim).split(
        [num_heads, num_kv_heads, num_kv_heads], dim=1)
    if q_norm is not None:
        q = rms_norm(q, q_norm, eps)
    if k_norm is not None:
        k = rms_norm(k, k_norm, eps)
    c, s = cos[pos:pos + length], sin[pos:pos + length]
    q = apply_rope(q.transpose(0, 1), c, s).transpose(0, 1)
    k_cache[:, pos:pos + length] = apply_rope(k.transpose(0, 1), c, s)
    v_cache[:, pos:pos + length] = v.transpose(0, 1)
    if q_out is None:
        return q.to(qkv.dtype).contiguous()
    return q_out.copy_(q)
