"""Online Subspace Descent's projector: a basis tracked by online PCA, no SVD after the first.

"Memory-Efficient LLM Training with Online Subspace Descent",
Liang, Liu, Chen, Tang, Liu & Liu 2024, arXiv:2408.12857.

The basis ``P`` is initialised once - ``pca_init="svd"``: the top-r singular
vectors of the first gradient; ``pca_init="random"``: a random orthonormal matrix
drawn from the parameter's seed (no SVD at all) - and then every refresh
(every step with the presets' ``update_proj_gap=1``) takes one Adam step on the
normalized reconstruction loss

    right side (P is r x n):  L(P) = ‖Â PᵀP − Â‖²_F,  Â = G / ‖G‖_F
    left side  (P is m x r):  L(P) = ‖P PᵀÂ − Â‖²_F   (the right side with Âᵀ, Pᵀ)

whose gradient has a closed form. With E = Â PᵀP − Â,

    dL = 2⟨E, Â (dPᵀ P + Pᵀ dP)⟩  =>  ∇L = 2 P (EᵀÂ + ÂᵀE)

and with B = Â Pᵀ (m x r), C = BᵀÂ (r x n), K = BᵀB, M = P Pᵀ (r x r):

    ∇L = 2 (M C + K P − 2 C)

- O(mnr) work and no m x n temporary beyond Â (``pca_loss_grad``). The step's
learning rate follows the main schedule, as the paper's code does:
``lr_P = pca_lr · lr_t / lr_0`` with ``lr_0`` the group's ``initial_lr`` (set by
torch LR schedulers) or its ``lr`` at the first step, stored in
``state["proj_lr0"]``. ``pca_lr=5e-3`` is the reference's 1/gap at its gap 200.

Orthonormality is only implicit in L; an explicit guard re-orthonormalizes ``P``
(QR with ``diag(R) > 0``, so a nearly orthonormal ``P`` barely moves) every
``pca_qr_every`` steps, and whenever ``‖P Pᵀ − I‖_F > pca_ortho_tol`` takes one
Newton–Schulz step toward P's polar factor (:func:`polar_step`: one r x r x d GEMM with
the check's own Gram matrix, the nearest orthonormal matrix; a QR when the drift is too
large for that step's bound). The QR is a Cholesky QR of that same Gram matrix while P is
well conditioned (the Householder QR's result, unique with ``diag(R) > 0``). The basis in use therefore satisfies
``‖P Pᵀ − I‖_F ≤ pca_ortho_tol`` (up to fp32 rounding of the check itself).

State per param: ``proj_basis`` (P), ``proj_exp_avg``/``proj_exp_avg_sq`` (P's Adam
moments), ``proj_step`` and ``proj_lr0`` - 3·d·r floats, as the paper reports.
The rule's moments are kept across the small per-step rotations (the reference's
behaviour, ``moment_policy="keep"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lrgrad import kernels
from lrgrad._checks import check_betas, check_choice, check_int, check_nonnegative, check_positive
from lrgrad.projectors.base import Projector, guarded_basis, guarded_sharded_basis
from lrgrad.projectors.svd import gram_top_basis, sketch_basis

PCA_INITS = ("svd", "random", "randomized")
#: the randomized initial SVD (and the FSDP2 one): oversampling and power iterations
INIT_SKETCH = {"oversample": 8, "power_iters": 1}


def pca_loss(a: torch.Tensor, p: torch.Tensor, side: str = "right") -> torch.Tensor:
    """``‖A PᵀP − A‖²_F`` (right, P r x n) or ``‖P PᵀA − A‖²_F`` (left, P m x r)."""
    if side == "left":
        a, p = a.T, p.T
    return (a @ p.T @ p - a).square().sum()


def pca_loss_grad(a: torch.Tensor, p: torch.Tensor, side: str = "right") -> torch.Tensor:
    """Closed-form gradient of :func:`pca_loss` with respect to ``p``: ``2 (M C + K P − 2 C)``."""
    if side == "left":
        return pca_loss_grad(a.T, p.T, "right").T
    b = a @ p.T  # m x r
    return pca_grad_from_sums(p, b.T @ a, b.T @ b)


def pca_grad_from_sums(p: torch.Tensor, c: torch.Tensor, k: torch.Tensor, orthonormal: bool = False) -> torch.Tensor:
    """``2 (M C + K P − 2 C)`` from ``C = BᵀÂ`` (r x n) and ``K = BᵀB`` (r x r), ``M = P Pᵀ``
    (right-side form). ``C`` and ``K`` are sums over the rows of ``Â``, so under FSDP2 they
    are all-reduced from the row shards (:meth:`OnlinePCAProjector.refresh_sharded`).

    ``orthonormal``: P comes straight from a QR or the initial basis, so ``M = I`` up to ~eps,
    less than the rounding of the ``M C`` GEMM itself (~r·eps): ``2 (K P − C)``, two r x r x n
    GEMMs fewer (tested against the general form)."""
    if orthonormal:
        return torch.addmm(c, k, p, beta=-1).mul_(2)
    return 2 * ((p @ p.T) @ c + k @ p - 2 * c)


def pca_loss_grad_scaled(grad: torch.Tensor, scale: float | torch.Tensor, p: torch.Tensor,
                         side: str = "right") -> torch.Tensor:
    """``pca_loss_grad(scale · grad, p, side)`` without the scaled m x n copy of ``grad``: the
    scale is applied to the small products ``B`` (m x r) and ``C`` (r x n) instead (equal up to
    rounding; :func:`pca_loss_grad` is the reference)."""
    if side == "left":
        return pca_loss_grad_scaled(grad.T, scale, p.T, "right").T
    return pca_grad_from_projection(grad, grad @ p.T, scale, p)


def pca_grad_from_projection(grad: torch.Tensor, projected: torch.Tensor, scale: float | torch.Tensor,
                             p: torch.Tensor, orthonormal: bool = False) -> torch.Tensor:
    """:func:`pca_loss_grad_scaled` (right-side form) from ``projected = G Pᵀ`` (m x r), which is also
    the step's low-rank gradient ``down(G)``: the PCA step and the projection share that GEMM.
    ``orthonormal``: as in :func:`pca_grad_from_sums`."""
    b = projected * scale  # B = Â Pᵀ (m x r); scaled before the GEMM, so a tiny ‖G‖ cannot underflow C
    c = (b.T @ grad).mul_(scale)  # r x n
    # K = BᵀB = BᵀÂPᵀ = C Pᵀ: r²·n work instead of r²·m (n is the projected, smaller side under "std")
    k = c @ p.T
    if orthonormal:
        return pca_grad_from_sums(p, c, k, orthonormal=True)
    m = p @ p.T
    # 2 (M C + K P − 2C) with the sums accumulated by the GEMMs (no r x n temporaries)
    return torch.addmm(c, k, p, beta=-2).addmm_(m, c).mul_(2)


#: below this drift the Gram matrix is well conditioned (κ² ≤ 3) and Cholesky QR is as accurate as Householder
CHOLESKY_QR_MAX_DRIFT = 0.5


def orthonormalize(p: torch.Tensor, side: str, deviation: torch.Tensor | None = None,
                   drift: float | None = None) -> torch.Tensor:
    """Orthonormal rows (right) / columns (left) spanning the same space, by QR with ``diag(R) > 0``.

    With the drift check's ``deviation = P Pᵀ − I`` (right; ``PᵀP − I`` left) and a drift under
    :data:`CHOLESKY_QR_MAX_DRIFT`, Cholesky QR: the Gram matrix ``L Lᵀ`` gives ``Q = L⁻¹ P`` (L⁻¹
    from an r x r triangular solve, applied by one GEMM). The QR factorization with a positive
    diagonal is unique, so this is the Householder result up to rounding (~κ²·eps, κ² ≤ 3 here), at
    a fraction of its cost.
    """
    if deviation is not None and drift is not None and drift < CHOLESKY_QR_MAX_DRIFT:
        inverse, info = cholesky_factor_inverse(deviation)
        if int(info) == 0:
            return apply_factor_inverse(inverse, p, side)
    q, r = torch.linalg.qr(p.T if side == "right" else p)
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    q = q * signs
    return (q.T if side == "right" else q).contiguous()


def cholesky_factor_inverse(deviation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L⁻¹, info)`` for ``I + deviation = L Lᵀ`` (lower L; any leading batch dimensions), with
    ``torch.linalg.cholesky_ex``'s ``info`` (non-zero: not positive definite to rounding). L⁻¹ (r x r,
    κ(L) ≤ √3 below :data:`CHOLESKY_QR_MAX_DRIFT`) is then applied by one GEMM: a triangular solve
    against the r x d P would copy P into LAPACK's column-major layout and back."""
    gram = deviation.clone()
    gram.diagonal(dim1=-2, dim2=-1).add_(1.0)
    chol, info = torch.linalg.cholesky_ex(gram)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False), info


