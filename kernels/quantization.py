"""Quantization entry points: the names and signatures of ``lrgrad.quant`` (the torch
references), dispatched to the Triton kernels in ``triton_quant`` by device.

"Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank Gradients",
Zhang et al. 2024, arXiv:2407.08296; "8-bit Optimizers via Block-wise Quantization",
Dettmers et al. 2021, arXiv:2110.02861.

The Triton path returns exactly the reference's codes and statistics for the deterministic
quantizers (round-to-nearest-even, IEEE division; the companded 8-bit codes may differ by one
where torch's ``pow(x, 1/p)`` and the kernel's square roots round a tie differently) and
bit-identical dequantized values up to one fp32 ulp (the kernels run without FMA contraction,
so this holds on hardware too, not only in the interpreter). NaN: a group holding a NaN gets NaN
statistics (scale 1, zero point NaN / absmax NaN) and dequantizes to NaN; NaN elements get code 0
— in both paths. Stochastic rounding uses Triton's
Philox stream ``tl.rand(seed, index)`` instead of a ``torch.Generator``: deterministic given
``seed``, unbiased, but a different draw from the reference. ``seed=None`` draws the seed
from torch's global generator (so ``torch.manual_seed`` still makes runs reproducible).

Falls back to the reference for: non-Triton backends, INT4 with an odd ``group_size`` (a
byte would straddle two groups), tensors of 2³¹ elements or more (Philox offsets are int32), and
(with one warning, ``dispatch.triton_or_torch``) a kernel that fails to compile on the device.
"""

from __future__ import annotations

import torch

from lrgrad import quant as reference
from lrgrad._checks import check_group_stats, check_int, check_numel, check_seed, check_tensor
from lrgrad.kernels.dispatch import backend_for, triton_or_torch
from lrgrad.quant import num_groups

_MAX_NUMEL = 2**31 - 1
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _use_triton(t: torch.Tensor) -> bool:
    return backend_for(t) == "triton" and 0 < t.numel() < _MAX_NUMEL


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1).contiguous()


def _resolve_seed(seed: int | None) -> int:
    """A non-negative int the kernels can take: the given seed mod 2^63 - 1, or a global draw."""
    if seed is None:
        return int(torch.randint(0, 2**31 - 1, ()).item())
    return seed % (2**63 - 1)


