"""Triton projection kernels: the fused back-projection + parameter update, and the fused
low-rank Adam moment update + normalization.

"GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", Zhao et al. 2024,
arXiv:2403.03507 (the update ``W ← W − η·α·P N``); "Decoupled Weight Decay Regularization",
Loshchilov & Hutter, arXiv:1711.05101 (the decay and the Adam direction).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrgrad.kernels.dispatch import interpreting
from lrgrad.kernels.triton_matmul import gemm_epilogue
from lrgrad.kernels.triton_utils import device_guard, fix_bf16, to_out


def lowrank_update_(
    param: torch.Tensor, update: torch.Tensor, basis: torch.Tensor, side: str, alpha: float, decay: float
) -> torch.Tensor:
    """``param ← decay·param + alpha·up(update)`` in one GEMM whose epilogue reads and writes
    each param tile once (fp32 accumulation, one rounding to ``param.dtype``)."""
    a, b = (update, basis) if side == "right" else (basis, update)
    return gemm_epilogue(a, b, param, alpha=alpha, c=param, beta=decay)


@triton.jit
def _adam_direction_kernel(
    m_ptr, v_ptr, g_ptr, u_ptr, n,
    one_minus_beta1, beta2, one_minus_beta2, bias_correction1, bias_correction2_sqrt, eps,
    BLOCK: tl.constexpr, FIX_BF16: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # The torch rule's formulas: m.lerp_(g, 1-β1) (weight < 0.5: m + w(g−m)), v·β2 + (1−β2)·g²,
    # then (m / bc1) / (sqrt(v) / sqrt(bc2) + eps); each operation rounded once (no contraction:
    # the launch sets enable_fp_fusion=False). 1−β comes from the host, rounded once from double
    # as torch's scalar weights are (1.0 − β1 in-kernel would be an fp32 subtraction: 0.100000024
    # instead of 0.1f for β1 = 0.9).
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * (g * g)
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    u = tl.div_rn(tl.div_rn(m, bias_correction1), denom)
    tl.store(m_ptr + offs, to_out(m, m_ptr.dtype.element_ty, FIX_BF16), mask=mask)
    tl.store(v_ptr + offs, to_out(v, v_ptr.dtype.element_ty, FIX_BF16), mask=mask)
    tl.store(u_ptr + offs, to_out(u, u_ptr.dtype.element_ty, FIX_BF16), mask=mask)


def adam_direction_(
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, out: torch.Tensor,
    beta1: float, beta2: float, eps: float, step: int,
) -> torch.Tensor:
    """One pass: read m, v, g; write m, v and the bias-corrected direction u (5 tensors of traffic
    instead of the ~12 of the unfused torch sequence)."""
    n = grad.numel()
    if n == 0:
        return out
    block = 256 if interpreting() else 1024
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = (1.0 - beta2**step) ** 0.5
    with device_guard(grad):
        # enable_fp_fusion=False: one rounding per operation, as torch's unfused sequence; with
        # contraction Triton would fuse m + (1-β1)(g-m) and v·β2 + (1-β2)g² into FMAs.
        _adam_direction_kernel[(triton.cdiv(n, block),)](
            exp_avg, exp_avg_sq, grad, out, n, float(1.0 - beta1), float(beta2), float(1.0 - beta2),
            float(bias_correction1), float(bias_correction2_sqrt), float(eps), BLOCK=block, FIX_BF16=fix_bf16(),
            enable_fp_fusion=False,
        )
    return out
