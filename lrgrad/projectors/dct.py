"""The DCT projector: r columns of one shared orthonormal DCT-II basis, chosen per layer.

"SVD-Free Low-Rank Adaptive Gradient Optimization for Large Language Models",
arXiv:2505.17967.

For the projected dimension ``d`` (``n`` on the right side, ``m`` on the left) the
orthonormal DCT-II matrix

    Q[j, k] = sqrt(2/d) · c_k · cos(π (2j + 1) k / (2d)),   c_0 = 1/sqrt(2), c_k = 1 otherwise

has the basis vectors as columns (``QᵀQ = I``). It is built once per
``(d, device, dtype)`` and cached at module level: every layer with that
projected size shares it, and it is *not* optimizer state (``dct_cached_bytes()``
reports it; ``LowRankOptimizer.shared_state_bytes`` adds it to the accounting).

A refresh scores every basis vector by the norm of its coordinates in the gradient
(right: the column norms of ``S = G Q``; left: the row norms of ``S = Qᵀ G``)
and keeps the top-r. The per-layer state is the r selected indices, **sorted**,
as int32 (``state["proj_indices"]``) - no float matrix per layer. The basis is
``P = Q[:, idx]ᵀ`` (right, r x n) or ``P = Q[:, idx]`` (left, m x r), gathered on use.

``S`` costs a d x d matmul per row, or O(d log d) with an FFT (Makhoul's
reordering: DCT-II of x = Re(e^{-iπk/2d} · FFT(v)_k) with v the even samples
followed by the odd ones reversed). ``dct_scores="auto"`` takes the FFT for large
``d`` (where it is faster), the matmul otherwise; both compute ``G Q`` (not
``G Qᵀ``, which the reference's FFT path silently computes).

FSDP2 (rows of G sharded, see ``lrgrad.projectors.sharded``): on the right side a
score is a sum over rows, ``Σ_i ‖G_i q_k‖²``: one all-reduce of an n-vector, exact.
On the left side ``q_kᵀ G`` mixes rows across shards, so exact scores need O(mn)
traffic - as much as all-gathering G. The default (``dct_sharded="sketch"``) scores
the rank-k approximation ``G V Vᵀ`` instead (:func:`sketched_left_scores`: V an
orthonormal basis of the seeded randomized range ``GᵀG Ω``, k = r + ``dct_oversample``):
one n x k all-reduce (``dct_power_iters`` more) and an m x k gather of ``G V``. On real
and power-law gradients its selection captures >= 99% of the exact top-r score
energy (tests/projectors/test_projector_dct_sketch.py, docs/distributed.md).
``dct_scores="sketch"`` runs the same algorithm in one process (on the left side; the
right side is exact either way), so a sharded run can be held equal to a one-process
one; ``dct_sharded="gather"`` keeps exact left scores by all-gathering G at a refresh.

Moments across a reselection: ``transition`` is the r x r selection matrix
``T[a, b] = [idx_old[a] == idx_new[b]]`` (``P_old P_newᵀ``), so with
``moment_policy="project"`` every surviving basis vector keeps its own moment
column (also when sorting moves it to another position) and new vectors start
from zero; ``T∘T = T``, so second moments are permuted exactly too. The
``DCTAdamW`` preset defaults to ``"project"``. With ``"keep"`` moments stay in
their *positions*, like GaLore's: sorted indices keep survivors aligned only
while no selected index before them changes.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lrgrad import kernels
from lrgrad._checks import check_choice, check_int
from lrgrad.dtensor import LocalContext
from lrgrad.projectors.base import Projector, finite_and_nonzero, refresh_goes_on
from lrgrad.projectors.svd import orthonormal_columns
from lrgrad.subspace import state_like

#: how scores are computed: exactly (matmul or FFT), or, on the left side, from the sketch
DCT_SCORES = ("auto", "matmul", "fft", "sketch")
#: how the left side is scored from FSDP2 row shards
SHARDED_DCT_METHODS = ("sketch", "gather")

# (d, device, dtype) -> Q, as the column view of the contiguous Qᵀ in _ROWS (one storage). Shared by every
# layer and every optimizer; never saved.
_BASES: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}
# (d, device, dtype) -> Qᵀ, contiguous: the basis vectors as rows, so a layer's r of them are gathered as r
# contiguous row copies (a column gather from Q strides through all d rows: ~3x slower on LLaMA-60M shapes)
_ROWS: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


def dct_basis_rows(d: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Qᵀ (d x d, contiguous; row k is the k-th DCT-II basis vector), cached per (d, device, dtype).

    Treat the result as read-only: it is shared, and :func:`dct_basis` is its transposed view.
    """
    device = torch.device(device)
    key = (int(d), str(device), dtype)
    rows = _ROWS.get(key)
    if rows is None:
        k = torch.arange(d, dtype=torch.float64).unsqueeze(1)
        j = torch.arange(d, dtype=torch.float64).unsqueeze(0)
        rows = torch.cos(math.pi * (2 * j + 1) * k / (2 * d)) * math.sqrt(2.0 / d)
        rows[0, :] *= math.sqrt(0.5)
        rows = rows.to(device=device, dtype=dtype).contiguous()
        _ROWS[key] = rows
        _BASES[key] = rows.T
    return rows


