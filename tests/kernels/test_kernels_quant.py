"""Triton quantization kernels vs the torch references in lrgrad.quant (exact codes and statistics)."""

from __future__ import annotations

import math

import pytest
import torch

from lrgrad import quant as ref
from lrgrad.kernels import quantization as kq

# (shape, group): non-multiples of the group, 1-row, a group larger than the tensor, tiny groups
CASES = [((37, 21), 64), ((1, 7), 4), ((130,), 256), ((5, 33), 10), ((3, 40), 2)]
DTYPES = [torch.float32, torch.bfloat16]


def _data(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 3 + 0.5).to(dtype)


@pytest.fixture
def no_reference(forbid):
    forbid(ref, "quantize_int4", "dequantize_int4", "quantize_int8", "dequantize_int8",
           "quantize_blockwise_8bit", "dequantize_blockwise_8bit", "stochastic_round")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,group", CASES)
def test_int4_matches_reference_exactly(shape, group, dtype, forbid):
    x = _data(shape, dtype, seed=group)
    packed_r, scale_r, zero_r = ref.quantize_int4(x, group)
    deq_r = ref.dequantize_int4(packed_r, scale_r, zero_r, shape, group)
    forbid(ref, "quantize_int4", "dequantize_int4")
    packed, scale, zero = kq.quantize_int4(x, group)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(x.numel() / 2)
    assert torch.equal(packed, packed_r) and torch.equal(scale, scale_r) and torch.equal(zero, zero_r)
    deq = kq.dequantize_int4(packed, scale, zero, shape, group)
    assert deq.shape == x.shape and torch.equal(deq, deq_r)
    # and the format's own guarantee: |x − x̂| ≤ scale / 2 per element
    index = torch.arange(x.numel()) // group
    assert bool(((deq - x.float()).abs().reshape(-1) <= scale.float()[index] / 2).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,group", CASES)
def test_int8_matches_reference_exactly(shape, group, dtype, forbid):
    x = _data(shape, dtype, seed=group + 1)
    codes_r, scale_r, zero_r = ref.quantize_int8(x, group)
    deq_r = ref.dequantize_int8(codes_r, scale_r, zero_r, group_size=group, dtype=dtype)
    forbid(ref, "quantize_int8", "dequantize_int8")
    codes, scale, zero = kq.quantize_int8(x, group)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert torch.equal(codes, codes_r) and torch.equal(scale, scale_r) and torch.equal(zero, zero_r)
    deq = kq.dequantize_int8(codes, scale, zero, group_size=group, dtype=dtype)
    assert deq.dtype == dtype and torch.equal(deq, deq_r)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,group", CASES)
def test_blockwise_8bit_matches_reference(shape, group, dtype, signed, forbid):
    x = _data(shape, dtype, seed=group + 2)
    if not signed:
        x = x * x  # second moments are non-negative
    codes_r, absmax_r = ref.quantize_blockwise_8bit(x, group, signed)
    deq_r = ref.dequantize_blockwise_8bit(codes_r, absmax_r, None, group, signed)
    forbid(ref, "quantize_blockwise_8bit", "dequantize_blockwise_8bit")
    codes, absmax = kq.quantize_blockwise_8bit(x, group, signed)
    assert codes.dtype == codes_r.dtype and codes.shape == x.shape
    assert torch.equal(absmax, absmax_r)
    # sqrt vs pow(·, 1/p) may round a tie differently: at most one code apart
    diff = (codes.int() - codes_r.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.01
    deq = kq.dequantize_blockwise_8bit(codes_r, absmax_r, None, group, signed)
    # y² (y⁴) by multiplications vs torch.pow: within two fp32 roundings of the value
    torch.testing.assert_close(deq, deq_r, rtol=4 * torch.finfo(torch.float32).eps, atol=0)


def test_special_groups_all_zero_and_constant(no_reference):
    x = torch.zeros(4, 16)
    x[1] = 0.7  # a constant group
    x[2, 3] = -2.0
    packed, scale, zero = kq.quantize_int4(x, 16)
    deq = kq.dequantize_int4(packed, scale, zero, x.shape, 16)
    assert torch.equal(deq[0], x[0]) and torch.equal(deq[3], x[3])  # all-zero groups exactly
    assert (deq[1] - 0.7).abs().max() <= scale[1].float() / 2
    codes, absmax = kq.quantize_blockwise_8bit(x, 16)
    assert torch.equal(absmax, torch.tensor([0.0, 0.7, 2.0, 0.0]))
    assert torch.equal(kq.dequantize_blockwise_8bit(codes, absmax, block_size=16)[0], x[0])


def test_odd_group_int4_falls_back_to_reference():
    x = _data((3, 5), torch.float32, seed=9)
    got = kq.quantize_int4(x, 7)
    want = ref.quantize_int4(x, 7)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ---------------------------------------------------------------- stochastic rounding
def test_stochastic_round_deterministic_per_seed_and_unbiased(no_reference):
    n = 4096
    frac = torch.linspace(0.05, 0.95, n)
    x = torch.floor(torch.randn(n) * 5) + frac
    a = kq.stochastic_round(x, seed=1234)
    b = kq.stochastic_round(x, seed=1234)
    c = kq.stochastic_round(x, seed=1235)
    assert torch.equal(a, b), "same seed must give the same draws"
    assert not torch.equal(a, c), "another seed must give other draws"
    floor = torch.floor(x)
    assert bool(((a == floor) | (a == floor + 1)).all())
    # unbiased: the mean rounding error is 0 within 4 standard deviations of its estimate
    sigma = math.sqrt(float((frac * (1 - frac)).sum())) / n
    assert abs(float((a - x).mean())) < 4 * sigma
    # and each element rounds up with probability frac: compare the two halves' up-rates
    up = (a > floor).float()
    assert abs(float(up[: n // 2].mean()) - float(frac[: n // 2].mean())) < 4 * math.sqrt(0.25 / (n // 2))
    assert abs(float(up[n // 2:].mean()) - float(frac[n // 2:].mean())) < 4 * math.sqrt(0.25 / (n // 2))


def test_stochastic_round_seed_none_follows_torch_seed():
    x = torch.rand(64) * 10
    torch.manual_seed(5)
    a = kq.stochastic_round(x)
    torch.manual_seed(5)
    assert torch.equal(a, kq.stochastic_round(x))


def test_int8_stochastic_requantization(no_reference):
    group, groups = 64, 48
    gen = torch.Generator().manual_seed(3)
    pattern = torch.rand(group, generator=gen) * 2 - 1
    pattern[0], pattern[1] = -1.0, 1.0  # every group shares min/max, hence its scale
    x = pattern.repeat(groups)
    codes, scale, zero = kq.quantize_int8(x, group, stochastic=True, seed=77)
    again = kq.quantize_int8(x, group, stochastic=True, seed=77)
    other = kq.quantize_int8(x, group, stochastic=True, seed=78)
    assert torch.equal(codes, again[0]) and torch.equal(scale, again[1]) and torch.equal(zero, again[2])
    assert not torch.equal(codes, other[0])
    # the deterministic codes bracket the stochastic ones: floor or ceil of x / scale
    nearest, scale_n, zero_n = kq.quantize_int8(x, group)
    assert torch.equal(scale, scale_n) and torch.equal(zero, zero_n)
    s = scale.float()[0]
    exact = x / s + zero.float()[0] - 128
    assert bool(((codes.float() == torch.floor(exact)) | (codes.float() == torch.ceil(exact))).all())
    # unbiased: averaging the groups (independent draws) recovers x within 4σ (σ ≤ scale / 2 / √groups)
    deq = kq.dequantize_int8(codes, scale, zero, group_size=group).view(groups, group)
    # (the group's min/max elements are left out: there x / scale + zero may fall outside [0, 255]
    # and the format clamps, which no rounding can make unbiased)
    error = (deq.mean(dim=0) - pattern).abs()[2:]
    assert bool((error <= 4.5 * (s / 2) / math.sqrt(groups)).all())
    # nearest rounding is biased on the same data (the test can tell the two apart)
    deq_n = kq.dequantize_int8(nearest, scale_n, zero_n, group_size=group).view(groups, group)
    assert float((deq_n.mean(dim=0) - pattern).abs()[2:].max()) > 0.2 * s


def test_bad_input():
    with pytest.raises(TypeError, match="x"):
        kq.quantize_int4(torch.arange(4))
    with pytest.raises(ValueError, match="group_size"):
        kq.quantize_int8(torch.zeros(4), group_size=0)
    with pytest.raises(TypeError, match="seed"):
        kq.quantize_int8(torch.zeros(4), stochastic=True, seed=1.5)
    packed, scale, zero = kq.quantize_int4(torch.randn(10), 4)
    with pytest.raises(ValueError, match="packed"):
        kq.dequantize_int4(packed, scale, zero, (12,), 4)
    with pytest.raises(ValueError, match="scale/zero"):
        kq.dequantize_int4(packed, scale[:-1], zero[:-1], (10,), 4)
    with pytest.raises(TypeError, match="codes"):
        kq.dequantize_blockwise_8bit(torch.zeros(4, dtype=torch.uint8), torch.ones(1), block_size=4, signed=True)


# ---------------------------------------------------------------- NaN inputs: both paths agree
def _with_nan(group: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    x = _data((groups * group,), dtype, seed=group + 5)
    x[group + 3] = float("nan")  # one NaN in group 1; every other group is finite
    return x


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_minmax_nan_group_propagates_in_both_paths(bits, dtype, no_reference):
    # Hardware min/max drop NaN (the interpreter's reductions do too): without an explicit NaN count
    # the kernel would return finite statistics for a group whose torch statistics are NaN.
    group, groups = 16, 4
    x = _with_nan(group, groups, dtype)
    finite = x.clone()
    finite[group + 3] = 0.0
    if bits == 4:
        codes, scale, zero = kq.quantize_int4(x, group)
        deq = kq.dequantize_int4(codes, scale, zero, x.shape, group)
        lanes = torch.stack([codes & 0x0F, codes >> 4], dim=1).reshape(-1)  # one code per element
        codes_f, scale_f, zero_f = kq.quantize_int4(finite, group)
        lanes_f = torch.stack([codes_f & 0x0F, codes_f >> 4], dim=1).reshape(-1)
        code_zero = 0
    else:
        codes, scale, zero = kq.quantize_int8(x, group)
        deq = kq.dequantize_int8(codes, scale, zero, group_size=group)
        lanes = codes.reshape(-1)
        codes_f, scale_f, zero_f = kq.quantize_int8(finite, group)
        lanes_f = codes_f.reshape(-1)
        code_zero = -128  # code 0 stored as 0 − 128
    nan_group = slice(group, 2 * group)
    # the NaN group: scale 1, zero point NaN, every code 0, every dequantized value NaN
    assert scale[1].item() == 1.0 and math.isnan(zero[1].item())
    assert bool((lanes[nan_group] == code_zero).all()) and bool(deq[nan_group].isnan().all())
    # the other groups are untouched by the NaN next door
    keep = torch.ones(groups, dtype=torch.bool)
    keep[1] = False
    assert torch.equal(scale[keep], scale_f[keep]) and torch.equal(zero[keep], zero_f[keep])
    element_keep = keep.repeat_interleave(group)
    assert torch.equal(lanes[element_keep], lanes_f[element_keep])
    assert not deq[element_keep].isnan().any()


@pytest.mark.parametrize("bits", [4, 8])
def test_minmax_nan_reference_agrees_with_kernel(bits, monkeypatch):
    group = 16
    x = _with_nan(group, 4, torch.float32)
    quant, dequant = (("quantize_int4", "dequantize_int4") if bits == 4 else ("quantize_int8", "dequantize_int8"))
    kernel = getattr(kq, quant)(x, group)
    reference = getattr(ref, quant)(x, group)
    assert all(_same(a, b) for a, b in zip(kernel, reference))
    args = (x.shape, group) if bits == 4 else (None, group)
    assert _same(getattr(kq, dequant)(*kernel, *args), getattr(ref, dequant)(*reference, *args))


@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_nan_and_inf_agree_in_both_paths(signed, forbid):
    group = 16
    x = _data((4 * group,), torch.float32, seed=9).abs()
    x = x if not signed else x * torch.where(torch.arange(4 * group) % 3 == 0, -1.0, 1.0)
    x[group + 2] = float("nan")  # block 1: a NaN
    x[2 * group + 5] = float("inf")  # block 2: an inf (|x| / absmax = inf / inf = NaN)
    codes_r, absmax_r = ref.quantize_blockwise_8bit(x, group, signed)
    forbid(ref, "quantize_blockwise_8bit", "dequantize_blockwise_8bit")
    codes, absmax = kq.quantize_blockwise_8bit(x, group, signed)
    assert math.isnan(absmax[1].item()) and _same(absmax, absmax_r)
    assert codes[group + 2].item() == 0 and codes[2 * group + 5].item() == 0  # NaN / inf/inf → code 0
    assert torch.equal(codes, codes_r)
    deq = kq.dequantize_blockwise_8bit(codes, absmax, None, group, signed)
    assert bool(deq[group:2 * group].isnan().all()) and not deq[:group].isnan().any()
