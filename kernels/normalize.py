"""AuON normalization entry point.

"AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates", arXiv:2509.24320.

    X   = M / (‖M‖_F + eps)
    rms = ‖cosh(X)‖_F / √N            (N = numel)
    U   = X / (rms + rms_eps)

Cost is O(N): two reductions and two elementwise passes, no matrix products. Since every
|x_i| ≤ 1 and Σ x_i² ≤ 1, 1 ≤ rms ≤ sqrt(1 + sinh²(1)/N), so U has Frobenius norm ≈ 1 whatever
the scale of M.

``auon_normalize`` is the dispatched entry point; ``auon_normalize_reference`` is the plain
torch oracle used in tests.
"""

from __future__ import annotations

import math

import torch


def auon_normalize_reference(m: torch.Tensor, eps: float = 1e-7, rms_eps: float = 1e-8) -> torch.Tensor:
    """Plain torch AuON normalization of ``m`` (any shape; all elements form one matrix).

    Returns a new tensor in the dtype of ``m`` (callers pass fp32/fp64); ``m`` is not modified.
    """
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"Invalid m: expected a tensor, got {type(m).__name__}")
    if m.numel() == 0:
        raise ValueError("Invalid m: empty tensor")
    if not eps >= 0.0:
        raise ValueError(f"Invalid eps: {eps}")
    if not rms_eps >= 0.0:
        raise ValueError(f"Invalid rms_eps: {rms_eps}")
    x = m / (torch.linalg.vector_norm(m) + eps)
    rms = torch.linalg.vector_norm(torch.cosh(x)) / math.sqrt(m.numel())
    return x.div_(rms + rms_eps)


def auon_normalize(m: torch.Tensor, eps: float = 1e-7, rms_eps: float = 1e-8) -> torch.Tensor:
    """AuON update direction for momentum ``m`` (dispatched entry point).

    Triton backend (fp32/bf16/fp16 inputs): two passes over ``m`` — per-block max and even
    power sums, then one scale — with the cosh sum recovered from a Taylor series
    (``lrgrad.kernels.triton_normalize``); math in fp32, output in ``m.dtype``.
    """
    from lrgrad.kernels import dispatch
    from lrgrad.kernels.dispatch import backend_for

    if (
        isinstance(m, torch.Tensor) and m.numel() and backend_for(m) == "triton"
        and m.dtype in (torch.float32, torch.bfloat16, torch.float16) and eps >= 0.0 and rms_eps >= 0.0
    ):
        from lrgrad.kernels import triton_normalize

        return dispatch.triton_or_torch(
            "auon_normalize",
            lambda: triton_normalize.auon_normalize(m.contiguous(), eps, rms_eps),
            lambda: auon_normalize_reference(m, eps, rms_eps),
        )
    return auon_normalize_reference(m, eps, rms_eps)
