"""Lion: sign of an interpolated momentum.

"Symbolic Discovery of Optimization Algorithms", Chen et al. 2023, arXiv:2302.06675.

    u = sign(β1 m + (1 - β1) g)
    m = β2 m + (1 - β2) g
    p <- p (1 - lr λ) - lr u
"""

from __future__ import annotations

from typing import Any

import torch

from lrgrad._checks import check_betas
from lrgrad.rules.base import UpdateRule


class LionRule(UpdateRule):
    name = "lion"
    option_defaults: dict[str, Any] = {"betas": (0.9, 0.99)}
    linear_keys = ("exp_avg",)

    @classmethod
    def validate_options(cls, group: dict[str, Any]) -> None:
        check_betas(group["betas"])

    def init_state(self, state: dict[str, Any], like: torch.Tensor) -> None:
        state["exp_avg"] = torch.zeros_like(like)

    def update(self, state: dict[str, Any], grad: torch.Tensor, step: int) -> torch.Tensor:
        beta1, beta2 = self.group["betas"]
        exp_avg = state["exp_avg"]
        update = exp_avg.lerp(grad, 1 - beta1).sign_()
        exp_avg.lerp_(grad, 1 - beta2)
        return update
