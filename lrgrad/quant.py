"""Reference quantizers (plain torch): INT4 / INT8 group quantization and 8-bit blockwise moments.

"Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank
Gradients", Zhang et al. 2024, arXiv:2407.08296 (INT4 projection matrices,
INT8 weights with stochastic rounding), and "8-bit Optimizers via Block-wise
Quantization", Dettmers et al. 2021, arXiv:2110.02861 (blockwise optimizer states).

Every function is tensor-in / tensor-out; the fast kernels in ``lrgrad.kernels``
keep these names and signatures and are tested against them.

Group / block layout
    ``x`` is flattened in row-major (C) order and cut into consecutive groups of
    ``group_size`` elements; the last group may be shorter. Each group has its
    own statistics (``scale``/``zero`` or ``absmax``), one entry per group.

Asymmetric min–max group quantization (``quantize_int4``, ``quantize_int8``)
    ``scale = (max − min) / (2^b − 1)``, ``zero = round(−min / scale)``,
    ``q = clamp(round(x / scale) + zero)``, ``x ≈ scale · (q − zero)``.

    ``scale`` and ``zero`` are stored in fp16. Two details keep the error bound
    ``|x − dequant(q)| ≤ scale / 2`` (with the *stored* scale) true for every input:

    * the fp16 scale is rounded *up*, never down, so ``(max − min) / scale`` never
      exceeds ``2^b − 1`` and the largest element is never clamped;
    * ``scale ≥ max|x| / 1024``: the zero point then satisfies ``|zero| ≤ 1024 + 2^b``
      and is an exact integer in fp16 (fp16 holds integers exactly up to 2048).
      This only enlarges the scale of a group whose spread is below ``(2^b − 1)/1024``
      of its magnitude; there the error is still ``≤ max|x| / 2048``, the
      resolution of fp16 itself. A constant group ``c`` is reproduced exactly
      up to the fp16 rounding of its scale; an all-zero group exactly.

Inputs must be finite and within the fp16 range (``max − min < 65504·(2^b − 1)``);
Q-GaLore quantizes orthonormal bases and weights, far inside it.
"""

from __future__ import annotations

import math

import torch

from lrgrad._checks import check_int, check_numel, check_tensor

#: fp16 holds every integer up to 2048 exactly; the scale is kept >= max|x| / ZERO_LIMIT
ZERO_LIMIT = 1024.0

#: companding exponents of the 8-bit moment codes (see ``quantize_blockwise_8bit``)
SIGNED_POWER = 2.0
UNSIGNED_POWER = 4.0
SIGNED_LEVELS = 127
UNSIGNED_LEVELS = 255


def num_groups(numel: int, group_size: int) -> int:
    """Number of groups (or blocks) for ``numel`` elements: ``ceil(numel / group_size)``."""
    return -(-numel // group_size)


def _grouped(flat: torch.Tensor, group_size: int) -> torch.Tensor:
    """(groups, group_size) view of ``flat``; the last group is padded with its own last
    element, which leaves its min, max and absmax unchanged."""
    pad = num_groups(flat.numel(), group_size) * group_size - flat.numel()
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, group_size)


def _ungrouped_view(flat: torch.Tensor, group_size: int) -> torch.Tensor:
    """(groups, group_size) view of ``flat`` zero-padded to whole groups, so per-group
    statistics broadcast over ``[:, None]`` without an int64 index per element (which
    would cost 8 bytes per element and a gather on every dequantization)."""
    pad = num_groups(flat.numel(), group_size) * group_size - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, group_size)


