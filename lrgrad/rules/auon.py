"""AuON and Hybrid-AuON: normalized momentum with a cosh brake, in linear time.

"AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates", arXiv:2509.24320.

    M   = β M + (1 - β) g;   V = (1 - β) g + β M   (Nesterov)   or  M
    X   = V / (‖V‖_F + eps)
    rms = ‖cosh(X)‖_F / √N
    u   = X / (rms + rms_eps)                      (lrgrad.kernels.auon_normalize)
    p  <- p (1 - lr λ) - lr u

Hybrid-AuON first applies ``ns_steps`` (default 1) quintic Newton–Schulz iterations to V
(Muon's coefficients; iterates in ``ns_dtype``, as Muon's: ``lrgrad.kernels.precision``), then the
same scaling (in the momentum's dtype).

The public reference code departs from the paper in two places; both are options here,
defaulting to the paper:

* ``gamma`` (paper: 1.0; code: 1.5): rms = ‖cosh(γ X)‖_F / √N;
* ``normalize_numerator`` (paper: True; code: False): u = V / (rms + rms_eps), i.e. the
  un-normalized momentum over the brake, so the step scales with the gradient's size.

Since |x_i| ≤ 1 and ‖X‖_F ≤ 1, 1 ≤ rms ≤ sqrt(1 + sinh²(1)/N) with the paper's γ = 1: for
large matrices the brake is nearly inert and the update is normalized momentum of unit
Frobenius norm.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from lrgrad._checks import check_bool, check_positive
from lrgrad.kernels import auon_normalize, newton_schulz
from lrgrad.kernels.precision import resolve_ns_dtype
from lrgrad.rules.matrix import NEWTON_SCHULZ_DEFAULTS, MatrixRule, validate_newton_schulz


class AuONRule(MatrixRule):
    name = "auon"
    option_defaults: ClassVar[dict[str, Any]] = {
        **MatrixRule.option_defaults,
        "eps": 1e-7,
        "rms_eps": 1e-8,
        "gamma": 1.0,
        "normalize_numerator": True,
    }

    @classmethod
    def validate_options(cls, group: dict[str, Any]) -> None:
        super().validate_options(group)
        check_positive("eps", group["eps"])
        check_positive("rms_eps", group["rms_eps"])
        check_positive("gamma", group["gamma"])
        check_bool("normalize_numerator", group["normalize_numerator"])

    def brake(self, matrix: torch.Tensor) -> torch.Tensor:
        """The cosh brake; the paper's form goes through the ``auon_normalize`` kernel."""
        group = self.group
        eps, rms_eps = group["eps"], group["rms_eps"]
        gamma, normalized = group["gamma"], group["normalize_numerator"]
        if gamma == 1.0 and normalized:
            return auon_normalize(matrix, eps=eps, rms_eps=rms_eps)
        x = matrix / (torch.linalg.vector_norm(matrix) + eps)
        rms = torch.linalg.vector_norm(torch.cosh(x.mul(gamma))) / math.sqrt(matrix.numel())
        numerator = x if normalized else matrix
        return numerator.div(rms + rms_eps)

    def normalize(self, matrix: torch.Tensor) -> torch.Tensor:
        return self.brake(matrix)


class HybridAuONRule(AuONRule):
    name = "hybrid_auon"
    option_defaults: ClassVar[dict[str, Any]] = {
        **AuONRule.option_defaults,
        **NEWTON_SCHULZ_DEFAULTS,
        "ns_steps": 1,  # the paper's one iteration before the cosh scaling
    }

    @classmethod
    def validate_options(cls, group: dict[str, Any]) -> None:
        super().validate_options(group)
        validate_newton_schulz(group)

    def normalize(self, matrix: torch.Tensor) -> torch.Tensor:
        group = self.group
        ortho = newton_schulz(matrix, steps=group["ns_steps"], coefficients=tuple(group["ns_coefficients"]),
                              eps=group["eps"], dtype=resolve_ns_dtype(group["ns_dtype"], matrix))
        return self.brake(ortho)
