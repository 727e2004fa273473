"""APOLLO / Fira channel passes (``channel_sumsq``, ``channel_scale_update_``): Triton under the
interpreter vs the torch reference, and the reference vs written-out fp64 math."""

from __future__ import annotations

import pytest
import torch
from kernel_tolerances import U32, assert_within, unit_roundoff

from lrgrad.kernels import channel_scale, channel_scale_update_, channel_sumsq

# odd shapes (not multiples of the 16-wide interpreter tiles), 1-row, 1-column, tall, wide
SHAPES = [(37, 21), (1, 33), (19, 1), (50, 9), (6, 45)]


def _operands(m, n, dtype, gen):
    return (torch.randn(m, n, generator=gen).to(dtype), torch.randn(m, n, generator=gen),
            torch.randn(m, n, generator=gen))


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("channel_dim", [0, 1])
@pytest.mark.parametrize("shape", SHAPES)
def test_channel_sumsq_matches_fp64(forbid, shape, channel_dim, with_base):
    m, n = shape
    gen = torch.Generator().manual_seed(m * 100 + n + channel_dim)
    _, g, b = _operands(m, n, torch.float32, gen)
    base = b if with_base else None
    x = g.double() - (b.double() if with_base else 0.0)
    expected = (x * x).sum(dim=1 - channel_dim)  # written out, not the reference
    forbid(channel_scale, "channel_sumsq_reference")
    out = channel_sumsq(g, base, channel_dim)
    assert out.dtype == torch.float32 and out.shape == (g.shape[channel_dim],)
    length = g.shape[1 - channel_dim]
    bound = 2 * (length + 2) * U32 * (g.double().abs() + (b.double().abs() if with_base else 0.0)).pow(2).sum(
        dim=1 - channel_dim) * 2
    assert_within(out, expected, bound)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("channel_dim", [0, 1])
@pytest.mark.parametrize("shape", SHAPES)
def test_channel_scale_update_matches_fp64(forbid, shape, channel_dim, with_base, param_dtype):
    m, n = shape
    gen = torch.Generator().manual_seed(m * 100 + n + 7 * channel_dim)
    param, g, b = _operands(m, n, param_dtype, gen)
    scales = torch.rand(g.shape[channel_dim], generator=gen) + 0.5
    alpha, decay = -0.37, 0.993
    s = scales.double()[:, None] if channel_dim == 0 else scales.double()[None, :]
    x = g.double() - (b.double() if with_base else 0.0)
    expected = decay * param.double() + alpha * s * x  # written out, not the reference
    forbid(channel_scale, "channel_scale_update_reference")
    out = channel_scale_update_(param, g, scales, channel_dim, alpha=alpha, decay=decay, base=b if with_base else None)
    assert out is param and param.dtype == param_dtype
    terms = decay * param.double().abs() + abs(alpha) * s * (g.double().abs() + (b.double().abs() if with_base else 0))
    bound = 4 * U32 * terms + unit_roundoff(param_dtype) * expected.abs() * (param_dtype != torch.float32)
    assert_within(param, expected, bound + torch.finfo(torch.float32).tiny)


def test_strided_views_need_no_copy(forbid):
    gen = torch.Generator().manual_seed(5)
    storage_p, storage_g = torch.randn(23, 40, generator=gen), torch.randn(23, 40, generator=gen)
    param, g = storage_p.T, storage_g.T  # 40 x 23, column-major
    scales = torch.rand(23, generator=gen)
    expected_sq = (g.double() ** 2).sum(dim=0)
    expected = 0.9 * param.double() + 0.5 * g.double() * scales.double()[None, :]
    forbid(channel_scale, "channel_sumsq_reference", "channel_scale_update_reference")
    torch.testing.assert_close(channel_sumsq(g, None, 1).double(), expected_sq, rtol=1e-5, atol=1e-6)
    channel_scale_update_(param, g, scales, 1, alpha=0.5, decay=0.9)
    torch.testing.assert_close(storage_p.T.double(), expected, rtol=1e-6, atol=1e-6)


def test_fp64_uses_the_reference_exactly():
    gen = torch.Generator().manual_seed(2)
    param = torch.randn(9, 7, generator=gen, dtype=torch.float64)
    g = torch.randn(9, 7, generator=gen, dtype=torch.float64)
    scales = torch.rand(9, generator=gen, dtype=torch.float64)
    expected = 0.5 * param + (-2.0) * g * scales[:, None]
    channel_scale_update_(param, g, scales, 0, alpha=-2.0, decay=0.5)
    torch.testing.assert_close(param, expected, rtol=1e-15, atol=1e-15)
    assert channel_sumsq(g).dtype == torch.float64


@pytest.mark.parametrize("call, error, name", [
    (lambda g: channel_sumsq(g, None, 2), ValueError, "channel_dim"),
    (lambda g: channel_sumsq(g[0]), ValueError, "grad"),
    (lambda g: channel_sumsq(g, g[:2]), ValueError, "base"),
    (lambda g: channel_scale_update_(g.clone(), g, torch.ones(3), 0, 1.0, 1.0), ValueError, "scales"),
    (lambda g: channel_scale_update_(g[:2].clone(), g, torch.ones(4), 0, 1.0, 1.0), ValueError, "param"),
])
def test_misuse_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call(torch.randn(4, 5))
