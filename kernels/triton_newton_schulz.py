"""Triton Newton–Schulz: the quintic iteration on symmetric (upper-triangle) Gram kernels.

"Muon: An optimizer for hidden layers in neural networks", K. Jordan et al. 2024
(https://kellerjordan.github.io/posts/muon/).

Per step, with X the wide (m ≤ n) orientation:

    A = X Xᵀ                 syrk: upper-triangle blocks only, mirrored     m²n   FLOPs (not 2m²n)
    B = b A + c A Aᵀ         syrk again (A is symmetric, so A² = A Aᵀ), b·A in the epilogue
    X ← a X + B X            GEMM with a·X in the epilogue

All products accumulate in fp32; the iterates are stored in ``dtype`` (default: the input's; bf16
in Muon's usual setting, where the tensor cores run bf16 × bf16 → fp32). The scaling by ‖G‖ runs
in the input's precision before the one rounding to ``dtype``, as in the torch reference; the
result is returned in the input's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lrgrad.kernels.triton_matmul import gemm_epilogue, syrk


def _newton_schulz_2d(x: torch.Tensor, steps: int, coefficients: Sequence[float], eps: float,
                      dtype: torch.dtype) -> torch.Tensor:
    a, b, c = (float(v) for v in coefficients)
    tall = x.size(0) > x.size(1)
    X = x.mT if tall else x
    # The Frobenius scaling, as the reference computes it (one reduction, one scale pass), then one
    # rounding to the iterates' dtype.
    X = (X / (torch.linalg.vector_norm(X) + eps)).to(dtype).contiguous()
    m = X.size(0)
    A = torch.empty(m, m, dtype=X.dtype, device=X.device)
    B = torch.empty_like(A)
    spare = torch.empty_like(X)
    for _ in range(steps):
        syrk(X, A)
        syrk(A, B, alpha=c, c=A, beta=b)
        gemm_epilogue(B, X, spare, alpha=1.0, c=X, beta=a)
        X, spare = spare, X
    X = X.to(x.dtype)
    return X.mT if tall else X


def newton_schulz(x: torch.Tensor, steps: int, coefficients: Sequence[float], eps: float,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Quintic Newton–Schulz on the last two dims (a batch runs matrix by matrix), iterates in ``dtype``."""
    dtype = x.dtype if dtype is None else dtype
    if x.dim() == 2:
        return _newton_schulz_2d(x, steps, coefficients, eps, dtype)
    flat = x.reshape(-1, x.size(-2), x.size(-1))
    return torch.stack([_newton_schulz_2d(mat, steps, coefficients, eps, dtype)
                        for mat in flat.unbind(0)]).view(x.shape)