def apply_factor_inverse(inverse: torch.Tensor, p: torch.Tensor, side: str) -> torch.Tensor:
    """Q from P and L⁻¹: right ``P = L Qᵀ`` gives ``Q = L⁻¹ P``; left ``P = Q Lᵀ`` gives ``Q = P L⁻ᵀ``."""
    return inverse @ p if side == "right" else p @ inverse.T


def orthonormality_drift(p: torch.Tensor, side: str) -> torch.Tensor:
    """``‖P Pᵀ − I‖_F`` (right) / ``‖PᵀP − I‖_F`` (left), a 0-d tensor."""
    return gram_and_drift(p, side)[1]


def gram_and_drift(p: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E, ‖E‖_F)`` with ``E = P Pᵀ − I`` (right) / ``PᵀP − I`` (left): the drift check's Gram
    matrix, which :func:`polar_step` reuses."""
    gram = p @ p.T if side == "right" else p.T @ p
    gram.diagonal().sub_(1.0)
    return gram, torch.linalg.matrix_norm(gram)


def polar_step(p: torch.Tensor, deviation: torch.Tensor, side: str) -> torch.Tensor:
    """One Newton–Schulz step toward the nearest orthonormal matrix (the polar factor of P):
    ``P ← (I − E/2) P`` with ``E = P Pᵀ − I`` (right; ``P (I − E/2)``, ``E = PᵀP − I``, left).

    Each singular value s of P (s² = 1 + e) becomes s(1 − e/2), so e becomes
    ``(1 + e)(1 − e/2)² − 1 = −(3/4)e² + e³/4``: with ``‖E‖_F = δ`` the new drift is at most
    ``(3/4)δ² + δ³/4`` (up to rounding). One r x r x d GEMM with the drift check's own ``E``,
    instead of a QR; and unlike QR it moves P the least (the polar factor is the nearest
    orthonormal matrix).
    """
    half = deviation * 0.5
    return p - (half @ p if side == "right" else p @ half)


class OnlinePCAProjector(Projector):
    """Initialise once (SVD or random), then one Adam step of online PCA per refresh."""

    name = "online_pca"
    orthonormal = True  # up to pca_ortho_tol
    option_defaults: dict[str, Any] = {
        "pca_init": "svd",
        "pca_lr": 5e-3,
        "pca_betas": (0.9, 0.999),
        "pca_eps": 1e-8,
        "pca_qr_every": 10,
        "pca_ortho_tol": 1e-3,
    }
    sharded_refresh_options: dict[str, Any] = {"pca_init": "randomized"}
    refresh_plain_keys = ("proj_step", "proj_lr0", "proj_orthonormal")

    @classmethod
    def validate_options(cls, group: dict[str, Any]) -> None:
        check_choice("pca_init", group["pca_init"], PCA_INITS)
        check_nonnegative("pca_lr", group["pca_lr"])
        check_betas(group["pca_betas"], name="pca_betas")
        check_nonnegative("pca_eps", group["pca_eps"])
        check_int("pca_qr_every", group["pca_qr_every"], 0)  # 0 disables the periodic QR
        check_positive("pca_ortho_tol", group["pca_ortho_tol"], allow_none=True)

    def refresh_state_spec(
        self, shape2d: tuple[int, int], dtype: torch.dtype
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The basis and the two Adam moments of its own optimizer, all shaped like the basis."""
        basis = super().refresh_state_spec(shape2d, dtype)["proj_basis"]
        return {"proj_basis": basis, "proj_exp_avg": basis, "proj_exp_avg_sq": basis}

    # ---------------------------------------------------------------- lifecycle
    def initial_basis(self, state: dict[str, Any], grad: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        """The first basis from ``grad`` (or, with ``ctx``, from this rank's rows of G)."""
        generator = torch.Generator(device=grad.device)
        generator.manual_seed(int(state["proj_seed"]))
        init = self.options["pca_init"]
        if init == "svd" and ctx is None:  # the top-r singular vectors, from the Gram matrix (svd.py)
            return gram_top_basis(grad, self.rank, self.side)
        if init != "random":  # "randomized", and "svd" under FSDP2: the seeded sketch, no all-gather
            return sketch_basis(grad, self.rank, self.side, None, INIT_SKETCH["oversample"],
                                INIT_SKETCH["power_iters"], generator, ctx)
        m, n = ctx.global_shape if ctx is not None else grad.shape
        d = n if self.side == "right" else m
        draw = torch.randn(d, self.rank, generator=generator, device=grad.device, dtype=grad.dtype)
        return orthonormalize(draw.T if self.side == "right" else draw, self.side)

    def refresh(self, state: dict[str, Any], grad: torch.Tensor, step: int, group: dict[str, Any]) -> bool:
        if self.lacks_subspace(state):  # the first basis (again, after a provisional one: guarded_basis)
            basis, counted = guarded_basis(state, grad, lambda: self.initial_basis(state, grad),
                                           keep_on_zero=self.has_basis(state))
            if basis is None:
                return False
            self.start(state, basis, group, counted)
            return counted
        return self.pca_step(state, grad, group)  # a non-finite grad is caught by its drift check

    def start(self, state: dict[str, Any], basis: torch.Tensor, group: dict[str, Any], counted: bool = True) -> None:
        state["proj_basis"] = basis
        state["proj_exp_avg"] = torch.zeros_like(basis)
        state["proj_exp_avg_sq"] = torch.zeros_like(basis)
        state["proj_step"] = 0
        state["proj_lr0"] = float(group.get("initial_lr", group["lr"]))
        state["proj_refreshes"] += int(counted)
        state["proj_orthonormal"] = True  # Gram eigenvectors, a sketch's SVD or a QR'd draw

    def refresh_sharded(self, state: dict[str, Any], grad_local: torch.Tensor, step: int,
                        group: dict[str, Any], ctx: Any) -> bool:
        """FSDP2: online PCA from the row shards ``G_i`` of G, with no all-gather.

        The loss gradient needs only sums over the rows of Â = G / ‖G‖_F:

        * right side (P r x n): ``C = Σ_i B_iᵀ G_i`` and ``K = Σ_i B_iᵀ B_i`` with
          ``B_i = G_i Pᵀ``, and ``‖G‖²`` - one all-reduce of r x (n + r) + 1;
        * left side (P m x r, the right side for Gᵀ): ``B' = Σ_i G_iᵀ P_i`` (n x r) and
          ``‖G‖²`` are all-reduced, then the rows ``G_i B'`` of ``C'ᵀ`` are gathered (m x r).

        The first basis is :func:`lrgrad.projectors.svd.sketch_basis` (``pca_init="svd"`` and
        ``"randomized"``: the seeded sketch, n x k all-reduces) or the seeded random draw.
        """
        if self.lacks_subspace(state):
            basis, counted = guarded_sharded_basis(state, grad_local, ctx,
                                                   lambda: self.initial_basis(state, grad_local, ctx),
                                                   keep_on_zero=self.has_basis(state))
            if basis is None:
                return False
            self.start(state, basis, group, counted)
            return counted
        p = state["proj_basis"]
        g = grad_local.to(p.dtype)
        r = self.rank
        orthonormal = bool(state.get("proj_orthonormal", False))
        if self.side == "right":
            b = g @ p.T  # m_i x r: also this rank's rows of this step's R (ShardedProjector.down takes them)
            self.share_down(b)
            sums = torch.cat([(b.T @ g).reshape(-1), (b.T @ b).reshape(-1), g.square().sum().reshape(1)])
            ctx.all_reduce(sums)
            n = g.shape[1]
            norm_sq = sums[-1].clamp_min(torch.finfo(p.dtype).tiny)
            c, k = sums[:r * n].view(r, n) / norm_sq, sums[r * n:-1].view(r, r) / norm_sq
            return self.adam_step(state, pca_grad_from_sums(p, c, k, orthonormal), group)
        rows = p[ctx.row_offset:ctx.row_stop]  # this rank's rows of P (m_i x r)
        sums = torch.cat([(g.T @ rows).reshape(-1), g.square().sum().reshape(1)])
        ctx.all_reduce(sums)
        norm = sums[-1].clamp_min(torch.finfo(p.dtype).tiny).sqrt()
        self.share_down(sums[:-1].view(g.shape[1], r).T.contiguous())  # GᵀP summed = Rᵀ: this step's R
        b = sums[:-1].view(g.shape[1], r) / norm  # B' = ÂᵀP (n x r)
        c_t = ctx.all_gather_rows((g / norm) @ b)  # C'ᵀ = Â B' (m x r)
        return self.adam_step(state, pca_grad_from_sums(p.T, c_t.T, b.T @ b, orthonormal).T, group)

    # ---------------------------------------------------------------- the shared projection
    def share_down(self, low: torch.Tensor) -> None:
        """Keep ``down(G)`` with the basis the PCA step started from (its ``G Pᵀ`` product) for this
        step's :meth:`down`: one m x n x r GEMM instead of two. The projector object lives for one
        param's step (the optimizer builds one per param per step), so it is never stale."""
        self.__dict__["_shared_down"] = low

    def take_shared_down(self, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The low-rank gradient the refresh already computed (once; ``None`` when there is none)."""
        low = self.__dict__.pop("_shared_down", None)
        return low if low is not None and tuple(low.shape) == tuple(shape) else None

    def down(self, state: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
        """``R_t = down(G_t)`` with the basis ``P_t`` the step's PCA update started from (shared with
        it); the update goes back through ``P_{t+1}``, the basis in the state. Without a PCA step
        this step (the first, SVD-initialised one), the plain projection with the state's basis."""
        m, n = grad.shape
        low = self.take_shared_down((m, self.rank) if self.side == "right" else (self.rank, n))
        return low if low is not None else super().down(state, grad)

    def pca_step(self, state: dict[str, Any], grad: torch.Tensor, group: dict[str, Any]) -> bool:
        """One Adam step on L(P) from the parameter's gradient ``grad``."""
        p = state["proj_basis"]
        a = grad.to(p.dtype)
        # Â = G / ‖G‖_F enters only through two small products: scale those, not an m x n copy
        scale = torch.linalg.vector_norm(a).clamp_min(torch.finfo(a.dtype).tiny).reciprocal()
        orthonormal = bool(state.get("proj_orthonormal", False))
        if self.side == "right":
            projected = a @ p.T  # G P_tᵀ: the loss gradient's B, and this step's R
            loss_grad = pca_grad_from_projection(a, projected, scale, p, orthonormal)
            self.share_down(projected)
        else:  # the right side of Gᵀ: Gᵀ P_t = Rᵀ
            projected = a.T @ p
            loss_grad = pca_grad_from_projection(a.T, projected, scale, p.T, orthonormal).T
            self.share_down(projected.T.contiguous())
        if self.deferred is not None and group["moment_policy"] == "keep":
            # the rest is small r x d work: run it for the whole group at once (finish_deferred). Only
            # with "keep": carrying moments needs the new basis before the next param's projection.
            self.deferred.append((self, state, loss_grad, group))
            return True
        return self.adam_step(state, loss_grad, group)

    def adam_step(self, state: dict[str, Any], g: torch.Tensor, group: dict[str, Any]) -> bool:
        """One Adam step on P with the loss gradient ``g``; assigns a new ``proj_basis``
        (the old one is never written). :meth:`finish_deferred` is the same step for many params."""
        new, exp_avg, exp_avg_sq, t = self.adam_start(state)
        adam_step_(new, g, exp_avg, exp_avg_sq, t, self.pca_lr(state, group), *self.options["pca_betas"],
                   self.options["pca_eps"])
        deviation, drift_t = gram_and_drift(new, self.side)
        return self.adam_finish(state, new, exp_avg, exp_avg_sq, t, deviation, float(drift_t))  # the one sync

    def pca_lr(self, state: dict[str, Any], group: dict[str, Any]) -> float:
        """P's learning rate this step: ``pca_lr · lr_t / lr_0`` (the main schedule)."""
        lr0, lr_t = state["proj_lr0"], float(group["lr"])
        ratio = lr_t / lr0 if lr0 > 0 else (1.0 if lr_t > 0 else 0.0)
        return self.options["pca_lr"] * ratio

    @staticmethod
    def adam_start(state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """New tensors for P and its moments (a skipped step restores the state's old ones) and P's step."""
        return (state["proj_basis"].clone(), state["proj_exp_avg"].clone(), state["proj_exp_avg_sq"].clone(),
                state["proj_step"] + 1)

    def adam_finish(self, state: dict[str, Any], new: torch.Tensor, exp_avg: torch.Tensor,
                    exp_avg_sq: torch.Tensor, t: int, deviation: torch.Tensor, drift: float,
                    qr: Callable[[], torch.Tensor] | None = None) -> bool:
        """After the Adam step on P: the orthonormality guard (``deviation`` = the Gram matrix of
        ``new`` minus I, ``drift`` its norm) and the state update. ``qr``: the QR of ``new`` when one
        was already computed (the batched Cholesky QR of :meth:`finish_deferred`)."""
        if drift != drift or drift == float("inf"):  # non-finite: keep the old basis and its Adam state
            state["proj_failures"] += 1
            return False
        orthonormal = False  # whether P leaves this step orthonormal to rounding (the next step's M = I)
        action = self.guard_action(t, drift)
        if action == "qr":
            new, orthonormal = (qr() if qr is not None else orthonormalize(new, self.side, deviation, drift)), True
        elif action == "polar":
            new = polar_step(new, deviation, self.side)
        state["proj_orthonormal"] = orthonormal
        state["proj_basis"] = new
        state["proj_exp_avg"], state["proj_exp_avg_sq"] = exp_avg, exp_avg_sq
        state["proj_step"] = t
        state["proj_refreshes"] += 1
        return True

    def guard_action(self, t: int, drift: float) -> str:
        """``"qr"`` (every ``pca_qr_every`` steps, or a drift too large for one polar step), ``"polar"``
        (a drift above ``pca_ortho_tol`` that one polar step brings within it, with half of tol left
        for rounding: :func:`polar_step`'s bound) or ``"none"``."""
        every, tol = self.options["pca_qr_every"], self.options["pca_ortho_tol"]
        if every > 0 and t % every == 0:
            return "qr"
        if tol is not None and drift > tol:
            return "polar" if 0.75 * drift**2 + 0.25 * drift**3 <= tol / 2 else "qr"
        return "none"

    @classmethod
    def finish_deferred(cls, items: list) -> None:
        """The Adam steps on P that :meth:`pca_step` deferred during one optimizer step, for all the
        group's params at once: one multi-tensor fused Adam call per (lr, betas, eps), then per
        (side, shape, dtype, device) one batched Gram matrix, one drift norm per param with one sync,
        and one batched Cholesky QR for the params that need it. Each param ends as
        :meth:`adam_step` leaves it (equal up to the rounding of batched vs single GEMMs; tested)."""
        if len(items) == 1:
            projector, state, g, group = items[0]
            projector.adam_step(state, g, group)
            return
        started = [projector.adam_start(state) for projector, state, _, _ in items]
        by_options: dict[tuple, list[int]] = {}
        for i, (projector, state, _, group) in enumerate(items):
            key = (projector.pca_lr(state, group), *projector.options["pca_betas"], projector.options["pca_eps"],
                   started[i][0].device)
            by_options.setdefault(key, []).append(i)
        for (lr, beta1, beta2, eps, _), index in by_options.items():
            news, exp_avgs, exp_avg_sqs, steps = ([started[i][k] for i in index] for k in range(4))
            adam_steps_(news, exp_avgs, exp_avg_sqs, [items[i][2] for i in index], steps, lr, beta1, beta2, eps)
        batches: dict[tuple, list[int]] = {}
        for i, (projector, _, _, _) in enumerate(items):
            new = started[i][0]
            batches.setdefault((projector.side, tuple(new.shape), new.dtype, new.device), []).append(i)
        for (side, _, _, _), index in batches.items():
            stacked = torch.stack([started[i][0] for i in index])
            deviations = stacked @ stacked.mT if side == "right" else stacked.mT @ stacked
            deviations.diagonal(dim1=-2, dim2=-1).sub_(1.0)
            drifts = torch.linalg.matrix_norm(deviations).tolist()  # the one sync of the batch
            qr_of = batched_cholesky_qr(
                stacked, deviations, side,
                [k for k, i in enumerate(index)
                 if drifts[k] == drifts[k] and items[i][0].guard_action(started[i][3], drifts[k]) == "qr"
                 and drifts[k] < CHOLESKY_QR_MAX_DRIFT])
            for k, i in enumerate(index):
                projector, state, _, _ = items[i]
                new, exp_avg, exp_avg_sq, t = started[i]
                projector.adam_finish(state, new, exp_avg, exp_avg_sq, t, deviations[k], drifts[k],
                                      qr=qr_of.get(k))


def batched_cholesky_qr(stacked: torch.Tensor, deviations: torch.Tensor, side: str,
                        which: list[int]) -> dict[int, Callable[[], torch.Tensor]]:
    """:func:`orthonormalize`'s Cholesky QR for the params ``which`` of a stack (B x r x d right,
    B x d x r left) with their drift check's ``deviations`` (B x r x r): one batched Cholesky and one
    batched triangular inverse. Returns, per index, a function giving that param's own Q (one GEMM
    into a tensor of its own, not a view of a shared batch). A factorization that fails (not positive
    definite to rounding) is left out, so its param takes :func:`orthonormalize`'s own path."""
    if not which:
        return {}
    inverse, info = cholesky_factor_inverse(deviations[which])
    return {k: (lambda row=row, k=k: apply_factor_inverse(inverse[row], stacked[k], side))
            for row, (k, ok) in enumerate(zip(which, info.tolist())) if ok == 0}


def adam_step_(p: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
               lr: float, beta1: float, beta2: float, eps: float) -> None:
    """Adam on P in place, torch's arithmetic (eps outside the bias-corrected root): one
    fused pass where torch has it for the tensors, else the op-by-op reference (``lrgrad.kernels.adamw_step_``)."""
    adam_steps_([p], [exp_avg], [exp_avg_sq], [g], [step], lr, beta1, beta2, eps)


def adam_steps_(ps: list[torch.Tensor], exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                gs: list[torch.Tensor], steps: list[int], lr: float, beta1: float, beta2: float, eps: float) -> None:
    """:func:`adam_step_` for several P on one device with the same hyperparameters: one multi-tensor
    fused pass where the kernel can step them all, else the op-by-op reference
    (``lrgrad.kernels.adamw_step_`` chooses)."""
    gs = [g.contiguous() for g in gs]  # the left side's loss gradient is a transposed view; the kernel walks memory
    kernels.adamw_step_(ps, gs, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2, weight_decay=0.0,
                        eps=eps)


def adam_step_reference_(p: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                         step: int, lr: float, beta1: float, beta2: float, eps: float) -> None:
    """:func:`adam_step_` op by op (the reference of its test)."""
    kernels.adamw_step_reference_([p], [g], [exp_avg], [exp_avg_sq], [step], lr=lr, beta1=beta1, beta2=beta2,
                                  weight_decay=0.0, eps=eps)
