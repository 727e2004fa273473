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
from lrgrad.step_counts import step_counts


class AdamWRule(UpdateRule):
    name = "adamw"
    #: ``fused``: full-rank params and the low-rank moments use torch's fused AdamW kernel
    #: (``None``: whenever the tensors are fp32/fp64 on CPU or CUDA), else the foreach path
    #: below and the per-param :meth:`update`.
    option_defaults: dict[str, Any] = {"betas": (0.9, 0.999), "eps": 1e-8, "fused": None}
    linear_keys = ("exp_avg",)
    quadratic_keys = ("exp_avg_sq",)

    @classmethod
    def validate_options(cls, group: dict[str, Any]) -> None:
        check_betas(group["betas"])
        check_nonnegative("epsilon", group["eps"])
        check_bool("fused", group["fused"], allow_none=True)

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
        """The directions of every projected param in one ``torch._fused_adamw_`` call.

        The kernel computes ``p ← p·(1 − lr·λ) − lr·m̂/(√v̂ + ε)`` (torch's eps placement, as
        :meth:`update`) after advancing the moments. With ``lr = −1`` it leaves ``u = m̂/(√v̂ + ε)``
        in ``p`` when ``p`` starts at 0: one pass over all low-rank moments instead of seven per
        param (what the floor of ``experiments/bench_step.py`` does). It agrees with :meth:`update`
        to a few fp32 roundings (the kernel scales by ``lr/(1−β1ᵗ)`` before dividing, and may
        contract to FMAs), the bound in tests/rules/test_rule_adamw_fused_direction.py.

        ``reuse_grads``: the directions are written into the gradients themselves, with no zeroed
        buffer (a memset of every low-rank moment's size, and on CPU often page faults: 4-10 ms a
        LLaMA-60M step). The kernel then gets ``p = g`` (the same memory) and ``λ = −1``, so
        ``p·(1 − lr·λ) = g·0 = 0`` for a finite ``g`` before the ``−lr·u`` term: the same directions,
        bit for bit (tested). Each element's ``g`` is read before its ``p`` is written in torch's
        CPU kernel (per vector: load, compute, store). Only CPU tensors take this path: on a GPU
        the memset runs at memory speed, and the zeroed buffer needs no assumption about how a
        device kernel orders its loads and stores. A non-finite ``g`` gives a NaN direction either way.
        """
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        if not grads or not self._can_fuse(grads, exp_avgs) or not all(
            # DTensors go param by param; the kernel walks memory, so every operand must be dense
            type(t) is torch.Tensor and t.is_contiguous() for t in (*grads, *exp_avgs, *exp_avg_sqs)
        ):
            return super().update_many(states, grads, steps)
        beta1, beta2 = self.group["betas"]
        device, dtype = grads[0].device, exp_avgs[0].dtype
        if reuse_grads and device.type == "cpu" and all(g.dtype == dtype for g in grads):
            outs, decay = grads, -1.0
        else:
            # one zeroed buffer, split per param: a single memset
            flat = torch.zeros(sum(g.numel() for g in grads), dtype=dtype, device=device)
            outs = [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)]
            decay = 0.0
        step_tensors = step_counts(steps, device)
        torch._fused_adamw_(outs, grads, exp_avgs, exp_avg_sqs, [], step_tensors, amsgrad=False, lr=-1.0,
                            beta1=beta1, beta2=beta2, weight_decay=decay, eps=self.group["eps"], maximize=False)
        return outs

    def apply_full_rank(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict[str, Any]],
        steps: list[int],
        lr: float,
        weight_decay: float,
    ) -> None:
        if not params:
            return
        if self.group.get("foreach") is False:
            super().apply_full_rank(params, grads, states, steps, lr, weight_decay)
            return
        beta1, beta2 = self.group["betas"]
        eps = self.group["eps"]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        if self._can_fuse(params, exp_avgs):
            # torch's fused kernel reads the step count from tensors (it does not advance them here).
            step_tensors = step_counts(steps, params[0].device)
            torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], step_tensors, amsgrad=False, lr=lr,
                                beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, maximize=False)
            return
        # Low-precision params are stepped on fp32 copies and rounded once.
        work = [p if p.dtype == m.dtype else p.to(m.dtype) for p, m in zip(params, exp_avgs)]
        if weight_decay != 0:
            torch._foreach_mul_(work, 1 - lr * weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        step_sizes = [-lr / (1 - beta1**t) for t in steps]
        bias_correction2_sqrt = [(1 - beta2**t) ** 0.5 for t in steps]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(work, exp_avgs, denom, step_sizes)
        for p, w in zip(params, work):
            if w is not p:
                p.copy_(w)

    def _can_fuse(self, params: list[torch.Tensor], exp_avgs: list[torch.Tensor]) -> bool:
        if self.group.get("fused") is False or not hasattr(torch, "_fused_adamw_"):
            return False
        device = params[0].device
        if device.type not in ("cpu", "cuda"):
            return False
        return all(p.device == device and p.dtype == m.dtype and p.dtype == params[0].dtype
                   for p, m in zip(params, exp_avgs))
