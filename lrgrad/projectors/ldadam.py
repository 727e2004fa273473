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
(Adam's moments); step 1 is its :meth:`corrected_grad` hook and step 4 its :meth:`advance` hook (the
optimizer calls each once per step, before the refresh and after ``down``); the error buffer
``state["proj_error"]`` is a :attr:`row_state_keys` entry. SVDs (the first step's, ``ldadam_basis="svd"``)
are ``torch.linalg.svd`` (``ldadam_svd="exact"``) or the seeded randomized SVD (``"randomized"``).

FSDP2 (:meth:`refresh_sharded`): ``e`` is elementwise in G, so each rank keeps its rows of it (a
``Shard(0)`` DTensor like the weight) and steps 1 and 4 are row-local (the left side's ``R`` is the
wrapper's all-reduced one). Step 2 runs on row shards with small all-reduces: the power step's n x r
product (left side: plus the m x r rows of ``B Bᵀ P_old`` gathered for the QR), and an SVD is the
seeded sketch (one n x (r + 8) all-reduce; left: plus an m x r row gather), which
one process computes with ``ldadam_svd="randomized"`` (:attr:`sharded_refresh_options`). Step 3 acts on
the rank axis, which is never sharded. Nothing of G is gathered.
"""

from __future__ import annotations

from typing import Any

import torch

from lrgrad._checks import check_bool, check_choice, check_float
from lrgrad.dtensor import LocalContext
from lrgrad.projectors.base import Projector, guarded_basis, guarded_sharded_basis
from lrgrad.projectors.svd import sketch_basis, top_singular_basis

LDADAM_BASES = ("power", "svd")
#: how LDAdam takes an SVD (the first step's, ``ldadam_basis="svd"``'s): ``torch.linalg.svd`` or the seeded
#: randomized SVD that FSDP2 row shards always compute
LDADAM_SVDS = ("exact", "randomized")
#: the randomized SVD's oversampling (the SVD projector's default ``svd_oversample``)
SKETCH_OVERSAMPLE = 8


def power_step(matrix: torch.Tensor, previous: torch.Tensor, side: str, ctx: Any = None) -> torch.Tensor:
    """One block power iteration for the top-r subspace of ``matrix`` from ``previous`` (r x n right,
    m x r left), orthonormalized by QR (Householder, signs as LAPACK's ``geqrf``).

    With ``ctx`` (a :class:`lrgrad.dtensor.ShardContext`), ``matrix`` is this rank's rows of B and,
    on the left side, ``previous`` the same rows of ``P_old``: right, ``Bᵀ(B P_oldᵀ) = Σ_i B_iᵀ(B_i P_oldᵀ)``
    is one n x r all-reduce; left, ``Bᵀ P_old = Σ_i B_iᵀ P_old,i`` (n x r) is all-reduced, and the rows
    ``B_i (Bᵀ P_old)`` are gathered (m x r) for the QR. The QR then runs on the same replicated matrix
    on every rank, so every rank gets the same basis."""
    ctx = ctx if ctx is not None else LocalContext(matrix.shape[0])
    if side == "right":
        q, _ = torch.linalg.qr(ctx.all_reduce(matrix.T @ (matrix @ previous.T)))
        return q.T.contiguous()
    q, _ = torch.linalg.qr(ctx.all_gather_rows(matrix @ ctx.all_reduce(matrix.T @ previous)))
    return q.contiguous()


class LDAdamProjector(Projector):
    """LDAdam's per-step subspace, moment transport and error feedback (requires the AdamW rule)."""

    name = "ldadam"
    orthonormal = True
    option_defaults: dict[str, Any] = {"ldadam_rho": 0.908, "ldadam_basis": "power", "ldadam_error_feedback": False,
                                       "ldadam_svd": "exact", "betas": (0.9, 0.999)}
    sharded_refresh_options: dict[str, Any] = {"ldadam_svd": "randomized"}
    row_state_keys = ("proj_error",)

    @classmethod
    def validate_options(cls, group: dict[str, Any]) -> None:
        check_float("ldadam_rho", group["ldadam_rho"], minimum=0.0, maximum=1.0)
        check_choice("ldadam_basis", group["ldadam_basis"], LDADAM_BASES)
        check_bool("ldadam_error_feedback", group["ldadam_error_feedback"])
        check_choice("ldadam_svd", group["ldadam_svd"], LDADAM_SVDS)

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
    def corrected_grad(self, state: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
        """``G̃ = G + e`` with error feedback (the refresh, ``down`` and :meth:`advance` all get it)."""
        error = state.get("proj_error")
        return grad + error if self.options["ldadam_error_feedback"] and error is not None else grad

    # ---------------------------------------------------------------- step 2: the subspace
    def svd_basis(self, state: dict[str, Any], rows: torch.Tensor, step: int, ctx: Any = None) -> torch.Tensor:
        """The top-r singular basis of the matrix whose rows are ``rows`` (all of them in one process):
        ``torch.linalg.svd`` for ``ldadam_svd="exact"`` (one process only), else the seeded randomized
        SVD (:func:`lrgrad.projectors.svd.sketch_basis`, warm-started from the previous basis on the
        right side), which is also what FSDP2 row shards compute."""
        if ctx is None and self.options["ldadam_svd"] == "exact":
            return top_singular_basis(rows, self.rank, self.side)
        generator = self.refresh_generator(state, step, rows.device)
        return sketch_basis(rows, self.rank, self.side, self.previous_basis(state), SKETCH_OVERSAMPLE, 0, generator,
                            ctx)

    def compute_basis(self, state: dict[str, Any], corrected: torch.Tensor, step: int, ctx: Any = None) -> torch.Tensor:
        """The new basis from ``corrected`` (``G̃``; its rows under FSDP2, with ``ctx``)."""
        previous = self.previous_basis(state)
        if previous is None or not self.adam_moments(state):
            # the first step (the reference's SVD of G), or a rule without Adam's momentum
            return self.svd_basis(state, corrected, step, ctx)
        beta1 = self.options["betas"][0]
        rho = self.options["ldadam_rho"]
        done = step - 1
        back = self.up_rows(state["exp_avg"].to(corrected.dtype), previous)  # FSDP2: this rank's rows
        blend = back.mul_(rho / (1 - beta1**done)).add_(corrected, alpha=1 - rho)
        if self.options["ldadam_basis"] == "svd":
            return self.svd_basis(state, blend, step, ctx)
        if ctx is None:
            return power_step(blend, previous.to(blend.dtype), self.side)
        start, stop = self.local_rows(previous.shape[0]) if self.side == "left" else (0, 0)
        local_previous = previous[start:stop] if self.side == "left" else previous
        return power_step(blend, local_previous.to(blend.dtype), self.side, ctx)

    def refresh(self, state: dict[str, Any], grad: torch.Tensor, step: int, group: dict[str, Any]) -> bool:
        basis, counted = guarded_basis(state, grad, lambda: self.compute_basis(state, grad, step),
                                       keep_on_zero=self.has_basis(state))
        if basis is None:
            return False
        state["proj_basis"] = basis
        state["proj_refreshes"] += int(counted)
        return counted  # a provisional basis is no subspace change

    def refresh_sharded(self, state: dict[str, Any], grad_local: torch.Tensor, step: int,
                        group: dict[str, Any], ctx: Any) -> Any:
        """FSDP2: the same subspace from this rank's rows of ``G̃`` (and of ``up(m)``): the power step's
        ``Bᵀ(B P_oldᵀ)`` (right, n x r) or ``Bᵀ P_old`` (left, n x r) all-reduced, the left side's
        m x r product gathered by rows for the QR; an SVD (the first step, ``ldadam_basis="svd"``,
        rules without Adam's moments) is the seeded sketch: n x k all-reduces (k = r + 8)."""
        basis, counted = guarded_sharded_basis(
            state, grad_local, ctx, lambda: self.compute_basis(state, grad_local, step, ctx),
            keep_on_zero=self.has_basis(state))
        if basis is None:
            return False
        state["proj_basis"] = basis
        state["proj_refreshes"] += int(counted)
        return counted

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
        if self.options["ldadam_error_feedback"]:  # what the transport drops of the momentum: step 4
            self._transported = (m_old, old_state["proj_basis"], m_new, state["proj_basis"])

    # ---------------------------------------------------------------- step 4: the error of this step
    def advance(self, state: dict[str, Any], grad: torch.Tensor, low: torch.Tensor) -> None:
        """``e_t = G̃ − up(down(G̃)) + β_1/(1 − β_1)·(up_old(m_old) − up_new(m T))`` (a new tensor; this
        rank's rows under FSDP2)."""
        if not self.options["ldadam_error_feedback"] or "proj_basis" not in state:
            return
        error = grad - self.up_rows(low, self.basis(state))
        transported = self.__dict__.pop("_transported", None)
        if transported is not None:
            m_old, p_old, m_new, p_new = transported
            lost = self.up_rows(m_old, p_old.to(m_old.dtype))
            lost.sub_(self.up_rows(m_new, p_new.to(m_new.dtype)))
            error.add_(lost.mul_(self.options["betas"][0] / (1 - self.options["betas"][0])))
        state["proj_error"] = error


__all__ = ["LDADAM_BASES", "LDADAM_SVDS", "LDAdamProjector", "power_step"]