def fp16_round_up(value: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 value >= ``value`` (fp32, positive)."""
    half = value.to(torch.float16)
    below = half.float() < value
    if bool(below.any()):
        half = torch.where(below, torch.nextafter(half, torch.full_like(half, math.inf)), half)
    return half


# ------------------------------------------------------------------ asymmetric group quantization
def _minmax_params(groups: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, zero) per group for codes 0..levels (zero relative to code 0)."""
    lo = groups.amin(dim=1)
    hi = groups.amax(dim=1)
    magnitude = torch.maximum(lo.abs(), hi.abs())
    scale = torch.maximum((hi - lo) / levels, magnitude / ZERO_LIMIT)
    # an all-zero group: any positive scale reproduces it exactly
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = fp16_round_up(scale)
    zero = torch.round(-lo / scale.float())
    return scale, zero.to(torch.float16)


def _quantize_with(
    groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int,
    stochastic: bool = False, seed: int | None = None,
) -> torch.Tensor:
    """Codes in [0, levels] (float tensor of integers), shape of ``groups``."""
    scaled = groups / scale.float()[:, None]
    rounded = stochastic_round(scaled, seed) if stochastic else torch.round(scaled)
    # NaN (every code of a group holding a NaN: its zero point is NaN) → code 0, defined as in the
    # Triton kernel instead of an undefined float→int cast; the NaN zero point still makes the
    # whole group dequantize to NaN.
    return (rounded + zero.float()[:, None]).clamp_(0, levels).nan_to_num_(nan=0.0)


def quantize_int4(x: torch.Tensor, group_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min–max INT4 group quantization with two codes per byte.

    Returns ``(packed, scale, zero)``: ``packed`` is uint8 with ``ceil(numel / 2)``
    bytes, element ``2i`` in the low nibble of byte ``i`` and element ``2i + 1`` in the
    high nibble (an odd final element leaves the high nibble 0); ``scale`` and
    ``zero`` are fp16 with one entry per group of ``group_size`` consecutive
    (flattened) elements. ``|x − dequantize_int4(...)| ≤ scale / 2`` per element.
    """
    check_tensor("x", x, floating=True)
    check_int("group_size", group_size, 1)
    flat = x.detach().reshape(-1).float()
    if flat.numel() == 0:
        empty16 = torch.empty(0, dtype=torch.float16, device=x.device)
        return torch.empty(0, dtype=torch.uint8, device=x.device), empty16, empty16.clone()
    groups = _grouped(flat, group_size)
    scale, zero = _minmax_params(groups, 15)
    codes = _quantize_with(groups, scale, zero, 15).reshape(-1)[: flat.numel()].to(torch.uint8)
    return pack_int4(codes), scale, zero


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes in [0, 15] two per byte (element 2i low nibble, 2i+1 high nibble)."""
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: the first ``numel`` uint8 codes."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"Invalid packed: expected uint8 codes, got {packed.dtype}")
    if packed.numel() != num_groups(numel, 2):
        raise ValueError(f"Invalid packed: {packed.numel()} bytes cannot hold {numel} INT4 codes")
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    return codes[:numel]


def _dequantize_groups(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, numel: int, group_size: int,
) -> torch.Tensor:
    """fp32 flat values from integer codes (float tensor), per-group scale/zero."""
    groups = num_groups(numel, group_size)
    if scale.numel() != groups or zero.numel() != groups:
        raise ValueError(
            f"Invalid scale/zero: expected {groups} groups of {group_size} for {numel} elements, "
            f"got {scale.numel()} scales and {zero.numel()} zeros"
        )
    per_group = _ungrouped_view(codes.float(), group_size)
    return (scale.float()[:, None] * (per_group - zero.float()[:, None])).reshape(-1)[:numel]


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: torch.Size | tuple[int, ...],
    group_size: int = 256, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_int4`: a ``dtype`` tensor of ``shape``."""
    check_int("group_size", group_size, 1)
    shape = torch.Size(shape)
    numel = shape.numel()
    codes = unpack_int4(packed, numel)
    return _dequantize_groups(codes, scale, zero, numel, group_size).to(dtype).view(shape)


# ------------------------------------------------------------------ INT8 (weights)
def stochastic_round(x: torch.Tensor, seed: int | None = None) -> torch.Tensor:
    """``floor(x) + Bernoulli(x − floor(x))``: unbiased (``E = x``) integer rounding.

    The Bernoulli draws come from a ``torch.Generator`` on ``x.device`` seeded with
    the int ``seed``, so the result is a deterministic function of ``(x, seed)``
    (``seed=None`` draws from the global generator).
    """
    check_tensor("x", x, floating=True)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"Invalid seed: expected an int or None, got {type(seed).__name__}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(seed % (2**63 - 1))
    floor = torch.floor(x)
    draws = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return floor + (draws < (x - floor)).to(x.dtype)


def quantize_int8(
    x: torch.Tensor, group_size: int = 256, stochastic: bool = False, seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min–max INT8 group quantization (Q-GaLore's INT8 weights).

    Returns ``(codes, scale, zero)``: ``codes`` int8 of ``x``'s shape holding
    ``q − 128`` for ``q`` in [0, 255]; ``scale``/``zero`` fp16 per group, ``zero``
    relative to ``q`` (so ``x ≈ scale · (codes + 128 − zero)``).

    ``stochastic=False``: round to nearest, ``|error| ≤ scale / 2``.
    ``stochastic=True``: ``floor(x / scale) + Bernoulli(frac)`` seeded by ``seed``
    (see :func:`stochastic_round`), unbiased, ``|error| < scale``; small updates
    survive in expectation instead of being rounded away.
    """
    check_tensor("x", x, floating=True)
    check_int("group_size", group_size, 1)
    flat = x.detach().reshape(-1).float()
    if flat.numel() == 0:
        empty16 = torch.empty(0, dtype=torch.float16, device=x.device)
        return torch.empty(x.shape, dtype=torch.int8, device=x.device), empty16, empty16.clone()
    groups = _grouped(flat, group_size)
    scale, zero = _minmax_params(groups, 255)
    codes = _quantize_with(groups, scale, zero, 255, stochastic=stochastic, seed=seed)
    codes = (codes.reshape(-1)[: flat.numel()] - 128).to(torch.int8)
    return codes.view(x.shape), scale, zero


def dequantize_int8(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: torch.Size | tuple[int, ...] | None = None,
    group_size: int = 256, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_int8` (``shape`` defaults to ``codes.shape``)."""
    check_int("group_size", group_size, 1)
    if codes.dtype != torch.int8:
        raise TypeError(f"Invalid codes: expected int8, got {codes.dtype}")
    shape = codes.shape if shape is None else check_numel("shape", shape, codes.numel())
    flat = codes.reshape(-1).to(torch.int16) + 128
    return _dequantize_groups(flat, scale, zero, flat.numel(), group_size).to(dtype).view(shape)


# ------------------------------------------------------------------ 8-bit blockwise moments
def quantize_blockwise_8bit(
    x: torch.Tensor, block_size: int = 256, signed: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization with a per-block absmax and a companded code map.

    Returns ``(codes, absmax)``: ``codes`` has ``x``'s shape (int8 when
    ``signed``, uint8 otherwise) and ``absmax`` is fp32 with one entry per block of
    ``block_size`` consecutive (flattened) elements.

    Why a companded (non-linear) map: Adam divides by ``sqrt(v)``. A linear
    8-bit code flushes every ``v < absmax / 510`` of its block to 0 and the update
    ``m / (sqrt(v) + eps)`` explodes. We quantize ``y = (|x| / absmax)^(1/p)``
    linearly instead, which spends the codes logarithmically-like on small values:

    * ``signed=True`` (first moments): ``p = 2``, codes ``round(127 · sign(x) · y)``
      in [−127, 127]; the smallest non-zero magnitude is ``absmax / 127²`` (≈ 6e-5).
    * ``signed=False`` (second moments, ``x ≥ 0``): ``p = 4``, codes ``round(255 · y)``
      in [0, 255]; the smallest non-zero value is ``absmax / 255⁴`` (≈ 2e-10), so
      ``sqrt(v)`` spans five orders of magnitude below its block maximum.

    Error bound (tested): in the companded domain the error is half a code,
    ``|y(x̂) − y(x)| ≤ 1 / (2 · levels)``; equivalently the relative error of an
    element is about ``p / (2 · levels · y)`` — 0.8 % at the block maximum for both maps.
    """
    check_tensor("x", x, floating=True)
    check_int("block_size", block_size, 1)
    flat = x.detach().reshape(-1).float()
    if flat.numel() == 0:
        dtype = torch.int8 if signed else torch.uint8
        return torch.empty(x.shape, dtype=dtype, device=x.device), torch.empty(0, device=x.device)
    blocks = _grouped(flat, block_size)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normalized = (blocks.abs() / safe[:, None]).clamp_(max=1.0)
    if signed:
        codes = torch.round(normalized.pow_(1.0 / SIGNED_POWER).mul_(SIGNED_LEVELS)) * torch.sign(blocks)
        # NaN elements → code 0 (a defined value, as in the Triton kernel); absmax carries the NaN
        codes = codes.nan_to_num_(nan=0.0).reshape(-1)[: flat.numel()].to(torch.int8)
    else:
        codes = torch.round(normalized.pow_(1.0 / UNSIGNED_POWER).mul_(UNSIGNED_LEVELS))
        codes = codes.nan_to_num_(nan=0.0).reshape(-1)[: flat.numel()].to(torch.uint8)
    return codes.view(x.shape), absmax


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, shape: torch.Size | tuple[int, ...] | None = None,
    block_size: int = 256, signed: bool = True, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_8bit` (``shape`` defaults to ``codes.shape``)."""
    check_int("block_size", block_size, 1)
    expected = torch.int8 if signed else torch.uint8
    if codes.dtype != expected:
        raise TypeError(f"Invalid codes: expected {expected} for signed={signed}, got {codes.dtype}")
    shape = codes.shape if shape is None else check_numel("shape", shape, codes.numel())
    numel = codes.numel()
    blocks = num_groups(numel, block_size)
    if absmax.numel() != blocks:
        raise ValueError(f"Invalid absmax: expected {blocks} blocks of {block_size} for {numel} elements, "
                         f"got {absmax.numel()}")
    c = codes.reshape(-1).float()
    if signed:
        y = c / SIGNED_LEVELS
        values = torch.sign(y) * y.abs().pow(SIGNED_POWER)
    else:
        values = (c / UNSIGNED_LEVELS).pow(UNSIGNED_POWER)
    values = (_ungrouped_view(values, block_size) * absmax.float()[:, None]).reshape(-1)[:numel]
    return values.to(dtype).view(shape)


__all__ = [
    "dequantize_blockwise_8bit",
    "dequantize_int4",
    "dequantize_int8",
    "num_groups",
    "pack_int4",
    "quantize_blockwise_8bit",
    "quantize_int4",
    "quantize_int8",
    "stochastic_round",
    "unpack_int4",
]
