"""The INT4 packing layout (version 1): exact nibble positions, sign bit, dequantization, group sizes."""

from __future__ import annotations

import sys

import pytest
import torch

from ffchat.errors import FfchatError
from ffchat.quantize.layout import choose_group_size, dequantize, pack_int4, unpack_int4


def random_codes(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def as_unsigned(word: torch.Tensor) -> int:
    """The 32 bits of an int32 word as a Python int in 0..2**32-1."""
    return int(word) & 0xFFFFFFFF


@pytest.mark.parametrize("n, k", [(1, 8), (7, 48), (33, 256)])
def test_round_trip_random_codes(n, k):
    q = random_codes(n, k, seed=n)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (n, k // 8)
    assert torch.equal(unpack_int4(packed), q)


def test_all_fifteen_sets_the_sign_bit_and_round_trips():
    q = torch.full((3, 16), 15, dtype=torch.uint8)
    packed = pack_int4(q)
    assert torch.equal(packed, torch.full((3, 2), -1, dtype=torch.int32))
    assert torch.equal(unpack_int4(packed), q)


def test_nibble_positions_of_one_word():
    word = pack_int4(torch.arange(8, dtype=torch.uint8).view(1, 8))[0, 0]
    # byte b = q[b] | q[4 + b] << 4
    assert as_unsigned(word) == 0x73625140
    assert as_unsigned(word & 0x0F0F0F0F) == 0x03020100  # elements 0..3 as bytes 0..3
    assert as_unsigned((word >> 4) & 0x0F0F0F0F) == 0x07060504  # elements 4..7


@pytest.mark.parametrize("element, bits", [(0, 0), (1, 8), (2, 16), (3, 24), (4, 4), (5, 12), (6, 20), (7, 28)])
def test_each_element_lands_on_its_documented_bits(element, bits):
    q = torch.zeros(1, 16, dtype=torch.uint8)
    q[0, 8 + element] = 0b1011  # in the second word, so the word index is checked too
    packed = pack_int4(q)
    assert int(packed[0, 0]) == 0
    assert as_unsigned(packed[0, 1]) == 0b1011 << bits


def test_high_nibble_of_byte_three_makes_the_word_negative():
    q = torch.zeros(1, 8, dtype=torch.uint8)
    q[0, 7] = 8
    assert int(pack_int4(q)[0, 0]) == -(2**31)
    q[0, 7] = 7
    assert int(pack_int4(q)[0, 0]) == 7 << 28


@pytest.mark.skipif(sys.byteorder != "little", reason="memory bytes equal value bytes on little-endian hosts (GPUs)")
def test_dp4a_style_dot_product_matches_codes_times_activations():
    """What a W4A8 kernel does: masked words as 4 unsigned bytes against 4 consecutive int8 activations."""
    q = random_codes(5, 64, seed=3)
    x = torch.randint(-127, 128, (64,), generator=torch.Generator().manual_seed(4), dtype=torch.int32)
    packed = pack_int4(q)
    low = (packed & 0x0F0F0F0F).view(torch.uint8).view(5, 8, 4).int()
    high = ((packed >> 4) & 0x0F0F0F0F).view(torch.uint8).view(5, 8, 4).int()
    xw = x.view(8, 8)
    dot = (low * xw[:, :4]).sum((1, 2)) + (high * xw[:, 4:]).sum((1, 2))
    assert torch.equal(dot, (q.int() * x).sum(1))


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(torch.zeros(2, 12, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.full((1, 8), 16, dtype=torch.int32))


def test_dequantize_matches_the_formula():
    n, k, g = 5, 96, 32
    q = random_codes(n, k, seed=7)
    gen = torch.Generator().manual_seed(8)
    scales = (torch.rand(n, k // g, generator=gen) * 0.1 + 0.01).half()
    zeros = (torch.rand(n, k // g, generator=gen) * 15).half()  # fractional zeros
    w = dequantize(pack_int4(q), scales, zeros, g)
    for row in range(n):
        for col in range(0, k, 13):
            group = col // g
            expected = (float(q[row, col]) - float(zeros[row, group])) * float(scales[row, group])
            assert w[row, col].item() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert dequantize(pack_int4(q), scales, zeros, g, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "k, preferred, expected",
    [(2048, 128, 128), (896, 128, 128), (4864, 128, 128), (576, 128, 64), (960, 128, 64),
     (160, 128, 32), (72, 128, 8), (2048, 64, 64), (1536, 32, 32)],
)
def test_choose_group_size(k, preferred, expected):
    assert choose_group_size(k, preferred) == expected


def test_choose_group_size_refuses_what_cannot_be_packed():
    with pytest.raises(FfchatError, match="100 inputs"):
        choose_group_size(100)
    with pytest.raises(FfchatError, match="multiple of 8"):
        choose_group_size(2048, preferred=12)
