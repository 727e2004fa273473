"""Triton kernels for the channel-wise passes of APOLLO / Fira (see ``lrgrad.kernels.channel_scale``).

Both kernels take the strides of their operands, so a row-channel and a column-channel problem are
the same kernel with the roles of the two axes swapped, and non-contiguous views need no copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrgrad.kernels.dispatch import interpreting
from lrgrad.kernels.triton_utils import device_guard, fix_bf16, to_out


def _blocks() -> tuple[int, int]:
    return (16, 16) if interpreting() else (32, 128)


@triton.jit
def _channel_sumsq_kernel(
    g_ptr, b_ptr, out_ptr, channels, length,
    g_stride_c, g_stride_k, b_stride_c, b_stride_k,
    HAS_BASE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # one program: BLOCK_C channels, looping over the reduced axis in BLOCK_K chunks
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < channels
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for k0 in range(0, length, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask = c_mask[:, None] & (k < length)[None, :]
        x = tl.load(g_ptr + c[:, None] * g_stride_c + k[None, :] * g_stride_k, mask=mask, other=0.0).to(tl.float32)
        if HAS_BASE:
            x = x - tl.load(b_ptr + c[:, None] * b_stride_c + k[None, :] * b_stride_k, mask=mask,
                            other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    tl.store(out_ptr + c, acc, mask=c_mask)


def channel_sumsq(grad: torch.Tensor, base: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
    """Per-channel ``Σ (grad − base)²`` in fp32, one pass."""
    channels, length = grad.shape[channel_dim], grad.shape[1 - channel_dim]
    out = torch.empty(channels, dtype=torch.float32, device=grad.device)
    block_c, block_k = _blocks()
    gs = (grad.stride(channel_dim), grad.stride(1 - channel_dim))
    bs = (base.stride(channel_dim), base.stride(1 - channel_dim)) if base is not None else (0, 0)
    with device_guard(grad):  # launch on the tensors' GPU, not the current one
        _channel_sumsq_kernel[(triton.cdiv(channels, block_c),)](
            grad, grad if base is None else base, out, channels, length, gs[0], gs[1], bs[0], bs[1],
            HAS_BASE=base is not None, BLOCK_C=block_c, BLOCK_K=block_k,
        )
    return out


@triton.jit
def _channel_scale_update_kernel(
    p_ptr, g_ptr, b_ptr, s_ptr, m, n,
    p_stride_m, p_stride_n, g_stride_m, g_stride_n, b_stride_m, b_stride_n, s_stride,
    alpha, decay,
    CHANNEL_ROWS: tl.constexpr, HAS_BASE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FIX_BF16: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < m)[:, None] & (cols < n)[None, :]
    x = tl.load(g_ptr + rows[:, None] * g_stride_m + cols[None, :] * g_stride_n, mask=mask,
                other=0.0).to(tl.float32)
    if HAS_BASE:
        x = x - tl.load(b_ptr + rows[:, None] * b_stride_m + cols[None, :] * b_stride_n, mask=mask,
                        other=0.0).to(tl.float32)
    if CHANNEL_ROWS:
        s = tl.load(s_ptr + rows * s_stride, mask=rows < m, other=0.0).to(tl.float32)
        x = x * s[:, None]
    else:
        s = tl.load(s_ptr + cols * s_stride, mask=cols < n, other=0.0).to(tl.float32)
        x = x * s[None, :]
    p_offs = p_ptr + rows[:, None] * p_stride_m + cols[None, :] * p_stride_n
    p = tl.load(p_offs, mask=mask, other=0.0).to(tl.float32)
    p = p * decay + alpha * x
    tl.store(p_offs, to_out(p, p_ptr.dtype.element_ty, FIX_BF16), mask=mask)


def channel_scale_update_(
    param: torch.Tensor, grad: torch.Tensor, scales: torch.Tensor, channel_dim: int, alpha: float, decay: float,
    base: torch.Tensor | None,
) -> torch.Tensor:
    """``param ← decay·param + alpha·scales[c]·(grad − base)``: one pass, fp32 math, one rounding."""
    m, n = grad.shape
    block_m, block_n = _blocks()
    b = grad if base is None else base
    with device_guard(param):  # launch on the tensors' GPU, not the current one
        _channel_scale_update_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
            param, grad, b, scales, m, n, param.stride(0), param.stride(1), grad.stride(0), grad.stride(1),
            b.stride(0), b.stride(1), scales.stride(0), float(alpha), float(decay),
            CHANNEL_ROWS=channel_dim == 0, HAS_BASE=base is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            FIX_BF16=fix_bf16(),
        )
    return param
