r"""LDAdam's projector: a subspace re-estimated every step, projection-aware moment transport and
generalized error feedback.

"LDAdam: Adaptive Optimization from Low-Dimensional Gradient Statistics", Robert, Safaryan, Modoranu &
Alistarh, ICLR 2025, arXiv:2410.16103 (reference: IST-DASLab/LDAdam, ``ldadamw_torch``).

With the AdamW rule (``m``, ``v`` in the subspace; other rules get the generic transport ``T`` / ``T∘T``
and a subspace from the gradient alone, since steps 2-4 are written for Adam's moments), at every
refresh step t (every step in the preset) with ``t' = t − 1`` completed steps and ``c_k = 1 − β_k^{t'}``:

1. **Error feedback.** The step works on ``G̃_t = G_t + e_{t−1}`` (``e`` is ``state["proj_error"]``,
   m x n; the reference keeps it in ``p.grad``, which its ``zero_grad`` does not clear).
2. **Subspace.** ``B = ρ·up_old(m)/c_1 + (1 − ρ)·G̃_t`` (the back-projected bias-corrected momentum
   blended with the gradient); the new basis is one block power iteration from the old one
   (right: ``P = qr(Bᵀ B P_oldᵀ)ᵀ``; left: ``P = qr(B Bᵀ P_old)``; ``ldadam_basis="power"``), or the
   top-r SVD of B (``"svd"``). The first step takes the SVD of ``G_1``.
3. **Projection-aware transport** with ``T = P_old P_newᵀ`` (right; ``P_newᵀ P_old`` left):
   ``m ← m T``, and the second moment's *variance part* is rotated quadratically while the new mean
   enters exactly: ``v ← c_2·| (v/c_2 − m_old²/c_1²) T∘T + (m T)²/c_1² |``.
4. **Error of this step.** ``e_t = G̃_t − up_new(down_new(G̃_t)) + β_1/(1 − β_1)·(up_old(m_old) − up_new(m T))``:
   what the projection drops of the gradient, and what the transport drops of the momentum.

Then AdamW runs on ``R = down_new(G̃_t)`` as usual. ``ρ`` = ``ldadam_rho`` (0.908), the betas are the
AdamW rule's (``betas``: the projector declares the key, so both read the same group value), error
feedback ``ldadam_error_feedback`` (off for the bare projector, which then is a plain projector with a
per-step power-iteration subspace; the ``LDAdamW`` preset turns it on, as the reference).

Contract notes (docs/ldadam.md): the projector reads the rule's ``exp_avg``/``exp_avg_sq`` by name
(Adam's moments), advances its error buffer in :meth:`down` (the
one map that sees G every step), and refuses FSDP2 (full-size error buffer; the wrapper's left-side
``down`` never reaches the projector).
"""

from __future__ import annotations

from typing import Any

import torch

from lrgrad import kernels
from lrgrad._checks import check_bool, check_choice, check_float
from lrgrad.projectors.base import Projector, guarded_basis
from lrgrad.projectors.svd import top_singular_basis

LDADAM_BASES = ("power", "svd")


def power_step(matrix: torch.Tensor, previous: torch.Tensor, side: str) -> torch.Tensor:
    """One block power iteration for the top-r subspace of ``matrix`` from ``previous`` (r x n right,
    m x r left), orthonormalized by QR (Householder, signs as LAPACK's ``geqrf``)."""
    if side == "right":
        q, _ = torch.linalg.qr(matrix.T @ (matrix @ previous.T))
        return q.T.contiguous()
    q, _ = torch.linalg.qr(matrix @ (matrix.T @ previous))
    return q.contiguous()


