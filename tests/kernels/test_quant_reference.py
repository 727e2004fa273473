"""Reference quantizers (lrgrad.quant): error bounds, packing, odd sizes, bad input."""

from __future__ import annotations

import pytest
import torch

from lrgrad import quant


def _per_element(stat: torch.Tensor, numel: int, group_size: int) -> torch.Tensor:
    return stat.float().repeat_interleave(group_size)[:numel]


# ------------------------------------------------------------------ INT4
@pytest.mark.parametrize("shape", [(1,), (7,), (255,), (256,), (257,), (33, 17), (64, 40)])
@pytest.mark.parametrize("group_size", [1, 16, 256])
def test_int4_round_trip_within_half_scale_and_packed_bytes(shape, group_size):
    x = torch.randn(shape) * 2.0 + 0.3
    packed, scale, zero = quant.quantize_int4(x, group_size)
    numel = x.numel()
    assert packed.dtype == torch.uint8 and packed.numel() == -(-numel // 2)
    assert scale.dtype == torch.float16 and zero.dtype == torch.float16
    assert scale.numel() == -(-numel // group_size) == zero.numel()
    y = quant.dequantize_int4(packed, scale, zero, x.shape, group_size)
    assert y.shape == x.shape and y.dtype == torch.float32
    bound = _per_element(scale, numel, group_size) / 2
    err = (x.reshape(-1) - y.reshape(-1)).abs()
    assert bool((err <= bound * (1 + 1e-5) + 1e-7).all()), (err / bound).max()
    # a real quantizer, not a copy: with 16 levels per group the error is not ~0
    if group_size == 256 and numel > 64:
        assert err.max() > bound.max() * 0.2


def test_int4_nibble_order_and_codes_range():
    codes = torch.tensor([1, 2, 3], dtype=torch.uint8)
    packed = quant.pack_int4(codes)
    assert packed.tolist() == [0x21, 0x03]  # element 2i low nibble, 2i + 1 high nibble
    assert quant.unpack_int4(packed, 3).tolist() == [1, 2, 3]
    x = torch.linspace(0, 1.5, 16)
    packed, scale, zero = quant.quantize_int4(x, 16)
    unpacked = quant.unpack_int4(packed, 16)
    assert unpacked.min() == 0 and unpacked.max() == 15  # min -> code 0, max -> code 15
    assert torch.allclose(quant.dequantize_int4(packed, scale, zero, (16,), 16), x, atol=1e-3)


def test_int4_constant_and_zero_groups():
    x = torch.cat([torch.zeros(8), torch.full((8,), 3.7), torch.full((8,), -0.02), torch.randn(8)])
    packed, scale, zero = quant.quantize_int4(x, 8)
    y = quant.dequantize_int4(packed, scale, zero, x.shape, 8)
    assert torch.equal(y[:8], torch.zeros(8))
    assert torch.allclose(y[8:24], x[8:24], rtol=2**-10, atol=0)  # fp16-level precision, no NaN
    assert torch.isfinite(scale).all() and bool((scale > 0).all())


def test_int4_offset_group_keeps_fp16_exact_zero_point():
    x = 100.0 + 1e-3 * torch.randn(256)  # tiny spread far from 0: zero point would overflow fp16
    packed, scale, zero = quant.quantize_int4(x)
    assert torch.equal(zero, zero.round()) and zero.abs().max() <= 1024 + 16
    y = quant.dequantize_int4(packed, scale, zero, x.shape)
    assert (x - y).abs().max() <= scale.float().max() / 2 * (1 + 1e-5)
    assert (x - y).abs().max() <= x.abs().max() / 2048 * 1.01


def test_int4_dtype_and_empty():
    x = torch.randn(10, dtype=torch.bfloat16)
    packed, scale, zero = quant.quantize_int4(x, 4)
    y = quant.dequantize_int4(packed, scale, zero, (10,), 4, dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    packed, scale, zero = quant.quantize_int4(torch.empty(0))
    assert packed.numel() == 0 and scale.numel() == 0


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_group_size_value(bad):
    with pytest.raises(ValueError, match="group_size"):
        quant.quantize_int4(torch.randn(4), bad)
    with pytest.raises(ValueError, match="group_size"):
        quant.quantize_int8(torch.randn(4), bad)
    with pytest.raises(ValueError, match="block_size"):
        quant.quantize_blockwise_8bit(torch.randn(4), bad)


@pytest.mark.parametrize("bad", [2.5, True, "8"])
def test_bad_group_size_type(bad):
    with pytest.raises(TypeError, match="group_size"):
        quant.quantize_int4(torch.randn(4), bad)


def test_bad_inputs():
    with pytest.raises(TypeError, match="Invalid x"):
        quant.quantize_int4(torch.arange(4))
    packed, scale, zero = quant.quantize_int4(torch.randn(10), 4)
    with pytest.raises(ValueError, match="packed"):
        quant.dequantize_int4(packed, scale, zero, (12,), 4)
    with pytest.raises(ValueError, match="scale"):
        quant.dequantize_int4(packed, scale[:2], zero[:2], (10,), 4)
    with pytest.raises(TypeError, match="packed"):
        quant.dequantize_int4(packed.to(torch.int8), scale, zero, (10,), 4)
    codes, absmax = quant.quantize_blockwise_8bit(torch.randn(10), 4)
    with pytest.raises(TypeError, match="codes"):
        quant.dequantize_blockwise_8bit(codes, absmax, block_size=4, signed=False)
    with pytest.raises(ValueError, match="absmax"):
        quant.dequantize_blockwise_8bit(codes, absmax[:1], block_size=4)


# ------------------------------------------------------------------ 8-bit blockwise moments
@pytest.mark.parametrize("numel", [5, 256, 1000])
def test_blockwise_signed_error_bound(numel):
    x = torch.randn(numel) * torch.logspace(-4, 0, numel)
    codes, absmax = quant.quantize_blockwise_8bit(x, 256, signed=True)
    assert codes.dtype == torch.int8 and absmax.dtype == torch.float32
    assert absmax.numel() == -(-numel // 256)
    y = quant.dequantize_blockwise_8bit(codes, absmax, block_size=256, signed=True)
    a = _per_element(absmax, numel, 256)

    def compand(t):
        return torch.sign(t) * (t.abs() / a).sqrt()

    assert (compand(y) - compand(x)).abs().max() <= 1 / (2 * 127) + 1e-6
    assert (x - y).abs().max() <= a.max() * 2 / 127  # |d(y²)| ≤ 2·dy


@pytest.mark.parametrize("numel", [3, 256, 1000])
def test_blockwise_unsigned_error_bound_and_no_flush(numel):
    x = torch.rand(numel) ** 8  # second moments span many orders of magnitude
    codes, absmax = quant.quantize_blockwise_8bit(x, 256, signed=False)
    assert codes.dtype == torch.uint8
    y = quant.dequantize_blockwise_8bit(codes, absmax, block_size=256, signed=False)
    a = _per_element(absmax, numel, 256)
    assert ((y / a) ** 0.25 - (x / a) ** 0.25).abs().max() <= 1 / (2 * 255) + 1e-6
    assert bool((y >= 0).all())


def test_blockwise_unsigned_keeps_small_second_moments():
    # a linear 8-bit code would flush everything below absmax/510 to 0 and blow up 1/sqrt(v)
    v = torch.tensor([1.0, 1e-3, 1e-5, 1e-7, 1e-8, 1e-9])
    codes, absmax = quant.quantize_blockwise_8bit(v, 256, signed=False)
    y = quant.dequantize_blockwise_8bit(codes, absmax, block_size=256, signed=False)
    assert bool((y > 0).all())
    # sqrt(v) (what Adam divides by) within a factor 1.5 down to 1e-8 of the block maximum
    ratio = y[:5].sqrt() / v[:5].sqrt()
    assert bool(((ratio > 0.66) & (ratio < 1.5)).all()), ratio
    assert y[0] == 1.0 and abs(y[1] / v[1] - 1) < 4 / (2 * 255 * 1e-3**0.25)  # p / (2·levels·y)


def test_blockwise_zero_block_and_shape():
    x = torch.zeros(3, 100)
    for signed in (True, False):
        codes, absmax = quant.quantize_blockwise_8bit(x, 64, signed=signed)
        y = quant.dequantize_blockwise_8bit(codes, absmax, block_size=64, signed=signed)
        assert y.shape == (3, 100) and torch.equal(y, x)


# ------------------------------------------------------------------ INT8 and stochastic rounding
@pytest.mark.parametrize("shape", [(9,), (32, 48)])
def test_int8_nearest_error_bound(shape):
    x = torch.randn(shape)
    codes, scale, zero = quant.quantize_int8(x, 64)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    y = quant.dequantize_int8(codes, scale, zero, group_size=64)
    bound = _per_element(scale, x.numel(), 64) / 2
    assert bool(((x - y).abs().reshape(-1) <= bound * (1 + 1e-5) + 1e-7).all())


def test_int8_stochastic_deterministic_per_seed_and_within_one_code():
    x = torch.randn(300)
    a = quant.quantize_int8(x, 64, stochastic=True, seed=7)
    b = quant.quantize_int8(x, 64, stochastic=True, seed=7)
    c = quant.quantize_int8(x, 64, stochastic=True, seed=8)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    y = quant.dequantize_int8(*a, group_size=64)
    assert bool(((x - y).abs() < _per_element(a[1], 300, 64) * (1 + 1e-5)).all())


def test_stochastic_round_unbiased_and_deterministic():
    x = torch.full((20000,), 2.3)
    r = quant.stochastic_round(x, seed=123)
    assert torch.equal(r, quant.stochastic_round(x, seed=123))
    assert set(r.unique().tolist()) == {2.0, 3.0}
    # mean of Bernoulli(0.3): std of the mean = sqrt(0.21 / 20000) ≈ 0.0032; 5 sigma
    assert abs(r.mean().item() - 2.3) < 0.017
    assert torch.round(x).mean().item() == 2.0  # round-to-nearest is biased here
    with pytest.raises(TypeError, match="seed"):
        quant.stochastic_round(x, seed=1.5)
