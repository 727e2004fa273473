"""Newton–Schulz orthogonalization entry point (Muon's quintic iteration).

"Muon: An optimizer for hidden layers in neural networks", K. Jordan et al. 2024
(https://kellerjordan.github.io/posts/muon/).

    X = G / (‖G‖_F + eps)            (transposed when rows > cols, so X Xᵀ is the small Gram)
    repeat ``steps`` times:
        A = X Xᵀ;  B = b A + c A²;  X = a X + B X
    with (a, b, c) = (3.4445, −4.7750, 2.0315)

The odd polynomial p(σ) = aσ + bσ³ + cσ⁵ is applied to every singular value of X,
leaving the singular vectors untouched; five steps map σ ∈ [1e-2, 1] into roughly
[0.68, 1.13] (an approximate U Vᵀ, not an exact one — the coefficients trade accuracy
near 1 for speed near 0).

``dtype`` is the precision of the iterates (Muon's reference and ``torch.optim.Muon``: bf16).
The scaling by ‖G‖ runs in the input's precision, X is rounded to ``dtype`` once, every product
and iterate is in ``dtype`` (bf16 GEMMs accumulate in fp32 on CPU and GPU), and the result is
returned in the input's dtype. ``lrgrad.kernels.precision`` picks ``dtype`` from a rule's
``ns_dtype`` option.

``newton_schulz`` is the dispatched entry point; ``newton_schulz_reference`` is the plain
torch oracle used in tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lrgrad._checks import check_choice, check_coefficients, check_int, check_nonnegative, check_tensor

MUON_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
#: the precisions the iterates may be kept in
ITERATE_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _check(x: torch.Tensor, steps: int, coefficients: Sequence[float], eps: float,
           dtype: torch.dtype | None = None) -> None:
    check_choice("dtype", dtype, (None, *ITERATE_DTYPES))
    check_tensor("x", x, min_ndim=2)
    check_int("steps", steps, 0)
    if len(coefficients) != 3:  # a kernel argument: a wrong count is a bad value (ValueError), as torch's
        raise ValueError(f"Invalid coefficients: expected (a, b, c), got {coefficients!r}")
    check_coefficients(coefficients, "coefficients")
    check_nonnegative("eps", eps)


def newton_schulz_reference(x: torch.Tensor, steps: int = 5, coefficients: Sequence[float] = MUON_COEFFICIENTS,
                            eps: float = 1e-7, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain torch quintic Newton–Schulz on the last two dims of ``x``; returns a new tensor.

    The iterates are kept in ``dtype`` (default: the dtype of ``x``); the result has ``x``'s
    dtype. ``x`` is not modified.
    """
    _check(x, steps, coefficients, eps, dtype)
    a, b, c = (float(v) for v in coefficients)
    tall = x.size(-2) > x.size(-1)
    X = x.mT if tall else x
    norm = torch.linalg.matrix_norm(X, keepdim=True)
    X = X / (norm + eps)
    if dtype is not None and dtype != x.dtype:
        X = X.to(dtype)
    for _ in range(steps):
        A = X @ X.mT
        B = torch.addmm(A, A, A, beta=b, alpha=c) if A.dim() == 2 else b * A + c * (A @ A)
        X = torch.addmm(X, B, X, beta=a) if X.dim() == 2 else a * X + B @ X
    if steps == 0:
        X = X.clone()
    X = X.to(x.dtype)
    return X.mT if tall else X


def newton_schulz(
    x: torch.Tensor,
    steps: int = 5,
    coefficients: Sequence[float] = MUON_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Approximate orthogonalization ``≈ U Vᵀ`` of ``x = U S Vᵀ`` (dispatched entry point).

    ``dtype``: the precision of the iterates (default ``x.dtype``); the result has ``x``'s dtype.
    Triton backend (bf16/fp16 iterates, or fp32 with TF32 allowed): symmetric X·Xᵀ kernels that
    compute only the upper-triangle blocks, fp32 accumulation, iterates stored in ``dtype``
    (``lrgrad.kernels.triton_newton_schulz``). Full-fp32 iterates stay on cuBLAS
    (``dispatch.fp32_gemm_prefers_cublas``).
    """
    _check(x, steps, coefficients, eps, dtype)
    from lrgrad.kernels import dispatch
    from lrgrad.kernels.dispatch import backend_for

    iterate = x.dtype if dtype is None else dtype
    if (
        backend_for(x) == "triton" and iterate in (torch.float32, torch.bfloat16, torch.float16)
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and x.numel()
        # the routing rule looks at the GEMM operands' dtype, which is the iterates' (an empty stand-in)
        and not dispatch.fp32_gemm_prefers_cublas(torch.empty(0, dtype=iterate, device=x.device))
    ):
        from lrgrad.kernels import triton_newton_schulz

        return dispatch.triton_or_torch(
            "newton_schulz",
            lambda: triton_newton_schulz.newton_schulz(x, steps, coefficients, eps, dtype=iterate),
            lambda: newton_schulz_reference(x, steps, coefficients, eps, dtype=iterate),
        )
    return newton_schulz_reference(x, steps, coefficients, eps, dtype=dtype)
