"""Projection entry points: down-projection, back-projection, fused back-projection + update,
and the fused low-rank Adam moment update + normalization.

Side convention (as in ``lrgrad.projectors.base``): ``"right"``: P is r×n, R = G Pᵀ (m×r);
``"left"``: P is m×r, R = Pᵀ G (r×n).

Backends (``lrgrad.kernels.dispatch.backend_for``):

* ``lowrank_update_`` → one Triton GEMM with the decay and the update in its epilogue
  (``triton_projection.lowrank_update_``): no m×n temporary even for bf16 params, which
  torch has to step through an fp32 copy. All-fp32 operands without TF32 stay on cuBLAS
  (``addmm_`` with ``beta`` is already in place and fused there; see
  ``dispatch.fp32_gemm_prefers_cublas``).
* ``adam_direction_`` → one Triton elementwise pass (``triton_projection.adam_direction_``).
* ``project_down`` / ``project_up`` → torch (cuBLAS) on every backend, by decision: they are
  plain GEMMs with nothing to fuse (their outputs are fresh tensors), where a hand-written
  Triton GEMM cannot beat cuBLAS; the one fusion the back-projection allows is taken by
  ``lowrank_update_``.
"""

from __future__ import annotations

import torch

from lrgrad._checks import check_choice, check_tensor
from lrgrad.kernels import dispatch, reference
from lrgrad.kernels.dispatch import backend_for

SIDES = ("left", "right")


def project_down(grad: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """right: ``G Pᵀ`` (m×r); left: ``Pᵀ G`` (r×n). cuBLAS via torch on every backend."""
    check_choice("side", side, SIDES)
    return reference.project_down(grad, basis, side)


def project_up(update: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """right: ``U P`` (m×n); left: ``P U`` (m×n). cuBLAS via torch on every backend."""
    check_choice("side", side, SIDES)
    return reference.project_up(update, basis, side)


_TRITON_GEMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def lowrank_update_(
    param: torch.Tensor, update: torch.Tensor, basis: torch.Tensor, side: str, alpha: float, decay: float
) -> torch.Tensor:
    """``param <- decay * param + alpha * up(update)`` (decoupled decay, then the step), in place.

    On the Triton backend one GEMM (fp32 accumulation) computes ``up(update)`` tile by tile and
    its epilogue reads each param tile, applies ``decay`` and the step, and rounds once to
    ``param.dtype`` — no m×n temporary. fp64 (and other dtypes) use the torch reference.
    """
    check_choice("side", side, SIDES)
    check_tensor("param", param, ndim=2)
    check_tensor("update", update, ndim=2)
    check_tensor("basis", basis, ndim=2)
    left, right = (update, basis) if side == "right" else (basis, update)
    if left.shape[1] != right.shape[0] or (left.shape[0], right.shape[1]) != tuple(param.shape):
        raise ValueError(
            f"Invalid update/basis: side={side!r} gives {tuple(left.shape)} @ {tuple(right.shape)}, "
            f"which does not match param {tuple(param.shape)}"
        )
    if (
        backend_for(param) == "triton"
        and all(t.dtype in _TRITON_GEMM_DTYPES for t in (param, update, basis))
        and param.device == update.device == basis.device
        and not dispatch.fp32_gemm_prefers_cublas(param, update, basis)
    ):
        from lrgrad.kernels import triton_projection

        return dispatch.triton_or_torch(
            "lowrank_update_",
            lambda: triton_projection.lowrank_update_(param, update, basis, side, alpha, decay),
            lambda: reference.lowrank_update_(param, update, basis, side, alpha, decay),
        )
    return reference.lowrank_update_(param, update, basis, side, alpha, decay)


def adam_direction_(
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor,
    beta1: float, beta2: float, eps: float, step: int, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused Adam step on (low-rank) moments: updates ``exp_avg``/``exp_avg_sq`` in place and
    returns ``u = m̂ / (√v̂ + ε)`` — ``AdamWRule.update``'s formulas (torch's eps placement, outside
    the bias-corrected square root). The kernel rounds every operation once (no FMA contraction);
    torch itself fuses ``lerp`` into an FMA on AVX2 CPUs and nvcc contracts its CUDA kernels, so the
    two agree to a few fp32 roundings of the operands (the bound in the tests), not bit for bit.

    ``out`` (default: a new tensor like ``exp_avg``) receives ``u``. On the Triton backend one
    elementwise pass replaces torch's seven kernels; the tensors must be contiguous and of one shape.
    """
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("grad", grad)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"Invalid {name}: expected a tensor, got {type(t).__name__}")
    if exp_avg.shape != grad.shape or exp_avg_sq.shape != grad.shape:
        raise ValueError(f"Invalid exp_avg/exp_avg_sq: shapes {tuple(exp_avg.shape)}, "
                         f"{tuple(exp_avg_sq.shape)} differ from grad {tuple(grad.shape)}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"Invalid step: {step!r} (must be an int >= 1)")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"Invalid betas: ({beta1}, {beta2}); each must be in [0, 1)")
    if not eps >= 0.0:
        raise ValueError(f"Invalid eps: {eps}")
    if out is None:
        out = torch.empty_like(exp_avg)
    elif out.shape != grad.shape:
        raise ValueError(f"Invalid out: shape {tuple(out.shape)}, expected {tuple(grad.shape)}")
    tensors = (exp_avg, exp_avg_sq, grad, out)
    if (
        backend_for(exp_avg) == "triton"
        and all(t.is_contiguous() and t.dtype in _TRITON_GEMM_DTYPES and t.device == grad.device for t in tensors)
    ):
        from lrgrad.kernels import triton_projection

        return dispatch.triton_or_torch(
            "adam_direction_",
            lambda: triton_projection.adam_direction_(exp_avg, exp_avg_sq, grad, out, beta1, beta2, eps, step),
            lambda: reference.adam_direction_(exp_avg, exp_avg_sq, grad, out, beta1, beta2, eps, step),
        )
    return reference.adam_direction_(exp_avg, exp_avg_sq, grad, out, beta1, beta2, eps, step)
