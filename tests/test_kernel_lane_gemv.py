"""The word-a-lane INT4 GEMV against its references (Triton interpreter on CPU, compiled where CUDA exists)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernel_helpers import random_int4, rel_err  # noqa: E402

from ffchat.kernels import int4_gemv as gemv  # noqa: E402
from ffchat.kernels.interpreter import interpreted  # noqa: E402
from ffchat.kernels.lane_gemv import _lane_gemv_kernel, int4_gemv_lanes, lane_gemv_fits  # noqa: E402
from ffchat.quantize.layout import dequantize  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
GROUP = 128


def rand(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def test_the_kernel_is_interpreted_without_cuda():
    if DEVICE == "cpu":
        assert interpreted(_lane_gemv_kernel), "kernel module was imported before the flag"


@pytest.mark.parametrize("n, k, block_k, prefetch", [(16, 256, 256, False), (32, 768, 256, True),
                                                     (48, 1024, 512, False), (32, 2048, 1024, True)])
def test_fp32_sums_match_the_dequantized_weights(n, k, block_k, prefetch):
    """Unrounded (fp32 out): every row, the bias and the residual in their places after the butterfly's row order."""
    qweight, scales, zeros = random_int4(n, k, GROUP, n * 7 + k, DEVICE)
    x, bias, residual = rand(k, torch.bfloat16, 1), rand(n, torch.bfloat16, 2), rand(n, torch.bfloat16, 3)
    want = dequantize(qweight, scales, zeros, GROUP).double() @ x.double() + bias.double() + residual.double()
    out = torch.full((n,), float("nan"), dtype=torch.float32, device=DEVICE)
    config = gemv.GemvConfig(16, block_k, block_k // 256, prefetch=prefetch)
    got = int4_gemv_lanes(x, qweight, scales, zeros, GROUP, config=config, bias=bias, residual=residual, out=out)
    assert got is out
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounded_outputs_equal_the_w4a16_kernel(dtype):
    """In the activation dtype it gives int4_gemv's outputs (and so its reference's, to the output rounding)."""
    n, k = 32, 1024
    qweight, scales, zeros = random_int4(n, k, GROUP, 5, DEVICE)
    x, residual = rand(k, dtype, 6), rand(n, dtype, 7)
    got = int4_gemv_lanes(x, qweight, scales, zeros, GROUP, config=gemv.GemvConfig(16, 512, 2), residual=residual)
    want = gemv.int4_gemv(x, qweight, scales, zeros, GROUP, residual=residual)
    assert got.dtype == dtype
    assert rel_err(got, want) < 1e-3  # identical but for a rare rounding tie of the last bit
    assert rel_err(got, gemv.int4_gemv_reference(x, qweight, scales, zeros, GROUP, residual=residual)) < 1.5e-2


def test_extreme_codes_and_zero_points():
    """All-0 and all-15 codes against zero points at both ends: the planes' cancellation stays exact."""
    n, k = 16, 512
    qweight, scales, zeros = random_int4(n, k, GROUP, 8, DEVICE)
    qweight[: n // 2] = 0
    qweight[n // 2:] = -1  # every nibble 15
    zeros[: n // 4], zeros[n // 4: n // 2] = 0.0, 15.0
    x = rand(k, torch.bfloat16, 9) * 30
    want = dequantize(qweight, scales, zeros, GROUP).double() @ x.double()
    got = int4_gemv_lanes(x, qweight, scales, zeros, GROUP, config=gemv.GemvConfig(16, 256, 1),
                          out=torch.empty(n, dtype=torch.float32, device=DEVICE))
    assert rel_err(got, want) < 1e-5


def test_what_fits():
    tile = gemv.GemvConfig(16, 2048, 8)
    assert lane_gemv_fits(4096, 14336, GROUP, tile)
    assert not lane_gemv_fits(4096, 14336, 64, tile), "group 128 only"
    assert not lane_gemv_fits(4104, 14336, GROUP, tile), "N a multiple of 16"
    assert not lane_gemv_fits(4096, 4864, GROUP, tile), "K a multiple of block_k"
    assert not lane_gemv_fits(4096, 4096, GROUP, gemv.GemvConfig(8, 2048, 8)), "16 rows a program"
    assert not lane_gemv_fits(4096, 4096, GROUP, gemv.GemvConfig(16, 128, 1)), "a word a lane"
    assert not lane_gemv_fits(4096, 4096, GROUP, gemv.GemvConfig(16, 2048, 4)), "a word a lane, no more"
    assert not lane_gemv_fits(4096, 4096, GROUP, gemv.GemvConfig(16, 1024, 4, split_k=2)), "one K slice"
    assert lane_gemv_fits(28672, 4096, GROUP, gemv.GemvConfig(8, 2048, 8), gated=True), "8 gate and 8 up rows"
    assert not lane_gemv_fits(28672, 4096, GROUP, tile, gated=True), "16 outputs are 32 rows"


@pytest.mark.parametrize("n, k, block_k, gated, prefetch", [(32, 512, 256, False, False), (32, 1024, 512, True, True),
                                                             (64, 1024, 256, True, False)])
def test_a_fused_norm_and_swiglu_give_the_w4a16_kernels_outputs(n, k, block_k, gated, prefetch):
    """With the RMSNorm (and SwiGLU: 8 gate and 8 up rows a program) fused, its fp32 outputs are int4_gemv's to the
    order of the fp32 sums, and so are the rounded ones, bias included. (int4_gemv's own tests hold it to the
    reference; on the CPU the interpreter truncates the normalized x to bf16, so that comparison needs their
    truncating reference.)"""
    qweight, scales, zeros = random_int4(n, k, GROUP, n + 3 * k, DEVICE)
    x, bias = rand(k, torch.bfloat16, 12), rand(n, torch.bfloat16, 13)
    fused = {"bias": bias, "norm_weight": rand(k, torch.bfloat16, 14), "norm_eps": 1e-5, "gated": gated}
    outputs = n // 2 if gated else n
    config = gemv.GemvConfig(8 if gated else 16, block_k, block_k // 256, prefetch=prefetch)
    got = int4_gemv_lanes(x, qweight, scales, zeros, GROUP, config=config,
                          out=torch.empty(outputs, dtype=torch.float32, device=DEVICE), **fused)
    want = gemv.int4_gemv(x, qweight, scales, zeros, GROUP, out=torch.empty(outputs, device=DEVICE), **fused)
    assert rel_err(got, want) < 1e-5
    rounded = int4_gemv_lanes(x, qweight, scales, zeros, GROUP, config=config, **fused)
    assert rounded.shape == (outputs,)
    assert rel_err(rounded, gemv.int4_gemv(x, qweight, scales, zeros, GROUP, **fused)) < 1e-3


@pytest.mark.parametrize("change", [{"config": gemv.GemvConfig(16, 1024, 4)}, {"group_size": 64},
                                    {"gated": True}], ids=["tile", "group", "gated-rows"])
def test_rejects_what_it_does_not_run(change):
    """A tile of more words than lanes, group 64, or 16 outputs a program where gated means 8 (32 rows)."""
    n, k = 32, 512
    group = change.pop("group_size", GROUP)
    qweight, scales, zeros = random_int4(n, k, group, 10, DEVICE)
    x = rand(k, torch.bfloat16, 11)
    kwargs = {"config": gemv.GemvConfig(16, 256, 1), **change}
    with pytest.raises(ValueError, match="outside what it runs"):
        int4_gemv_lanes(x, qweight, scales, zeros, group, **kwargs)


COMPILE_FOR_SM90 = textwrap.dedent("""
    import inspect, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ffchat.kernels.lane_gemv import _lane_gemv_kernel as kernel
    names = list(inspect.signature(kernel.fn).parameters)
    fused = sys.argv[1] == "gate_up"  # the 8B's gate/up (norm and SwiGLU), else its down
    constants = dict(K=4096 if fused else 14336, HALF=14336 if fused else 0, CHUNKS=2 if fused else 7,
                     BLOCK_K=2048, HAS_BIAS=False, HAS_RES=not fused, NORM=fused, NORM_BLOCK=4096 if fused else 1,
                     NORM_CHUNKS=int(fused), GATED=fused, PREFETCH=False, PDL=True, RELEASE_EARLY=False, USE_ASM=True)
    types = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "bias_ptr": "*bf16",
             "res_ptr": "*bf16", "out_ptr": "*bf16", "nw_ptr": "*bf16", "eps": "fp32"}
    signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in names}
    source = ASTSource(kernel, signature, {(names.index(n),): v for n, v in constants.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in types})
    ttgir = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ttgir"]
    layouts = dict(re.findall(r"^(#\\w+) = (#ttg\\.blocked<.*>)$", ttgir, re.M))
    tile = re.search(r"tt\\.load .*evictionPolicy = evict_first : tensor<256x16x!tt\\.ptr<i32>, (#\\w+)>", ttgir)
    print(layouts[tile.group(1)])
""")


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU tier's check; on a GPU the kernel's own results are tested")
@pytest.mark.parametrize("role", ["down", "gate_up"])
def test_compiled_for_sm90_a_lane_holds_one_word_of_every_row(role):
    """The shuffles exchange hardware lanes, so the tile must put word j on lane j % 32 with its 16 rows in that
    lane's registers: compiled here for sm_90 (as tune's launches on an H100 are), its layout says so, plain (the
    8B down) and with the norm and SwiGLU fused (the 8B gate/up)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90, role], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    layout = done.stdout.strip()
    assert "sizePerThread = [1, 1]" in layout and "threadsPerWarp = [32, 1]" in layout, layout
