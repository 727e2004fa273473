"""GaLore's projector: the top-r singular subspace of the gradient.

"GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
Zhao et al. 2024, arXiv:2403.03507.

``svd="exact"``: ``torch.linalg.svd`` in fp32 (fp64 for fp64 params).
``svd="randomized"``: a range finder warm-started from the previous basis
(plus ``svd_oversample`` seeded Gaussian columns) with ``svd_power_iters``
subspace iterations, then an exact SVD of the small (r+p) x n sketch (Halko,
Martinsson & Tropp 2011). Warm starting makes one power iteration enough once
the subspace has settled.

Robustness (GaLore issue #58): a non-finite gradient or a failed/non-finite SVD
keeps the previous basis and increments ``state["proj_failures"]``; NaN never
enters the basis.
"""

from __future__ import annotations

from typing import Any

import torch

from lrgrad._checks import check_choice, check_int
from lrgrad.dtensor import ShardContext
from lrgrad.projectors.base import Projector, guarded_basis

SVD_METHODS = ("exact", "randomized")


def top_singular_basis(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """Exact top-r singular vectors: Vh[:r] (right, r x n) or U[:, :r] (left, m x r)."""
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    # clone: a slice would keep the whole min(m, n)-sized SVD factor alive in the state
    basis = vh[:rank] if side == "right" else u[:, :rank]
    return basis.clone(memory_format=torch.contiguous_format)


def randomized_basis(
    grad: torch.Tensor,
    rank: int,
    side: str,
    previous: torch.Tensor | None,
    oversample: int,
    power_iters: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Randomized top-r singular vectors, warm-started from ``previous``."""
    # Work on the orientation where we want the *right* singular vectors of A.
    a = grad if side == "right" else grad.T  # (k x d), we want the top-r right vectors (r x d)
    d = a.shape[1]
    width = min(rank + oversample, d)
    omega = torch.randn(d, width, generator=generator, device=a.device, dtype=a.dtype)
    if previous is not None:
        warm = previous if side == "right" else previous.T  # r x d
        omega[:, :rank] = warm.T
    # Range of Aᵀ (d x width) via subspace iteration with re-orthonormalisation.
    y = a.T @ (a @ omega)
    q, _ = torch.linalg.qr(y)
    for _ in range(power_iters):
        q, _ = torch.linalg.qr(a.T @ (a @ q))
    # A ≈ (A Q) Qᵀ; the top right singular vectors of A are Q times those of A Q.
    _, _, vh_small = torch.linalg.svd(a @ q, full_matrices=False)
    right_vectors = (vh_small[:rank] @ q.T).contiguous()  # r x d
    return right_vectors if side == "right" else right_vectors.T.contiguous()


def canonical_signs(right_vectors: torch.Tensor) -> torch.Tensor:
    """Flip each row so its largest-magnitude entry is positive (a deterministic sign choice)."""
    idx = right_vectors.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(right_vectors.gather(1, idx))
    signs[signs == 0] = 1
    return right_vectors * signs


def gram_right_basis(grad_local: torch.Tensor, rank: int, ctx: ShardContext) -> torch.Tensor | None:
    """Top-``rank`` right singular vectors of the row-sharded ``G`` from ``Σ_i G_iᵀ G_i`` (r x n).

    One n x n all-reduce instead of an m x n all-gather. The eigen-decomposition
    runs in fp64: squaring the singular values squares the condition number.
    Returns ``None`` when the result is not finite.
    """
    gram = grad_local.T @ grad_local
    ctx.all_reduce(gram)
    _, vectors = torch.linalg.eigh(gram.to(torch.float64))
    basis = canonical_signs(vectors[:, -rank:].flip(1).T.contiguous())
    if not bool(torch.isfinite(basis).all()):
        return None
    return basis.to(grad_local.dtype).contiguous()


class SVDProjector(Projector):
    """Top-r SVD subspace, refreshed every ``update_proj_gap`` steps."""

    name = "svd"
    orthonormal = True
    option_defaults: dict[str, Any] = {"svd": "exact", "svd_oversample": 8, "svd_power_iters": 1}

    @classmethod
    def validate_options(cls, group: dict[str, Any]) -> None:
        check_choice("svd", group["svd"], SVD_METHODS)
        for key in ("svd_oversample", "svd_power_iters"):
            check_int(key, group[key], 0)

    def compute_basis(self, state: dict[str, Any], grad: torch.Tensor, step: int) -> torch.Tensor:
        if self.options["svd"] == "exact":
            return top_singular_basis(grad, self.rank, self.side)
        generator = torch.Generator(device=grad.device)
        # Seed from (param seed, step): identical on every DDP rank and after a resume.
        generator.manual_seed((state["proj_seed"] * 1_000_003 + step) % (2**63 - 1))
        return randomized_basis(
            grad, self.rank, self.side, state.get("proj_basis"),
            self.options["svd_oversample"], self.options["svd_power_iters"], generator,
        )

    def refresh(self, state: dict[str, Any], grad: torch.Tensor, step: int, group: dict[str, Any]) -> bool:
        basis = guarded_basis(state, grad, lambda: self.compute_basis(state, grad, step))
        if basis is None:
            return False
        state["proj_basis"] = basis
        state["proj_refreshes"] += 1
        return True

    def refresh_sharded(self, state: dict[str, Any], grad_local: torch.Tensor, step: int,
                        group: dict[str, Any], ctx: ShardContext) -> Any:
        """FSDP2, right side, exact SVD: the basis from the all-reduced n x n Gram matrix
        ``Σ_i G_iᵀ G_i`` (:func:`gram_right_basis`) instead of all-gathering the m x n G.
        Other cases return ``NotImplemented`` (the all-gather fallback)."""
        if self.side != "right" or self.options["svd"] != "exact":
            return NotImplemented
        if not ctx.all_finite(grad_local):
            state["proj_failures"] += 1
            return False
        try:
            basis = gram_right_basis(grad_local, self.rank, ctx)
        except (RuntimeError, torch.linalg.LinAlgError):  # same on every rank: the Gram is shared
            basis = None
        if basis is None:
            state["proj_failures"] += 1
            return False
        state["proj_basis"] = basis
        state["proj_refreshes"] += 1
        return True
