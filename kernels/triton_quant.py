"""Triton quantization kernels, bit-compatible with the torch references in ``lrgrad.quant``.

"Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank Gradients",
Zhang et al. 2024, arXiv:2407.08296; "8-bit Optimizers via Block-wise Quantization",
Dettmers et al. 2021, arXiv:2110.02861. The formats (group layout, fp16 scale rounded up,
zero point, nibble order, companded 8-bit codes) are documented in ``lrgrad.quant``.

One program per group/block: a first loop over the group reduces its statistics, a second
loop quantizes (the group is then in L1/L2, so DRAM sees x once). Divisions and square roots
are IEEE-rounded (``div_rn``/``sqrt_rn``) and rounding is half-to-even, as in torch, so the
deterministic codes equal the reference's exactly. Stochastic rounding draws from Triton's
Philox generator, ``tl.rand(seed, flat_index)``: deterministic given the seed and independent of
the launch configuration, but a different stream from the reference's ``torch.Generator``.

NaN: a group (block) holding a NaN gets NaN statistics (min/max zero point, absmax), so it
dequantizes to NaN everywhere, and NaN elements get code 0 — the same in both paths (hardware
min/max drop NaN, so the kernels count NaNs explicitly). Contraction is off
(``enable_fp_fusion=False``): one rounding per operation, as torch's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrgrad.kernels.dispatch import interpreting
from lrgrad.kernels.triton_utils import device_guard, fix_bf16, to_out
from lrgrad.quant import SIGNED_LEVELS, SIGNED_POWER, UNSIGNED_LEVELS, UNSIGNED_POWER, ZERO_LIMIT

assert SIGNED_POWER == 2.0 and UNSIGNED_POWER == 4.0, "the kernels hard-code sqrt and sqrt∘sqrt"


def _chunk(group_size: int) -> int:
    limit = 64 if interpreting() else 1024
    return max(2, min(limit, triton.next_power_of_2(group_size)))


def _elementwise_block() -> int:
    return 256 if interpreting() else 1024


@triton.jit
def _round_half_even(x):
    """torch.round: exact (no x + 0.5 rounding trap), ties to even."""
    f = tl.floor(x)
    d = x - f  # exact for |x| < 2^23
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return f + up.to(tl.float32)


@triton.jit
def _minmax_quant_kernel(
    x_ptr, q_ptr, scale_ptr, zero_ptr, numel, group_size, seed,
    LEVELS: tl.constexpr, ZERO_LIM: tl.constexpr, INT4: tl.constexpr, STOCHASTIC: tl.constexpr,
    CHUNK: tl.constexpr,
):
    HALF: tl.constexpr = CHUNK // 2
    g = tl.program_id(0).to(tl.int64)
    start = g * group_size
    # Elements as (pair, nibble) tiles so INT4 codes can be packed two per byte in registers.
    local = 2 * tl.arange(0, HALF)[:, None] + tl.arange(0, 2)[None, :]
    # loop-carried scalars typed up front (fp32 tensors, not Python floats)
    lo = tl.full([], float("inf"), tl.float32)
    hi = tl.full([], float("-inf"), tl.float32)
    nans = tl.full([], 0, tl.int32)
    for c0 in range(0, group_size, CHUNK):
        idx = c0 + local
        offs = start + idx
        mask = (idx < group_size) & (offs < numel)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.min(tl.min(tl.where(mask, x, float("inf")), axis=1), axis=0))
        hi = tl.maximum(hi, tl.max(tl.max(tl.where(mask, x, float("-inf")), axis=1), axis=0))
        nans += tl.sum(tl.sum((mask & (x != x)).to(tl.int32), axis=1), axis=0)
    # tl.min/tl.max/tl.minimum/tl.maximum drop NaN on hardware (min.f32/max.f32); torch's amin/amax
    # propagate it. Count NaNs explicitly so a NaN group gets NaN statistics, as in the reference.
    lo = tl.where(nans > 0, float("nan"), lo)
    hi = tl.where(nans > 0, float("nan"), hi)
    magnitude = tl.maximum(tl.abs(lo), tl.abs(hi))
    scale = tl.maximum(tl.div_rn(hi - lo, LEVELS * 1.0), tl.div_rn(magnitude, ZERO_LIM))
    scale = tl.where(scale > 0, scale, 1.0)
    # fp16 scale rounded *up* (round to nearest, then one ulp up if that went below)
    half = scale.to(tl.float16)
    bumped = (half.to(tl.int16, bitcast=True) + 1).to(tl.float16, bitcast=True)
    half = tl.where(half.to(tl.float32) < scale, bumped, half)
    scale_f = half.to(tl.float32)
    zero_h = _round_half_even(tl.div_rn(-lo, scale_f)).to(tl.float16)
    zero_f = zero_h.to(tl.float32)
    tl.store(scale_ptr + g, half)
    tl.store(zero_ptr + g, zero_h)
    for c0 in range(0, group_size, CHUNK):
        idx = c0 + local
        offs = start + idx
        mask = (idx < group_size) & (offs < numel)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        scaled = tl.div_rn(x, scale_f)
        if STOCHASTIC:
            floor = tl.floor(scaled)
            draw = tl.rand(seed, offs.to(tl.int32))
            rounded = floor + (draw < scaled - floor).to(tl.float32)
        else:
            rounded = _round_half_even(scaled)
        q = rounded + zero_f
        q = tl.where(q != q, 0.0, q)  # NaN (a NaN group's zero point) → code 0, as the reference
        q = tl.minimum(tl.maximum(q, 0.0), LEVELS * 1.0)
        if INT4:
            q = tl.where(mask, q, 0.0).to(tl.int32)
            nibble = tl.arange(0, 2)[None, :]
            low = tl.sum(tl.where(nibble == 0, q, 0), axis=1)
            high = tl.sum(tl.where(nibble == 1, q, 0), axis=1)
            byte_idx = c0 // 2 + tl.arange(0, HALF)
            byte_offs = start // 2 + byte_idx
            byte_mask = (2 * byte_idx < group_size) & (2 * byte_offs < numel)
            tl.store(q_ptr + byte_offs, (low | (high << 4)).to(tl.uint8), mask=byte_mask)
        else:
            tl.store(q_ptr + offs, (q - 128.0).to(tl.int8), mask=mask)


def minmax_quantize(
    flat: torch.Tensor, group_size: int, int4: bool, stochastic: bool = False, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero) of a contiguous 1-D tensor; INT4 needs an even ``group_size``."""
    numel = flat.numel()
    groups = triton.cdiv(numel, group_size)
    if int4:
        codes = torch.empty(triton.cdiv(numel, 2), dtype=torch.uint8, device=flat.device)
    else:
        codes = torch.empty(numel, dtype=torch.int8, device=flat.device)
    scale = torch.empty(groups, dtype=torch.float16, device=flat.device)
    zero = torch.empty(groups, dtype=torch.float16, device=flat.device)
    with device_guard(flat):
        _minmax_quant_kernel[(groups,)](
            flat, codes, scale, zero, numel, group_size, int(seed),
            LEVELS=15 if int4 else 255, ZERO_LIM=ZERO_LIMIT, INT4=int4, STOCHASTIC=stochastic,
            CHUNK=_chunk(group_size), enable_fp_fusion=False,
        )
    return codes, scale, zero


