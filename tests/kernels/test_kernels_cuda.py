"""The compiled kernels on a CUDA GPU against the torch references, at every dtype and tile family
the dispatch code uses (native bf16/fp16 MMA, TF32, the IEEE fp32 path, the quantizers' exactness,
NaN semantics, no FMA contraction, the device guard).

GPU-only: marked ``cuda`` and skipped unless a CUDA device is present and ``TRITON_INTERPRET`` is
unset. ``make gpu-check`` (experiments/tools/gpu_check.py) runs them with
``TRITON_INTERPRET=0 pytest -m cuda tests/kernels``; on CPU the same kernels are checked through the
interpreter by the other files here, and compiled (not run) by test_kernels_aot.py.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from kernel_tolerances import U32, assert_within, gemm_bound, unit_roundoff

from lrgrad import kernels
from lrgrad import quant as qref
from lrgrad.kernels import reference
from lrgrad.kernels.newton_schulz import newton_schulz_reference
from lrgrad.kernels.normalize import auon_normalize_reference

pytestmark = pytest.mark.cuda
if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("GPU-only: needs CUDA and TRITON_INTERPRET unset (make gpu-check runs it)", allow_module_level=True)

DEV = "cuda"
_F32, _BF16, _F16 = torch.float32, torch.bfloat16, torch.float16
#: lowrank_update_ (param, update, basis) dtypes the optimizers produce, and whether TF32 is on
GEMM_DTYPES = {
    "bf16": ((_BF16, _BF16, _BF16), False), "fp16": ((_F16, _F16, _F16), False),
    "fp32-tf32": ((_F32, _F32, _F32), True), "bf16param-fp32ops": ((_BF16, _F32, _F32), False),
    "mixed-fp32xbf16": ((_F32, _F32, _BF16), False),
}
#: (m, n, r): the 64×64 tile family (max(m, n) ≤ 256) and the 128×128 one, one unaligned each
GEMM_SHAPES = {"tile64": (192, 256, 32), "tile64-odd": (37, 201, 5), "tile128": (1024, 768, 128),
               "tile128-odd": (1000, 777, 100)}
TF32_ROUNDOFF = 2.0**-11  # a TF32 operand keeps 10 mantissa bits


@pytest.fixture
def tf32():
    saved = torch.backends.cuda.matmul.allow_tf32

    def set_(value: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32 = value

    yield set_
    torch.backends.cuda.matmul.allow_tf32 = saved


def _randn(*shape, dtype=_F32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEV)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", GEMM_SHAPES)
@pytest.mark.parametrize("combo", GEMM_DTYPES)
def test_lowrank_update(combo, family, side, tf32, forbid):
    (param_dtype, update_dtype, basis_dtype), allow_tf32 = GEMM_DTYPES[combo]
    tf32(allow_tf32)
    m, n, r = GEMM_SHAPES[family]
    param = _randn(m, n, dtype=param_dtype, seed=1)
    update = _randn(*((m, r) if side == "right" else (r, n)), dtype=update_dtype, seed=2)
    basis = _randn(*((r, n) if side == "right" else (m, r)), dtype=basis_dtype, seed=3)
    alpha, decay = -0.37, 0.993
    left, right = (update, basis) if side == "right" else (basis, update)
    expected = decay * param.double() + alpha * (left.double() @ right.double())
    forbid(reference, "lowrank_update_")  # the Triton kernel must be the one running
    kernels.lowrank_update_(param, update, basis, side, alpha=alpha, decay=decay)
    product = abs(alpha) * (left.double().abs() @ right.double().abs())
    bound = gemm_bound(product, abs(decay) * param.double().abs(), r, param_dtype, expected)
    if allow_tf32:
        bound = bound + 2 * TF32_ROUNDOFF * product  # both operands rounded to TF32
    assert_within(param, expected, bound)


NS_SHAPES = {"tile64": (128, 256), "tile64-tall": (250, 90), "tile128": (512, 1536), "tile128-odd": (700, 333)}


@pytest.mark.parametrize("family", NS_SHAPES)
@pytest.mark.parametrize("dtype,allow_tf32", [(_BF16, False), (_F16, False), (_F32, True)],
                         ids=["bf16", "fp16", "fp32-tf32"])
def test_newton_schulz(dtype, allow_tf32, family, tf32):
    tf32(allow_tf32)
    x = _randn(*NS_SHAPES[family], dtype=dtype, seed=4)
    expected = newton_schulz_reference(x.double())
    got = kernels.newton_schulz(x)
    assert got.dtype == dtype and got.shape == x.shape
    err = torch.linalg.matrix_norm(got.double() - expected) / torch.linalg.matrix_norm(expected)
    roundoff = TF32_ROUNDOFF if dtype == _F32 else unit_roundoff(dtype)
    # the iterates are stored in x.dtype (fp32 accumulation): no worse than torch doing the same
    # iteration in that dtype, and a few roundings of O(1) singular values in absolute terms
    torch_err = (torch.linalg.matrix_norm(newton_schulz_reference(x).double() - expected)
                 / torch.linalg.matrix_norm(expected))
    assert err <= max(2 * torch_err, 16 * roundoff), (err.item(), torch_err.item())


def test_syrk_is_exactly_symmetric_with_tensor_cores():
    from lrgrad.kernels import triton_matmul

    x = _randn(520, 700, dtype=_BF16, seed=5)
    out = torch.empty(520, 520, dtype=_BF16, device=DEV)
    triton_matmul.syrk(x, out)
    assert torch.equal(out, out.T)
    expected = x.double() @ x.double().T
    assert_within(out, expected, gemm_bound(x.double().abs() @ x.double().abs().T, torch.zeros(1, device=DEV),
                                            700, _BF16, expected))


@pytest.mark.parametrize("dtype", [_F32, _BF16])
def test_adam_direction(dtype, forbid):
    shape = (256, 1000)
    m, v, g = _randn(*shape, seed=6) * 0.1, _randn(*shape, seed=7).abs() * 0.01, _randn(*shape, seed=8)
    m, v, g = m.to(dtype), v.to(dtype), g.to(dtype)
    m_e, v_e = m.double(), v.double()
    m_e = m_e + 0.1 * (g.double() - m_e)
    v_e = 0.999 * v_e + 0.001 * g.double() ** 2
    u_e = (m_e / (1 - 0.9**3)) / (v_e.sqrt() / (1 - 0.999**3) ** 0.5 + 1e-8)
    forbid(reference, "adam_direction_")
    u = kernels.adam_direction_(m, v, g, 0.9, 0.999, 1e-8, 3)
    rnd = unit_roundoff(dtype)
    assert_within(m, m_e, 4 * (U32 + rnd) * (m_e.abs() + g.double().abs()))
    assert_within(v, v_e, 4 * (U32 + rnd) * (v_e.abs() + g.double() ** 2))
    assert_within(u, u_e, 16 * (U32 + rnd) * u_e.abs() + 1e-6 * u_e.abs().max())


def test_adam_direction_rounds_every_operation_no_fma():
    # enable_fp_fusion=False: each multiply and add rounds on its own, exactly as separate fp32
    # torch ops on the CPU (which cannot contract across ops); an FMA would differ in the last bit
    shape = (4096,)
    m0, v0, g = _randn(*shape, seed=9), _randn(*shape, seed=10).abs(), _randn(*shape, seed=11)
    b1, b2, eps, step = 0.9, 0.999, 1e-8, 5
    m_c, v_c, g_c = m0.cpu(), v0.cpu(), g.cpu()
    # one torch op per kernel operation (torch cannot contract across ops); 1 − β rounded from double
    m_e = m_c + torch.tensor(1.0 - b1) * (g_c - m_c)
    v_e = v_c * torch.tensor(b2) + torch.tensor(1.0 - b2) * (g_c * g_c)
    denom = v_e.sqrt() / torch.tensor((1.0 - b2**step) ** 0.5) + eps
    u_e = (m_e / torch.tensor(1.0 - b1**step)) / denom
    m, v = m0.clone(), v0.clone()
    u = kernels.adam_direction_(m, v, g, b1, b2, eps, step)
    # m and v are where contraction would act (a multiply feeding an add): bit-identical
    assert torch.equal(m.cpu(), m_e) and torch.equal(v.cpu(), v_e)
    torch.testing.assert_close(u.cpu(), u_e, rtol=4 * U32, atol=0)  # divisions and sqrt: IEEE-rounded


@pytest.mark.parametrize("dtype", [_F32, _BF16])
def test_auon_normalize(dtype):
    m = _randn(1000, 1500, dtype=dtype, seed=12)
    expected = auon_normalize_reference(m.double())
    got = kernels.auon_normalize(m)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, rtol=unit_roundoff(dtype) + 256 * U32, atol=0)


@pytest.mark.parametrize("group", [256, 4096, 2000, 6])
@pytest.mark.parametrize("dtype", [_F32, _BF16, _F16])
def test_minmax_quantizers_bit_identical_to_torch_on_cuda(dtype, group):
    x = _randn(64 * group + 3, dtype=dtype, seed=13) * 3 + 0.5
    for quant, dequant in ((kernels.quantize_int4, kernels.dequantize_int4),
                           (kernels.quantize_int8, kernels.dequantize_int8)):
        got = quant(x, group)
        want = getattr(qref, quant.__name__)(x, group)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), quant.__name__
        deq = dequant(*got, x.shape, group, dtype=dtype)
        assert torch.equal(deq, getattr(qref, dequant.__name__)(*want, x.shape, group, dtype=dtype))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("block", [256, 4096])
def test_blockwise_quantizer_on_cuda(block, signed):
    x = _randn(64 * block + 3, seed=14)
    x = x if signed else x * x
    codes, absmax = kernels.quantize_blockwise_8bit(x, block, signed)
    codes_r, absmax_r = qref.quantize_blockwise_8bit(x, block, signed)
    assert torch.equal(absmax, absmax_r)
    assert int((codes.int() - codes_r.int()).abs().max()) <= 1  # sqrt vs pow ties
    deq = kernels.dequantize_blockwise_8bit(codes_r, absmax_r, None, block, signed)
    torch.testing.assert_close(deq, qref.dequantize_blockwise_8bit(codes_r, absmax_r, None, block, signed),
                               rtol=4 * torch.finfo(_F32).eps, atol=0)


def test_nan_groups_on_hardware():
    # the hardware min/max drop NaN: the kernels must still give the reference's NaN statistics
    x = _randn(4 * 256, seed=15)
    x[256 + 7] = float("nan")
    codes, scale, zero = kernels.quantize_int8(x, 256)
    codes_r, scale_r, zero_r = qref.quantize_int8(x, 256)
    assert math.isnan(zero[1].item()) and scale[1].item() == 1.0
    assert torch.equal(codes, codes_r) and torch.equal(scale, scale_r)
    assert torch.equal(zero[[0, 2, 3]], zero_r[[0, 2, 3]])
    assert bool(kernels.dequantize_int8(codes, scale, zero)[256:512].isnan().all())
    b_codes, absmax = kernels.quantize_blockwise_8bit(x, 256)
    assert math.isnan(absmax[1].item()) and b_codes[256 + 7].item() == 0


def test_stochastic_rounding_deterministic_and_unbiased_on_cuda():
    x = torch.full((1 << 20,), 0.25, device=DEV)
    a, b = kernels.stochastic_round(x, seed=3), kernels.stochastic_round(x, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, kernels.stochastic_round(x, seed=4))
    assert abs(a.mean().item() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / x.numel())


def test_launch_on_a_non_current_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with torch.cuda.device(0):
        x = _randn(300, 500, dtype=_BF16, seed=16).to("cuda:1")
        got = kernels.newton_schulz(x)
        assert got.device == x.device
        expected = newton_schulz_reference(x.double())
        err = torch.linalg.matrix_norm(got.double() - expected) / torch.linalg.matrix_norm(expected)
        assert err < 16 * unit_roundoff(_BF16)
        codes, scale, zero = kernels.quantize_int8(x.float(), 256)
        assert torch.equal(codes, qref.quantize_int8(x.float(), 256)[0])
