"""Adafactor with a factored second moment (in the low-rank space when projected).

"Adafactor: Adaptive Learning Rates with Sublinear Memory Cost",
Shazeer & Stern 2018, arXiv:1804.04235.

For a 2-D gradient g (a x b):

    β2_t = 1 - t^(beta2_decay)
    R    = β2_t R + (1 - β2_t) mean_cols(g² + ε)      (a)
    C    = β2_t C + (1 - β2_t) mean_rows(g² + ε)      (b)
    v̂    = R Cᵀ / mean(R)
    u    = g / sqrt(v̂);   u <- u / max(1, RMS(u) / clip_threshold)
    optional first moment (beta1 not None): m = β1 m + (1 - β1) u; u = m

1-D gradients keep an unfactored v. The step size is the group's ``lr``; the
paper's relative step (lr scaled by the parameter RMS) is not used, because
inside a projector the update is rescaled by ``scale`` instead.
"""

from __future__ import annotations

from typing import Any

import torch

from lrgrad._checks import check_beta, check_nonnegative
from lrgrad.rules.base import UpdateRule
from lrgrad.subspace import apply_transition


class AdafactorRule(UpdateRule):
    name = "adafactor"
    option_defaults: dict[str, Any] = {"beta1": None, "beta2_decay": -0.8, "eps": 1e-30, "clip_threshold": 1.0}
    linear_keys = ("exp_avg",)
    quadratic_keys = ("exp_avg_sq",)

    @classmethod
    def validate_options(cls, group: dict[str, Any]) -> None:
        check_beta("beta1", group["beta1"], allow_none=True)
        decay = group["beta2_decay"]
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not decay <= 0.0:
            raise ValueError(f"Invalid beta2_decay: {decay!r} (must be a float <= 0)")
        check_nonnegative("epsilon", group["eps"])
        check_nonnegative("clip_threshold", group["clip_threshold"])
        if group["clip_threshold"] == 0:
            raise ValueError("Invalid clip_threshold: 0 (must be > 0)")

    def init_state(self, state: dict[str, Any], like: torch.Tensor) -> None:
        if like.dim() == 2:
            state["exp_avg_sq_row"] = like.new_zeros(like.shape[0])
            state["exp_avg_sq_col"] = like.new_zeros(like.shape[1])
        else:
            state["exp_avg_sq"] = torch.zeros_like(like)
        if self.group["beta1"] is not None:
            state["exp_avg"] = torch.zeros_like(like)

    def update(self, state: dict[str, Any], grad: torch.Tensor, step: int) -> torch.Tensor:
        if grad.dtype in (torch.float16, torch.bfloat16):
            # state_dtype="param": compute in fp32 and store the state in the param's dtype, as
            # transformers.Adafactor does (in fp16, eps = 1e-30 and small g² are 0 and g / sqrt(0) is inf)
            work = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
            update = self._update(work, grad.float(), step)
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    value.copy_(work[key])
            return update
        return self._update(state, grad, step)

    def _update(self, state: dict[str, Any], grad: torch.Tensor, step: int) -> torch.Tensor:
        beta2_t = 1.0 - step ** self.group["beta2_decay"]
        eps = self.group["eps"]
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            # mean(g² + ε) along each axis from two norm reductions: no a x b g² temporary
            rows, cols = grad.shape
            # (out of place: under FSDP2 a norm is a Partial DTensor that in-place ops cannot redistribute)
            row.lerp_(torch.linalg.vector_norm(grad, dim=1).square() / max(cols, 1) + eps, 1 - beta2_t)
            col.lerp_(torch.linalg.vector_norm(grad, dim=0).square() / max(rows, 1) + eps, 1 - beta2_t)
            # rsqrt(R Cᵀ / mean(R)) = rsqrt(R / mean(R)) ⊗ rsqrt(C): no a x b second moment
            row_factor = (row / row.mean()).rsqrt_().unsqueeze(1)
            update = torch.mul(grad, row_factor).mul_(col.rsqrt().unsqueeze(0))
        else:
            exp_avg_sq = state["exp_avg_sq"]
            exp_avg_sq.lerp_(grad * grad + eps, 1 - beta2_t)
            update = grad * exp_avg_sq.rsqrt()
        rms = update.norm() / max(update.numel(), 1) ** 0.5
        update.div_((rms / self.group["clip_threshold"]).clamp_(min=1.0))
        if self.group["beta1"] is not None:
            state["exp_avg"].lerp_(update, 1 - self.group["beta1"])
            update = state["exp_avg"].clone()
        return update

    def change_basis(self, state: dict[str, Any], transition: torch.Tensor, side: str) -> None:
        # Only the factor along the projected axis lives in the subspace.
        if "exp_avg_sq_row" in state:
            key = "exp_avg_sq_col" if side == "right" else "exp_avg_sq_row"
            state[key] = apply_transition(state[key], transition, side, quadratic=True)
        elif "exp_avg_sq" in state:
            state["exp_avg_sq"] = apply_transition(state["exp_avg_sq"], transition, side, quadratic=True)
        if "exp_avg" in state:
            state["exp_avg"] = apply_transition(state["exp_avg"], transition, side)

    def reset_state(self, state: dict[str, Any]) -> None:
        for key in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg"):
            if key in state:
                state[key] = torch.zeros_like(state[key])  # new tensors: a snapshot keeps the old
