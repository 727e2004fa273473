"""Muon: momentum orthogonalized by Newton–Schulz, and the base of every matrix-only rule.

"Muon: An optimizer for hidden layers in neural networks", K. Jordan et al. 2024
(https://kellerjordan.github.io/posts/muon/); the ``match_rms_adamw`` scaling is from
"Muon is Scalable for LLM Training", Liu et al. 2025, arXiv:2502.16982.

    M  = β M + (1 - β) g                       (EMA momentum)
    V  = (1 - β) g + β M   (Nesterov)   or  M
    O  = NS₅(V)                                ≈ U Vᵀ of V = U S Vᵀ (lrgrad.kernels.newton_schulz)
                                               iterates in ``ns_dtype`` (bf16 where native, see below)
    u  = O · √max(1, rows/cols)                (or 0.2 · √max(rows, cols) with ``match_rms_adamw``)
    p <- p (1 - lr λ) - lr u

``ns_dtype`` (``"auto"`` | ``"bf16"`` | ``"fp32"``, ``lrgrad.kernels.precision``): the precision of the
Newton–Schulz iterates. ``"auto"`` is bf16 — Muon's reference and ``torch.optim.Muon`` — where bf16
GEMMs are native (CUDA sm_80+, CPUs with AVX512-BF16/AMX or Arm BF16) and fp32 where bf16 is emulated;
fp64 momenta stay fp64 unless ``"bf16"`` is asked for. The direction is returned in the momentum's dtype.

N-d params are viewed as ``(shape[0], numel // shape[0])`` matrices. Inside a projector the rule
sees the low-rank gradient R and orthogonalizes R (its shape sets the scaling factor).

Matrix-only rules (``matrix_only = True``) do not update params with ``dim() < 2``: the optimizer
runs those through ``fallback_group(group)`` — AdamW with the group's ``adamw_lr``,
``adamw_betas``, ``adamw_eps`` and ``adamw_weight_decay`` — in the same optimizer.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from lrgrad._checks import check_bool, check_positive
from lrgrad.kernels import newton_schulz
from lrgrad.kernels.precision import resolve_ns_dtype
from lrgrad.rules.matrix import NEWTON_SCHULZ_DEFAULTS, MatrixRule, validate_newton_schulz


class MuonRule(MatrixRule):
    name = "muon"
    option_defaults: ClassVar[dict[str, Any]] = {
        **MatrixRule.option_defaults,
        **NEWTON_SCHULZ_DEFAULTS,
        "eps": 1e-7,
        "match_rms_adamw": False,
    }

    @classmethod
    def validate_options(cls, group: dict[str, Any]) -> None:
        super().validate_options(group)
        validate_newton_schulz(group)
        check_positive("eps", group["eps"])
        check_bool("match_rms_adamw", group["match_rms_adamw"])

    def shape_factor(self, rows: int, cols: int) -> float:
        if self.group["match_rms_adamw"]:
            # A full-rank semi-orthogonal m x n matrix has RMS 1/sqrt(max(m, n)); this gives RMS 0.2.
            return 0.2 * math.sqrt(max(rows, cols))
        return math.sqrt(max(1.0, rows / cols))

    def normalize(self, matrix: torch.Tensor) -> torch.Tensor:
        group = self.group
        ortho = newton_schulz(matrix, steps=group["ns_steps"], coefficients=tuple(group["ns_coefficients"]),
                              eps=group["eps"], dtype=resolve_ns_dtype(group["ns_dtype"], matrix))
        return ortho.mul_(self.shape_factor(*matrix.shape))