@triton.jit
def _minmax_dequant_kernel(
    q_ptr, scale_ptr, zero_ptr, out_ptr, numel, group_size, INT4: tl.constexpr, BLOCK: tl.constexpr,
    FIX_BF16: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if INT4:
        byte = tl.load(q_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
        code = ((byte >> (4 * (offs % 2)).to(tl.int32)) & 0x0F).to(tl.float32)
    else:
        code = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32) + 128.0
    g = offs // group_size
    scale = tl.load(scale_ptr + g, mask=mask, other=1.0).to(tl.float32)
    zero = tl.load(zero_ptr + g, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, to_out(scale * (code - zero), out_ptr.dtype.element_ty, FIX_BF16), mask=mask)


def minmax_dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, numel: int, group_size: int, int4: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    out = torch.empty(numel, dtype=dtype, device=codes.device)
    if numel:
        block = _elementwise_block()
        with device_guard(codes):
            _minmax_dequant_kernel[(triton.cdiv(numel, block),)](
                codes, scale, zero, out, numel, group_size, INT4=int4, BLOCK=block, FIX_BF16=fix_bf16(),
                enable_fp_fusion=False,
            )
    return out


@triton.jit
def _blockwise_quant_kernel(
    x_ptr, q_ptr, absmax_ptr, numel, block_size,
    SIGNED: tl.constexpr, LEVELS: tl.constexpr, CHUNK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    start = b * block_size
    local = tl.arange(0, CHUNK)
    amax = tl.zeros([], tl.float32)
    nans = tl.full([], 0, tl.int32)
    for c0 in range(0, block_size, CHUNK):
        idx = c0 + local
        offs = start + idx
        mask = (idx < block_size) & (offs < numel)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
        nans += tl.sum((mask & (x != x)).to(tl.int32), axis=0)
    amax = tl.where(nans > 0, float("nan"), amax)  # hardware max drops NaN; torch's amax propagates it
    tl.store(absmax_ptr + b, amax)
    safe = tl.where(amax > 0, amax, 1.0)
    for c0 in range(0, block_size, CHUNK):
        idx = c0 + local
        offs = start + idx
        mask = (idx < block_size) & (offs < numel)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        ratio = tl.div_rn(tl.abs(x), safe)
        normalized = tl.where(ratio != ratio, ratio, tl.minimum(ratio, 1.0))  # clamp that keeps NaN, as torch's
        if SIGNED:
            code = _round_half_even(tl.sqrt_rn(normalized) * LEVELS)
            code = tl.where(code != code, 0.0, code)  # NaN elements → code 0, as the reference
            code = tl.where(x > 0, code, tl.where(x < 0, -code, 0.0))
            tl.store(q_ptr + offs, code.to(tl.int8), mask=mask)
        else:
            code = _round_half_even(tl.sqrt_rn(tl.sqrt_rn(normalized)) * LEVELS)
            code = tl.where(code != code, 0.0, code)
            tl.store(q_ptr + offs, code.to(tl.uint8), mask=mask)


def blockwise_quantize(flat: torch.Tensor, block_size: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    numel = flat.numel()
    blocks = triton.cdiv(numel, block_size)
    codes = torch.empty(numel, dtype=torch.int8 if signed else torch.uint8, device=flat.device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=flat.device)
    with device_guard(flat):
        _blockwise_quant_kernel[(blocks,)](
            flat, codes, absmax, numel, block_size,
            SIGNED=signed, LEVELS=SIGNED_LEVELS if signed else UNSIGNED_LEVELS, CHUNK=_chunk(block_size),
            enable_fp_fusion=False,
        )
    return codes, absmax


@triton.jit
def _blockwise_dequant_kernel(
    q_ptr, absmax_ptr, out_ptr, numel, block_size, SIGNED: tl.constexpr, LEVELS: tl.constexpr,
    BLOCK: tl.constexpr, FIX_BF16: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32)
    amax = tl.load(absmax_ptr + offs // block_size, mask=mask, other=0.0)
    y = tl.div_rn(c, LEVELS * 1.0)
    if SIGNED:
        values = y * tl.abs(y)  # sign(y)·y²
    else:
        y2 = y * y
        values = y2 * y2
    tl.store(out_ptr + offs, to_out(values * amax, out_ptr.dtype.element_ty, FIX_BF16), mask=mask)


def blockwise_dequantize(
    codes: torch.Tensor, absmax: torch.Tensor, numel: int, block_size: int, signed: bool, dtype: torch.dtype,
) -> torch.Tensor:
    out = torch.empty(numel, dtype=dtype, device=codes.device)
    if numel:
        block = _elementwise_block()
        with device_guard(codes):
            _blockwise_dequant_kernel[(triton.cdiv(numel, block),)](
                codes, absmax, out, numel, block_size,
                SIGNED=signed, LEVELS=SIGNED_LEVELS if signed else UNSIGNED_LEVELS, BLOCK=block, FIX_BF16=fix_bf16(),
                enable_fp_fusion=False,
            )
    return out


@triton.jit
def _stochastic_round_kernel(x_ptr, out_ptr, numel, seed, BLOCK: tl.constexpr, FIX_BF16: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    floor = tl.floor(x)
    draw = tl.rand(seed, offs.to(tl.int32))
    out = floor + (draw < x - floor).to(tl.float32)
    tl.store(out_ptr + offs, to_out(out, out_ptr.dtype.element_ty, FIX_BF16), mask=mask)


def stochastic_round(flat: torch.Tensor, seed: int) -> torch.Tensor:
    numel = flat.numel()
    out = torch.empty_like(flat)
    if numel:
        block = _elementwise_block()
        grid = (triton.cdiv(numel, block),)
        with device_guard(flat):
            _stochastic_round_kernel[grid](flat, out, numel, int(seed), BLOCK=block, FIX_BF16=fix_bf16(),
                                           enable_fp_fusion=False)
    return out