def quantize_int4(x: torch.Tensor, group_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(packed uint8, scale fp16, zero fp16)``; see ``lrgrad.quant.quantize_int4``."""
    check_tensor("x", x, floating=True)
    check_int("group_size", group_size, 1)
    if _use_triton(x) and group_size % 2 == 0 and x.dtype in _FLOAT_DTYPES:
        from lrgrad.kernels import triton_quant

        return triton_or_torch("quantize_int4", lambda: triton_quant.minmax_quantize(_flat(x), group_size, int4=True),
                               lambda: reference.quantize_int4(x, group_size))
    return reference.quantize_int4(x, group_size)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    shape: torch.Size | tuple[int, ...], group_size: int = 256,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_int4`; see ``lrgrad.quant.dequantize_int4`` (which checks the arguments
    of the torch path)."""
    if _use_triton(packed) and dtype in _FLOAT_DTYPES:
        check_int("group_size", group_size, 1)
        shape = torch.Size(shape)
        numel = shape.numel()
        if packed.dtype != torch.uint8:
            raise TypeError(f"Invalid packed: expected uint8 codes, got {packed.dtype}")
        if packed.numel() != num_groups(numel, 2):
            raise ValueError(f"Invalid packed: {packed.numel()} bytes cannot hold {numel} INT4 codes")
        check_group_stats(scale, zero, numel, group_size)
        from lrgrad.kernels import triton_quant

        return triton_or_torch(
            "dequantize_int4",
            lambda: triton_quant.minmax_dequantize(packed.contiguous(), scale.contiguous(), zero.contiguous(),
                                                   numel, group_size, int4=True, dtype=dtype).view(shape),
            lambda: reference.dequantize_int4(packed, scale, zero, shape, group_size, dtype),
        )
    return reference.dequantize_int4(packed, scale, zero, shape, group_size, dtype)


def stochastic_round(x: torch.Tensor, seed: int | None = None) -> torch.Tensor:
    """``floor(x) + Bernoulli(x − floor(x))``, unbiased; deterministic given ``seed``.

    Triton path: the Bernoulli draws are ``tl.rand(seed, i) < frac_i`` (Philox, element index ``i``).
    """
    check_tensor("x", x, floating=True)
    check_seed("seed", seed)
    if _use_triton(x) and x.dtype in _FLOAT_DTYPES:
        from lrgrad.kernels import triton_quant

        resolved = _resolve_seed(seed)
        return triton_or_torch("stochastic_round",
                               lambda: triton_quant.stochastic_round(_flat(x), resolved).view(x.shape),
                               lambda: reference.stochastic_round(x, seed))
    return reference.stochastic_round(x, seed)


def quantize_int8(
    x: torch.Tensor, group_size: int = 256, stochastic: bool = False, seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes int8, scale fp16, zero fp16)``; see ``lrgrad.quant.quantize_int8``.

    ``stochastic=True`` rounds ``x / scale`` with the seeded Philox stream (INT8 weight
    requantization: small updates survive in expectation).
    """
    check_tensor("x", x, floating=True)
    check_int("group_size", group_size, 1)
    check_seed("seed", seed)
    if _use_triton(x) and x.dtype in _FLOAT_DTYPES:
        from lrgrad.kernels import triton_quant

        resolved = _resolve_seed(seed) if stochastic else 0

        def fast() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            codes, scale, zero = triton_quant.minmax_quantize(
                _flat(x), group_size, int4=False, stochastic=bool(stochastic), seed=resolved)
            return codes.view(x.shape), scale, zero

        return triton_or_torch("quantize_int8", fast,
                               lambda: reference.quantize_int8(x, group_size, stochastic, seed))
    return reference.quantize_int8(x, group_size, stochastic, seed)


def dequantize_int8(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: torch.Size | tuple[int, ...] | None = None,
    group_size: int = 256, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_int8`; see ``lrgrad.quant.dequantize_int8``."""
    check_int("group_size", group_size, 1)
    if _use_triton(codes) and dtype in _FLOAT_DTYPES:
        if codes.dtype != torch.int8:
            raise TypeError(f"Invalid codes: expected int8, got {codes.dtype}")
        shape = codes.shape if shape is None else check_numel("shape", shape, codes.numel())
        check_group_stats(scale, zero, codes.numel(), group_size)
        from lrgrad.kernels import triton_quant

        return triton_or_torch(
            "dequantize_int8",
            lambda: triton_quant.minmax_dequantize(_flat(codes), scale.contiguous(), zero.contiguous(),
                                                   codes.numel(), group_size, int4=False, dtype=dtype).view(shape),
            lambda: reference.dequantize_int8(codes, scale, zero, shape, group_size, dtype),
        )
    return reference.dequantize_int8(codes, scale, zero, shape, group_size, dtype)


def quantize_blockwise_8bit(
    x: torch.Tensor, block_size: int = 256, signed: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, absmax fp32)`` with the companded code map; see ``lrgrad.quant.quantize_blockwise_8bit``."""
    check_tensor("x", x, floating=True)
    check_int("block_size", block_size, 1)
    if _use_triton(x) and x.dtype in _FLOAT_DTYPES:
        from lrgrad.kernels import triton_quant

        def fast() -> tuple[torch.Tensor, torch.Tensor]:
            codes, absmax = triton_quant.blockwise_quantize(_flat(x), block_size, bool(signed))
            return codes.view(x.shape), absmax

        return triton_or_torch("quantize_blockwise_8bit", fast,
                               lambda: reference.quantize_blockwise_8bit(x, block_size, signed))
    return reference.quantize_blockwise_8bit(x, block_size, signed)


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, shape: torch.Size | tuple[int, ...] | None = None,
    block_size: int = 256, signed: bool = True, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_8bit`; see ``lrgrad.quant.dequantize_blockwise_8bit``."""
    check_int("block_size", block_size, 1)
    if _use_triton(codes) and dtype in _FLOAT_DTYPES:
        expected = torch.int8 if signed else torch.uint8
        if codes.dtype != expected:
            raise TypeError(f"Invalid codes: expected {expected} for signed={signed}, got {codes.dtype}")
        shape = codes.shape if shape is None else check_numel("shape", shape, codes.numel())
        if absmax.numel() != num_groups(codes.numel(), block_size):
            raise ValueError(f"Invalid absmax: expected {num_groups(codes.numel(), block_size)} blocks of "
                             f"{block_size} for {codes.numel()} elements, got {absmax.numel()}")
        from lrgrad.kernels import triton_quant

        return triton_or_torch(
            "dequantize_blockwise_8bit",
            lambda: triton_quant.blockwise_dequantize(_flat(codes), absmax.float().contiguous(), codes.numel(),
                                                      block_size, bool(signed), dtype).view(shape),
            lambda: reference.dequantize_blockwise_8bit(codes, absmax, shape, block_size, signed, dtype),
        )
    return reference.dequantize_blockwise_8bit(codes, absmax, shape, block_size, signed, dtype)


__all__ = [
    "dequantize_blockwise_8bit",
    "dequantize_int4",
    "dequantize_int8",
    "quantize_blockwise_8bit",
    "quantize_int4",
    "quantize_int8",
    "stochastic_round",
]