class LDAdamProjector(Projector):
    """LDAdam's per-step subspace, moment transport and error feedback (requires the AdamW rule)."""

    name = "ldadam"
    supports_sharding = False
    orthonormal = True
    option_defaults: dict[str, Any] = {"ldadam_rho": 0.908, "ldadam_basis": "power", "ldadam_error_feedback": False,
                                       "betas": (0.9, 0.999)}

    @classmethod
    def validate_options(cls, group: dict[str, Any]) -> None:
        check_float("ldadam_rho", group["ldadam_rho"], minimum=0.0, maximum=1.0)
        check_choice("ldadam_basis", group["ldadam_basis"], LDADAM_BASES)
        check_bool("ldadam_error_feedback", group["ldadam_error_feedback"])

    @staticmethod
    def adam_moments(state: dict[str, Any]) -> bool:
        """Whether the state holds Adam's plain moments (``exp_avg``, ``exp_avg_sq``), which LDAdam's
        transport is written for; other rules (and 8-bit codes) take the generic ``T`` / ``T∘T``."""
        m, v = state.get("exp_avg"), state.get("exp_avg_sq")
        return (isinstance(m, torch.Tensor) and isinstance(v, torch.Tensor) and m.is_floating_point()
                and v.is_floating_point() and m.shape == v.shape and type(m) is torch.Tensor)

    def refresh_state_spec(
        self, shape2d: tuple[int, int], dtype: torch.dtype
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        spec = super().refresh_state_spec(shape2d, dtype)
        if self.options["ldadam_error_feedback"]:
            spec["proj_error"] = (tuple(shape2d), dtype)
        return spec

    # ---------------------------------------------------------------- step 1: the corrected gradient
    def corrected(self, state: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
        """``G + e`` (computed once per step: the refresh and ``down`` share it)."""
        cached = self.__dict__.get("_corrected")
        if cached is not None and cached[0] is grad:
            return cached[1]
        error = state.get("proj_error")
        value = grad + error if self.options["ldadam_error_feedback"] and error is not None else grad
        self._corrected = (grad, value)
        return value

    # ---------------------------------------------------------------- step 2: the subspace
    def refresh(self, state: dict[str, Any], grad: torch.Tensor, step: int, group: dict[str, Any]) -> bool:
        corrected = self.corrected(state, grad)
        previous = state.get("proj_basis")

        def compute() -> torch.Tensor:
            if previous is None or not self.adam_moments(state):
                # the first step (the reference's SVD of G), or a rule without Adam's momentum
                return top_singular_basis(corrected, self.rank, self.side)
            beta1 = self.options["betas"][0]
            rho = self.options["ldadam_rho"]
            done = step - 1
            back = kernels.project_up(state["exp_avg"].to(corrected.dtype), previous, self.side)
            blend = back.mul_(rho / (1 - beta1**done)).add_(corrected, alpha=1 - rho)
            if self.options["ldadam_basis"] == "svd":
                return top_singular_basis(blend, self.rank, self.side)
            return power_step(blend, previous.to(blend.dtype), self.side)

        basis = guarded_basis(state, corrected, compute)
        if basis is None:
            return False
        state["proj_basis"] = basis
        state["proj_refreshes"] += 1
        return True

    def refresh_sharded(self, state: dict[str, Any], grad_local: torch.Tensor, step: int,
                        group: dict[str, Any], ctx: Any) -> Any:
        raise ValueError("Invalid params: the LDAdam projector does not run on FSDP2-sharded params (its error "
                         "buffer is full size and advanced by the projector); use DDP, or another projector")

    # ---------------------------------------------------------------- step 3: the transport
    def carry_moments(self, rule: Any, state: dict[str, Any], old_state: dict[str, Any]) -> None:
        if not self.adam_moments(state):
            rule.change_basis(state, self.transition(old_state, state), self.side)
            return
        beta1, beta2 = self.options["betas"]
        done = state["step"]  # completed steps before this one
        c1, c2 = 1 - beta1**done, 1 - beta2**done
        t = self.transition(old_state, state)
        m_old, v_old = state["exp_avg"], state["exp_avg_sq"]
        t = t.to(m_old.dtype)

        def move(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            return x @ tt if self.side == "right" else tt @ x

        m_new = move(m_old, t)
        variance = v_old / c2 - m_old * m_old / (c1 * c1)
        v_new = (move(variance, t * t) + m_new * m_new / (c1 * c1)).abs_().mul_(c2)
        state["exp_avg"], state["exp_avg_sq"] = m_new, v_new
        if self.options["ldadam_error_feedback"]:  # what the transport drops of the momentum (step 4)
            lost = kernels.project_up(m_old, old_state["proj_basis"].to(m_old.dtype), self.side)
            lost.sub_(kernels.project_up(m_new, state["proj_basis"].to(m_new.dtype), self.side))
            self._transport_error = lost.mul_(beta1 / (1 - beta1))

    # ---------------------------------------------------------------- step 4: the error of this step
    def down(self, state: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
        """``down(G + e)``; with error feedback the new error is stored (a new tensor)."""
        corrected = self.corrected(state, grad)
        low = super().down(state, corrected)
        if self.options["ldadam_error_feedback"] and "proj_basis" in state:
            error = corrected - super().up(state, low)
            transport = self.__dict__.pop("_transport_error", None)
            if transport is not None:
                error.add_(transport)
            state["proj_error"] = error
        return low


__all__ = ["LDADAM_BASES", "LDAdamProjector", "power_step"]
