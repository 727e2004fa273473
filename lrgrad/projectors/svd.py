"""GaLore's projector: the top-r singular subspace of the gradient.

"GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
Zhao et al. 2024, arXiv:2403.03507.

``svd="warm"`` (the default): a subspace iteration (:func:`warm_top_basis`) warm-started from
the previous basis (the first refresh: from seeded Gaussian columns) that stops once the captured
energy is stationary to ``svd_warm_tol`` and falls back to ``"gram"`` when it is not within
``svd_warm_iters`` power steps - GEMMs with G, a thin QR and an eigh of (r + oversample) squared
instead of the Gram matrix's eigh, 1.3-1.7x cheaper a refresh on CPU, more on GPU.
``svd="gram"``: the top-r eigenvectors of the Gram matrix of the projected side
(``GᵀG``, n x n, for the right side; ``GGᵀ`` for the left), one GEMM + ``torch.linalg.eigh`` in
the compute dtype: the same subspace as the SVD wherever fp32 resolves it (σᵢ² above ~eps·σ₁²;
below that the directions carry under eps of G's energy), 2-7x faster on CPU than
``torch.linalg.svd`` and without cuSOLVER's slow gesvd on GPU. ``svd="exact"``:
``torch.linalg.svd`` in fp32 (fp64 for fp64 params), galore-torch's call, with LAPACK's signs:
a param group written for galore-torch (it carries ``rank``, ``update_proj_gap``, ``scale`` and
``proj_type``, and no ``svd``) gets it, so it reproduces galore-torch.
``svd="randomized"``: :func:`sketch_basis` - a seeded n x (r + ``svd_oversample``)
test matrix (warm-started from the previous basis on the right side), ``svd_power_iters
+ 1`` products with GᵀG (default 1: one pass), and the Nyström approximation's
eigenvectors (Halko, Martinsson & Tropp 2011, arXiv:0909.4061; Tropp et al. 2017,
arXiv:1706.05736). The same function refreshes FSDP2 row shards, where each product is
one n x k all-reduce: ``svd_sharded="sketch"`` (default) uses it even for
``svd="gram"``/``"exact"``; ``"gram"`` keeps the exact right-side basis from the n x n Gram
all-reduce, ``"gather"`` all-gathers G (see ``lrgrad.projectors.sharded``).

Robustness (GaLore issue #58): a non-finite gradient or a failed/non-finite SVD
keeps the previous basis and increments ``state["proj_failures"]``; NaN never
enters the basis.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lrgrad._checks import check_choice, check_float, check_int
from lrgrad.dtensor import LocalContext, ShardContext
from lrgrad.projectors.base import Projector, guarded_basis, guarded_sharded_basis

SVD_METHODS = ("warm", "gram", "exact", "randomized")
#: the keys of a galore-torch param group (its README's ``{"params", "rank", "update_proj_gap",
#: "scale", "proj_type"}``): such a group without an ``svd`` key refreshes with ``svd="exact"``
GALORE_TORCH_GROUP_KEYS = frozenset({"rank", "update_proj_gap", "scale", "proj_type"})
#: how an exact-SVD projector refreshes from FSDP2 row shards
SHARDED_SVD_METHODS = ("sketch", "gram", "gather")


def top_singular_basis(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """Exact top-r singular vectors: Vh[:r] (right, r x n) or U[:, :r] (left, m x r)."""
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    # clone: a slice would keep the whole min(m, n)-sized SVD factor alive in the state
    basis = vh[:rank] if side == "right" else u[:, :rank]
    return basis.clone(memory_format=torch.contiguous_format)


def gram_top_basis(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """Top-r singular vectors of ``grad`` from the eigenvectors of the projected side's Gram matrix:
    right: the top eigenvectors of ``GᵀG`` (r x n); left: of ``GGᵀ`` (m x r); signs canonical.

    The Gram matrix squares the spread of the spectrum, so in fp32 directions with σᵢ² < ~eps·σ₁²
    are resolved only up to rounding. They hold under eps of the gradient's energy; the test
    (tests/projectors/test_projector_svd_gram.py) checks the captured energy against
    ``torch.linalg.svd`` on steep and flat spectra. When the projected side is the larger one
    (``proj_type="reverse_std"`` etc.) the Gram matrix would be the larger square, so the exact
    SVD is used instead (signed canonically too: the refresh methods share one sign convention).
    """
    m, n = grad.shape
    if (n if side == "right" else m) > min(m, n):
        basis = top_singular_basis(grad, rank, side)
        return canonical_signs(basis) if side == "right" else canonical_signs(basis.T).T.contiguous()
    top = top_eigenvectors(grad.T @ grad if side == "right" else grad @ grad.T, rank)
    return (top if side == "right" else top.T).contiguous()


def top_eigenvectors(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """The eigenvectors of the ``rank`` largest eigenvalues of a symmetric ``gram`` (d x d) as rows
    (r x d), largest first, each signed by :func:`canonical_signs`."""
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    return canonical_signs(vectors[:, -rank:].flip(1).T)


def warm_top_basis(
    grad: torch.Tensor,
    rank: int,
    side: str,
    previous: torch.Tensor | None,
    oversample: int,
    tol: float,
    max_iters: int,
    generator: torch.Generator,
) -> torch.Tensor | None:
    """Top-r singular basis of ``grad`` by subspace iteration from ``previous`` (r x n right, m x r
    left; ``None``: a Gaussian start), or ``None`` when it has not converged within ``max_iters``
    power steps.

    With ``H`` the projected side (``G`` on the left, ``Gᵀ`` on the right; d rows): start from
    ``Q = orth([previous, Ω])``, Ω d x ``oversample`` Gaussian from ``generator`` (d x (r +
    oversample) without a previous basis); each power step is ``Q = orth(H (HᵀQ))`` and a
    Rayleigh–Ritz step on ``B = (HᵀQ)ᵀ(HᵀQ)`` (k x k, k = r + oversample), whose top-r
    eigenvalues sum to the energy ``E`` the Ritz vectors capture. ``E``
    only grows; once a step adds at most ``tol * E`` the top-r Ritz vectors ``Q S_r`` are returned
    (canonical signs). Gradients' spectra fall steeply (σ₁/σ_r ≈ 30-200 on LLaMA blocks), so two
    or three steps reach the exact basis's energy to ~1e-4 even from an unrelated start; a flat
    spectrum converges slowly and gets ``None`` (the caller's exact fallback) instead of a poor
    basis. Each power step costs two GEMMs with G, a d x k QR and a k x k eigh.
    """
    h = grad if side == "left" else grad.T
    d = h.shape[0]
    width = min(rank + oversample, d)
    q = torch.empty(d, width, device=h.device, dtype=h.dtype)
    kept = 0
    if previous is not None:
        q[:, :rank] = (previous if side == "left" else previous.T).to(h.dtype)
        kept = rank
    q[:, kept:] = torch.randn(d, width - kept, generator=generator, device=h.device, dtype=h.dtype)
    w = h.T @ orthonormal_columns(q)
    last = None
    for _ in range(max_iters):
        q = orthonormal_columns(h @ w)
        w = h.T @ q
        theta, vectors = torch.linalg.eigh(w.T @ w)  # ascending
        energy = float(theta[-rank:].sum())
        if last is not None and energy - last <= tol * energy:
            top = canonical_signs((q @ vectors[:, -rank:].flip(1)).T)  # r x d
            return (top if side == "right" else top.T).contiguous()
        last = energy
    return None


def orthonormal_columns(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``a``'s (QR with ``diag(R) >= 0``: a deterministic sign)."""
    q, r = torch.linalg.qr(a)
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return q * signs


def nystrom_eigenvectors(q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eigenvectors (d x k, by decreasing eigenvalue) of the Nyström approximation
    ``Y (QᵀY)⁻¹ Yᵀ`` of a PSD matrix ``A`` from ``Y = A Q`` (``Q`` orthonormal, d x k).

    "Fixed-Rank Approximation of a Positive-Semidefinite Matrix from Streaming Data",
    Tropp, Yurtsever, Udell & Cevher 2017, arXiv:1706.05736, Alg. 3 (with its small
    shift ``ν``, so a rank-deficient ``A`` still has a Cholesky factor). One product
    ``A Q`` gives a better basis than orthonormalizing ``Y`` (a Rayleigh–Ritz step would
    need a second product), which is what makes a one-pass sharded refresh good enough.
    """
    tiny = torch.finfo(y.dtype)
    shift = (tiny.eps * y.shape[0] ** 0.5 * torch.linalg.matrix_norm(y)).clamp_min(tiny.tiny ** 0.5)
    y_shift = y + shift * q
    b = q.T @ y_shift
    chol = torch.linalg.cholesky((b + b.T) / 2)  # lower: B = C Cᵀ
    f = torch.linalg.solve_triangular(chol, y_shift.T, upper=False).T  # Y C⁻ᵀ
    u, _, _ = torch.linalg.svd(f, full_matrices=False)
    return u


def sketch_basis(
    rows: torch.Tensor,
    rank: int,
    side: str,
    previous: torch.Tensor | None,
    oversample: int,
    power_iters: int,
    generator: torch.Generator,
    ctx: Any = None,
) -> torch.Tensor:
    """Randomized top-``rank`` singular basis of ``G`` (m x n) from its rows ``rows = G[a:b]``.

    One algorithm for one process (``ctx=None``: all rows, no collectives) and for
    FSDP2 row shards (``ctx`` a :class:`lrgrad.dtensor.ShardContext`; every rank gets
    the same basis). Only the n (column) space is ever communicated:

    1. ``Q = orth(Ω)``, Ω n x k Gaussian from ``generator`` (k = rank + oversample), whose
       first ``rank`` columns are the previous basis on the right side (warm start);
    2. ``power_iters + 1`` products ``Y = GᵀG Q = Σ_i G_iᵀ(G_i Q)``: one n x k all-reduce
       each (re-orthonormalizing ``Q = orth(Y)`` between them);
    3. the top eigenvectors ``V`` of the Nyström approximation from ``(Q, Y)``
       (:func:`nystrom_eigenvectors`, local on the replicated n x k pieces).

    Right side: ``Vᵀ`` (r x n). Left side: ``U = orth(G V)`` - ``G_i V`` is local, and
    the m x r result is gathered by rows (the basis is replicated state). Both sides come
    largest first with :func:`canonical_signs`, as the Gram and warm refreshes do, so under
    ``moment_policy="keep"`` (moments carried by position and sign) the methods can be
    mixed (tests/projectors/test_projector_svd_order.py). The left side
    is always cold-started: its previous basis lives in the m space, and moving it to
    the n space would cost another n x k collective.
    """
    ctx = ctx if ctx is not None else LocalContext(rows.shape[0])
    n = rows.shape[1]
    width = min(rank + oversample, n)
    omega = torch.randn(n, width, generator=generator, device=rows.device, dtype=rows.dtype)
    if previous is not None and side == "right":
        omega[:, :rank] = previous.T.to(rows.dtype)
    q = orthonormal_columns(omega)
    for it in range(power_iters + 1):
        y = ctx.all_reduce(rows.T @ (rows @ q))
        if it < power_iters:
            q = orthonormal_columns(y)
    right = canonical_signs(nystrom_eigenvectors(q, y)[:, :rank].T)  # r x n
    if side == "right":
        return right.contiguous()
    left = orthonormal_columns(ctx.all_gather_rows(rows @ right.T))  # m x r, replicated: every rank signs alike
    return canonical_signs(left.T).T.contiguous()


def randomized_basis(grad: torch.Tensor, rank: int, side: str, previous: torch.Tensor | None, oversample: int,
                     power_iters: int, generator: torch.Generator) -> torch.Tensor:
    """Randomized top-r singular vectors of a whole ``grad`` (:func:`sketch_basis` in one process)."""
    return sketch_basis(grad, rank, side, previous, oversample, power_iters, generator)


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
    basis = top_eigenvectors(gram.to(torch.float64), rank)
    if not bool(torch.isfinite(basis).all()):
        return None
    return basis.to(grad_local.dtype).contiguous()


class SVDProjector(Projector):
    """Top-r SVD subspace, refreshed every ``update_proj_gap`` steps."""

    name = "svd"
    orthonormal = True
    option_defaults: dict[str, Any] = {"svd": "warm", "svd_oversample": 8, "svd_power_iters": 0,
                                       "svd_warm_tol": 1e-3, "svd_warm_iters": 3, "svd_sharded": "sketch"}
    sharded_refresh_options: dict[str, Any] = {"svd": "randomized"}

    @classmethod
    def compat_options(cls, group: Mapping[str, Any]) -> dict[str, Any]:
        """A group with galore-torch's four keys refreshes with galore-torch's exact ``torch.linalg.svd``
        (README, "The one-liner"); every other group keeps the faster ``svd="warm"``."""
        return {"svd": "exact"} if GALORE_TORCH_GROUP_KEYS <= group.keys() else {}

    @classmethod
    def validate_options(cls, group: dict[str, Any]) -> None:
        check_choice("svd", group["svd"], SVD_METHODS)
        check_choice("svd_sharded", group["svd_sharded"], SHARDED_SVD_METHODS)
        for key in ("svd_oversample", "svd_power_iters"):
            check_int(key, group[key], 0)
        check_int("svd_warm_iters", group["svd_warm_iters"], 2)  # two: the stop compares two energies
        check_float("svd_warm_tol", group["svd_warm_tol"], minimum=0.0, maximum=1.0)

    def sketch(self, state: dict[str, Any], rows: torch.Tensor, step: int, ctx: Any = None) -> torch.Tensor:
        """:func:`sketch_basis` seeded from (param seed, step): identical on every rank and after a resume."""
        generator = self.refresh_generator(state, step, rows.device)
        return sketch_basis(rows, self.rank, self.side, self.previous_basis(state), self.options["svd_oversample"],
                            self.options["svd_power_iters"], generator, ctx)

    def compute_basis(self, state: dict[str, Any], grad: torch.Tensor, step: int) -> torch.Tensor:
        if self.options["svd"] == "exact":
            return top_singular_basis(grad, self.rank, self.side)
        if self.options["svd"] == "randomized":
            return self.sketch(state, grad, step)
        if self.options["svd"] == "warm":
            options = self.options
            basis = warm_top_basis(grad, self.rank, self.side, self.previous_basis(state), options["svd_oversample"],
                                   options["svd_warm_tol"], options["svd_warm_iters"],
                                   self.refresh_generator(state, step, grad.device))
            if basis is not None:
                return basis  # else not converged (a flat spectrum): the exact Gram eigenvectors
        return gram_top_basis(grad, self.rank, self.side)

    def store_basis(self, state: dict[str, Any], basis: torch.Tensor, step: int, counted: bool = True) -> None:
        """Put a freshly computed dense basis in place (a new tensor, never in place); ``counted=False``
        for a provisional one (:func:`lrgrad.projectors.base.guarded_basis`)."""
        state["proj_basis"] = basis
        state["proj_refreshes"] += int(counted)

    def refresh(self, state: dict[str, Any], grad: torch.Tensor, step: int, group: dict[str, Any]) -> bool:
        basis, counted = guarded_basis(state, grad, lambda: self.compute_basis(state, grad, step),
                                       keep_on_zero=self.has_basis(state))
        if basis is None:
            return False
        self.store_basis(state, basis, step, counted)
        return counted  # a provisional basis is no subspace change

    def sharded_method(self) -> str:
        """``"sketch"``, ``"gram"`` or ``"gather"``: how this projector refreshes from row shards."""
        return "sketch" if self.options["svd"] == "randomized" else self.options["svd_sharded"]

    def refresh_sharded(self, state: dict[str, Any], grad_local: torch.Tensor, step: int,
                        group: dict[str, Any], ctx: ShardContext) -> Any:
        """FSDP2: the basis from this rank's rows of G, without all-gathering G.

        * ``"sketch"`` (default; always for ``svd="randomized"``): :func:`sketch_basis`, the
          same seeded randomized SVD a single process runs with ``svd="randomized"``:
          ``svd_power_iters + 1`` all-reduces of n x k (+ an m x r row gather on the left).
        * ``"gram"`` (exact, right side): the all-reduced n x n Gram matrix (:func:`gram_right_basis`).
        * ``"gather"``, and ``"gram"`` on the left side: ``NotImplemented`` - the all-gather fallback.
        """
        method = self.sharded_method()
        if method == "gather" or (method == "gram" and self.side != "right"):
            return NotImplemented
        basis, counted = guarded_sharded_basis(
            state, grad_local, ctx,
            lambda: gram_right_basis(grad_local, self.rank, ctx) if method == "gram"
            else self.sketch(state, grad_local, step, ctx), keep_on_zero=self.has_basis(state))
        if basis is None:
            return False
        self.store_basis(state, basis, step, counted)
        return counted