def dct_basis(d: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal DCT-II basis Q (d x d, basis vectors as columns), cached per (d, device, dtype):
    the transposed view of :func:`dct_basis_rows` (no second copy).

    Treat the result as read-only: it is shared.
    """
    key = (int(d), str(torch.device(device)), dtype)
    q = _BASES.get(key)
    if q is None:
        dct_basis_rows(d, device, dtype)
        q = _BASES[key]
    return q


def dct_cached_bytes(device: torch.device | str | None = None) -> int:
    """Bytes held by the cached DCT bases (on ``device``, or on every device)."""
    wanted = None if device is None else str(torch.device(device))
    return sum(q.numel() * q.element_size() for (_, dev, _), q in _BASES.items() if wanted in (None, dev))


def clear_dct_cache() -> None:
    """Drop every cached DCT basis (they are rebuilt on the next use)."""
    _BASES.clear()
    _ROWS.clear()


def dct_fft(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Orthonormal DCT-II of ``x`` along ``dim`` by one real FFT (Makhoul 1980).

    Along ``dim = -1`` this is ``x @ Q``; along ``dim = 0`` it is ``Qᵀ @ x``.
    """
    x = x.movedim(dim, -1)
    d = x.shape[-1]
    # v = (x_0, x_2, x_4, ..., x_5, x_3, x_1): evens ascending, then odds descending
    v = torch.cat([x[..., 0::2], x[..., 1::2].flip(-1)], dim=-1)
    half = torch.fft.rfft(v, dim=-1)  # k = 0 .. d//2
    # FFT of a real signal: V_{d-k} = conj(V_k) gives k = d//2+1 .. d-1
    rest = half[..., 1:d - d // 2].flip(-1).conj()
    spectrum = torch.cat([half, rest], dim=-1)
    k = torch.arange(d, device=x.device, dtype=x.dtype)
    angle = -math.pi * k / (2 * d)
    y = spectrum.real * torch.cos(angle) - spectrum.imag * torch.sin(angle)
    scale = torch.full((d,), math.sqrt(2.0 / d), device=x.device, dtype=x.dtype)
    scale[0] = math.sqrt(1.0 / d)
    return (y * scale).movedim(-1, dim).contiguous()


def dct_coefficients(grad: torch.Tensor, side: str, method: str = "auto") -> torch.Tensor:
    """``S = G Q`` (right) or ``S = Qᵀ G`` (left) by ``"matmul"`` or ``"fft"`` (``"auto"``: the faster)."""
    d = grad.shape[1] if side == "right" else grad.shape[0]
    if method == "auto":
        method = "fft" if d >= fft_threshold(grad.device) else "matmul"
    if method == "fft":
        return dct_fft(grad, dim=1 if side == "right" else 0)
    q = dct_basis(d, grad.device, grad.dtype)
    return grad @ q if side == "right" else q.T @ grad


def fft_threshold(device: torch.device) -> int:
    """Smallest d for which the FFT path is used by ``dct_scores="auto"``.

    Measured on CPU (experiments/bench/bench_projectors.py): the FFT loses at d = 512
    (its reorder/complex overheads), wins from d ≈ 1024 and by ~10x at 2048. A GPU
    matmul is fast enough that the FFT only pays off for larger d.
    """
    return 1024 if device.type == "cpu" else 2048


def sketched_left_scores(
    rows: torch.Tensor,
    width: int,
    power_iters: int,
    generator: torch.Generator,
    method: str = "auto",
    ctx: Any = None,
) -> torch.Tensor:
    """Left-side scores ``‖q_kᵀ G V‖²`` (k = 0..m-1) of ``G`` (m x n) from its rows ``rows = G[a:b]``.

    ``V`` (n x ``width``) is an orthonormal basis of the randomized range ``(GᵀG)^(p+1) Ω``
    (Ω Gaussian from ``generator``, p = ``power_iters``): ``G V Vᵀ`` is G's best rank-``width``
    part up to the sketch, so the scores are the exact ones minus the tail's. Only the n
    space crosses ranks: ``p + 1`` all-reduces of n x ``width``, then the rows ``G_i V``
    gathered (m x ``width``) and transformed locally. ``ctx=None``: one process, all rows;
    otherwise a :class:`lrgrad.dtensor.ShardContext` (every rank gets the same scores).
    With ``width >= n`` the scores are exact up to rounding.
    """
    ctx = ctx if ctx is not None else LocalContext(rows.shape[0])
    n = rows.shape[1]
    omega = torch.randn(n, min(width, n), generator=generator, device=rows.device, dtype=rows.dtype)
    v = orthonormal_columns(omega)
    for _ in range(power_iters + 1):
        v = orthonormal_columns(ctx.all_reduce(rows.T @ (rows @ v)))
    projected = ctx.all_gather_rows(rows @ v)  # G V, m x width
    return dct_coefficients(projected, "left", method).square().sum(dim=1)


def select_indices(scores: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` indices of ``scores``, sorted ascending, int32.

    Ties break toward the smaller index (stable sort on descending scores), so
    the choice is deterministic on every device and after a resume.
    """
    order = torch.sort(scores, descending=True, stable=True).indices[:rank]
    return torch.sort(order).values.to(torch.int32)


class DCTProjector(Projector):
    """Top-r DCT-II basis vectors by gradient energy; state = r sorted int32 indices."""

    name = "dct"
    orthonormal = True
    option_defaults: dict[str, Any] = {"dct_scores": "auto", "dct_sharded": "sketch", "dct_oversample": 8,
                                       "dct_power_iters": 0}
    sharded_refresh_options: dict[str, Any] = {"dct_scores": "sketch"}
    structural_state_keys = ("proj_dim",)

    @classmethod
    def validate_options(cls, group: dict[str, Any]) -> None:
        check_choice("dct_scores", group["dct_scores"], DCT_SCORES)
        check_choice("dct_sharded", group["dct_sharded"], SHARDED_DCT_METHODS)
        for key in ("dct_oversample", "dct_power_iters"):
            check_int(key, group[key], 0)

    def has_basis(self, state: dict[str, Any]) -> bool:
        return "proj_indices" in state

    def refresh(self, state: dict[str, Any], grad: torch.Tensor, step: int, group: dict[str, Any]) -> bool:
        # an all-zero gradient scores every DCT column alike: keep the previous ones, or on a first refresh
        # take provisional ones (guarded_basis's rule)
        finite, nonzero = finite_and_nonzero(grad)
        if not refresh_goes_on(state, finite, nonzero, keep_on_zero=self.has_basis(state)):
            return False
        if self.side == "left" and self.options["dct_scores"] == "sketch":
            return self._select(state, self._sketched_scores(state, grad, step), nonzero)
        coeffs = dct_coefficients(grad, self.side, self._exact_method())
        return self._select(state, coeffs.square().sum(dim=0 if self.side == "right" else 1), nonzero)

    def refresh_sharded(self, state: dict[str, Any], grad_local: torch.Tensor, step: int,
                        group: dict[str, Any], ctx: Any) -> bool:
        """FSDP2 (rows of G sharded). Right side: the score of basis vector k is
        ``Σ_i ‖G_i q_k‖²`` over the row shards, so one all-reduce of an n-vector replaces
        the m x n all-gather (exact). Left side: :func:`sketched_left_scores` (default), or
        ``NotImplemented`` with ``dct_sharded="gather"`` (the exact all-gather fallback)."""
        if self.side == "left" and self.options["dct_sharded"] == "gather":
            return NotImplemented
        finite, nonzero = ctx.finite_and_nonzero(grad_local)
        if not refresh_goes_on(state, finite, nonzero, keep_on_zero=self.has_basis(state)):
            return False
        if self.side == "left":
            return self._select(state, self._sketched_scores(state, grad_local, step, ctx), nonzero)
        coeffs = dct_coefficients(grad_local, "right", self._exact_method())
        return self._select(state, ctx.all_reduce(coeffs.square().sum(dim=0)), nonzero)

    def _exact_method(self) -> str:
        """The matmul/FFT choice for exact scores (``"sketch"`` scores the right side exactly)."""
        method = self.options["dct_scores"]
        return "auto" if method == "sketch" else method

    def _sketched_scores(self, state: dict[str, Any], rows: torch.Tensor, step: int, ctx: Any = None) -> torch.Tensor:
        """:func:`sketched_left_scores` seeded from (param seed, step): the same on every rank and after a resume."""
        return sketched_left_scores(rows, self.rank + self.options["dct_oversample"], self.options["dct_power_iters"],
                                    self.refresh_generator(state, step, rows.device), "auto", ctx)

    def refresh_state_spec(
        self, shape2d: tuple[int, int], dtype: torch.dtype
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """r int32 indices; the shared DCT matrix is counted once per size (``shared_buffers``)."""
        return {"proj_indices": ((self.rank,), torch.int32)}

    def _select(self, state: dict[str, Any], scores: torch.Tensor, counted: bool = True) -> bool:
        """The top-``rank`` columns by ``scores``; ``counted=False``: provisional (from a zero gradient)."""
        indices = select_indices(scores, self.rank)
        old = state.get("proj_indices")
        state["proj_refreshes"] += int(counted)
        if old is not None and torch.equal(old, indices.to(old.device)):
            return False  # same subspace, same order: nothing to carry
        state["proj_indices"] = indices  # a new tensor: a copy of the old state still has the old one
        return counted  # a provisional selection is no subspace change

    # ---------------------------------------------------------------- maps
    def _columns(self, state: dict[str, Any], like: torch.Tensor, d: int) -> torch.Tensor:
        """``Q[:, idx]`` (d x r) in ``like``'s device and dtype."""
        indices = state["proj_indices"]

        def gather() -> torch.Tensor:
            # r contiguous rows of Qᵀ (int32 indices are index_select's own), seen as Q's d x r columns
            rows = dct_basis_rows(d, like.device, like.dtype)
            return rows.index_select(0, indices.to(device=like.device)).T

        # keyed by the indices tensor itself (a refresh assigns a new one; the memo keeps it alive, so
        # its id cannot be reused while the memo lives)
        return self.memo((id(indices), indices, d, like.device, like.dtype), gather)

    def _dim(self, shape2d: tuple[int, ...]) -> int:
        return shape2d[1] if self.side == "right" else shape2d[0]

    def basis(self, state: dict[str, Any]) -> torch.Tensor:
        cols = self._columns(state, state_like(state), int(state["proj_dim"]))
        return cols.T if self.side == "right" else cols

    def basis_like(self, state: dict[str, Any], like: torch.Tensor) -> torch.Tensor:
        cols = self._columns(state, like, int(state["proj_dim"]))
        return cols.T if self.side == "right" else cols

    def down(self, state: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
        cols = self._columns(state, grad, self._dim(grad.shape))
        return grad @ cols if self.side == "right" else cols.T @ grad

    def up(self, state: dict[str, Any], update: torch.Tensor) -> torch.Tensor:
        cols = self._columns(state, update, int(state["proj_dim"]))
        return update @ cols.T if self.side == "right" else cols @ update

    def update_param_(
        self, state: dict[str, Any], param2d: torch.Tensor, update: torch.Tensor, alpha: float, decay: float
    ) -> None:
        cols = self._columns(state, update, self._dim(param2d.shape))
        basis = cols.T if self.side == "right" else cols
        kernels.lowrank_update_(param2d, update, basis, self.side, alpha=alpha, decay=decay)

    def transition(self, old_state: dict[str, Any], new_state: dict[str, Any]) -> torch.Tensor:
        """The selection matrix ``[idx_old[a] == idx_new[b]]`` (= ``P_old P_newᵀ`` exactly)."""
        old, new = old_state["proj_indices"], new_state["proj_indices"]
        like = state_like(new_state)
        t = (old.unsqueeze(1) == new.to(old.device).unsqueeze(0)).to(device=like.device, dtype=like.dtype)
        return t if self.side == "right" else t.T  # left: r_new x r_old

    def init_state(self, state: dict[str, Any], shape2d: tuple[int, int], seed: int) -> None:
        super().init_state(state, shape2d, seed)
        state["proj_dim"] = self._dim(shape2d)

    def shared_buffers(self, state: dict[str, Any]) -> dict[tuple, int]:
        """The shared basis this param uses: ``{(kind, d, device, dtype): bytes}`` (counted once per key)."""
        like = state_like(state)
        d = int(state["proj_dim"])
        return {("dct", d, str(like.device), like.dtype): d * d * like.element_size()}
