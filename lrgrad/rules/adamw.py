"""AdamW, exactly as ``torch.optim.AdamW`` computes it.

"Decoupled Weight Decay Regularization", Loshchilov & Hutter, arXiv:1711.05101.

    m_t = β1 m + (1 - β1) g
    v_t = β2 v + (1 - β2) g²
    u   = (m_t / (1 - β1^t)) / (sqrt(v_t) / sqrt(1 - β2^t) + ε)
    p  <- p (1 - lr λ) - lr u

``eps`` sits where torch puts it (outside the bias-corrected square root), not
where galore-torch puts it (``m / (sqrt(v) + ε) * sqrt(1-β2^t) / (1-β1^t)``).
"""

from __future__ import annotations

from typing import Any

import torch

from lrgrad import kernels
from lrgrad._checks import check_betas, check_bool, check_nonnegative
from lrgrad.rules.base import UpdateRule


class AdamWRule(UpdateRule):
    name = "adamw"
    #: ``fused``: full-rank params and the low-rank moments use torch's fused AdamW kernel
    #: (``None``: whenever the tensors are fp32/fp64 on CPU or CUDA), else the foreach path
    #: below and the per-param :meth:`update`.
    option_defaults: dict[str, Any] = {"betas": (0.9, 0.999), "eps": 1e-8, "fused": None}
    linear_keys = ("exp_avg",)
    quadratic_keys = ("exp_avg_sq",)
    elementwise = True

    @classmethod
    def validate_options(cls, group: dict[str, Any]) -> None:
        check_betas(group["betas"])
        check_nonnegative("epsilon", group["eps"])
        check_bool("fused", group["fused"], allow_none=True)
        if group["fused"] and group.get("foreach"):  # torch.optim.AdamW refuses the pair too
            raise ValueError("Invalid fused: fused=True and foreach=True cannot be set together; pick one")

    def init_state(self, state: dict[str, Any], like: torch.Tensor) -> None:
        state["exp_avg"] = torch.zeros_like(like, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)

    def update(self, state: dict[str, Any], grad: torch.Tensor, step: int) -> torch.Tensor:
        beta1, beta2 = self.group["betas"]
        # one fused elementwise pass on GPU (Triton); the torch reference is the same arithmetic
        return kernels.adam_direction_(state["exp_avg"], state["exp_avg_sq"], grad, beta1, beta2,
                                       self.group["eps"], step)

    def update_many(
        self, states: list[dict[str, Any]], grads: list[torch.Tensor], steps: list[int],
        reuse_grads: bool = False,
    ) -> list[torch.Tensor]:
        """The directions of every projected param from one fused multi-tensor pass
        (``lrgrad.kernels.adamw_directions_``: torch's fused AdamW kernel read with ``lr = −1``), or
        :meth:`update` param by param where the kernel does not apply or ``fused=False``. The two agree
        to a few fp32 roundings (the kernel scales by ``lr/(1−β1ᵗ)`` before dividing, and may contract
        to FMAs), the bound in tests/rules/test_rule_adamw_fused_direction.py.

        ``reuse_grads``: the directions are written into the gradients themselves on CPU, with no
        zeroed buffer (a memset of every low-rank moment's size, and on CPU often page faults: 4-10 ms
        a LLaMA-60M step); the same directions bit for bit (tested). A non-finite ``g`` gives a NaN
        direction either way.
        """
        if self.group.get("fused") is not False and grads:
            beta1, beta2 = self.group["betas"]
            outs = kernels.adamw_directions_(grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                                             steps, beta1=beta1, beta2=beta2, eps=self.group["eps"],
                                             into_grads=reuse_grads)
            if outs is not None:
                return outs
        return super().update_many(states, grads, steps)

    def apply_full_rank(self, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]],
                        steps: list[int], lr: float, weight_decay: float) -> None:
        if not params:
            return
        if self.group.get("foreach") is False:
            super().apply_full_rank(params, grads, states, steps, lr, weight_decay)
            return
        beta1, beta2 = self.group["betas"]
        kernels.adamw_step_(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], steps,
                            lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=self.group["eps"],
                            fused=self.group.get("fused"))

