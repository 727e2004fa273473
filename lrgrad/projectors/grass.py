r"""Grass: a sparse projection that keeps r rows (or columns) of the gradient.

"Grass: Compute Efficient Low-Memory LLM Training with Structured Sparse Gradients",
Muhamed, Li, Woodruff, Diab & Smith 2024, arXiv:2406.17660.

Grass's projection is ``Pᵀ = ρ B``: ``B`` (r x d) selects r coordinates of the projected side
(one 1 per row, in column ``σ_j``) and ``ρ`` is an r x r diagonal scaling. In lrgrad's side
convention (``lrgrad.projectors.base``):

* ``"left"`` (P is m x r, ``P[σ_j, j] = ρ_j``): ``R = Pᵀ G`` is the r selected *rows* of G, row j
  scaled by ρ_j; ``up(U) = P U`` scatters row j of U, times ρ_j, into row σ_j (an r x n state);
* ``"right"`` (P is r x n, ``P[j, σ_j] = ρ_j``): the same with columns.

So ``down`` is a gather, ``up`` and the weight update are scatter-adds (``index_add_``): no GEMM
and no dense basis anywhere on the step's path. The per-parameter state is the r selected
indices (int32) and, for the sampled selections, the r scales ρ (one vector; ``ρ = 1`` is not
stored).

The selection (``grass_select``), from the squared norms ``s_i = ‖G_i‖²`` of the d coordinates
of the projected side (rows for left, columns for right), on steps 1, T+1, 2T+1, ...:

* ``"top"`` - the r coordinates of largest norm, ``ρ = 1`` (the paper's deterministic Top-r;
  P has orthonormal columns/rows and ``up(down(G))`` is the orthogonal projection of G);
* ``"norm"`` - r draws *with replacement* from the multinomial ``q_i = s_i / Σ s`` (the paper's
  Multinomial-Norm² sampling), ``ρ_j = 1 / sqrt(r q_{σ_j})``: then ``E[P Pᵀ] = I`` and
  ``E[up(down(G))] = G`` (unbiased), the variance-minimizing choice among such samplers;
* ``"uniform"`` - r uniform draws with replacement, ``ρ_j = sqrt(d / r)`` (Multinomial-Uniform).

A coordinate drawn twice appears twice in R (its two coordinates get their own moments) and
``up`` adds both back: ``P Pᵀ`` stays the sampled estimator. Draws come from a generator seeded
by (the param's seed, the step) (``Projector.refresh_generator``): the same on every FSDP2 rank
and after a resume. Indices are stored sorted (ties and duplicates in a fixed order), so the
gathers walk memory in order.

``default_scale``: ``sqrt(d/r)`` for ``"top"`` (an orthonormal selection, like every orthonormal
basis in lrgrad), 1 for the sampled selections (``ρ`` already gives ``up`` of a unit-RMS update
unit RMS in expectation, as Flora's N(0, 1/r) draws do).

FSDP2 (rows of G sharded over ranks): the scores are gather-free - right side: a column's
squared norm is a sum over rows, one all-reduce of an n-vector; left side: each rank scores its
own rows and the m scores are all-gathered (an m-vector, never G). Every rank then runs the same
selection (same scores, same seeded generator).
"""

from __future__ import annotations

from typing import Any

import torch

from lrgrad._checks import check_choice
from lrgrad.projectors.base import Projector, finite_and_nonzero, refresh_goes_on
from lrgrad.projectors.dct import select_indices
from lrgrad.subspace import state_like

#: how the r coordinates are chosen
GRASS_SELECTIONS = ("top", "norm", "uniform")


def grass_scores(grad: torch.Tensor, side: str) -> torch.Tensor:
    """Squared norms of the d coordinates of the projected side: rows (left) or columns (right)."""
    return grad.square().sum(dim=1 if side == "left" else 0)


def sample_selection(
    scores: torch.Tensor, rank: int, method: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, scales)`` of r draws with replacement (``method`` ``"norm"`` or ``"uniform"``),
    sorted by index; ``scales`` is ρ with ``E[P Pᵀ] = I``. A zero gradient samples uniformly."""
    d = scores.numel()
    total = scores.sum()
    if method == "uniform" or not bool(total > 0):
        probs = torch.full_like(scores, 1.0 / d)
    else:
        probs = scores / total
    draws = torch.multinomial(probs, rank, replacement=True, generator=generator)
    draws = torch.sort(draws).values
    scales = (rank * probs.index_select(0, draws)).rsqrt()
    return draws.to(torch.int32), scales


class GrassProjector(Projector):
    """Grass's sparse projection: r selected coordinates of the projected side (arXiv:2406.17660)."""

    name = "grass"
    down_reads_every_entry = False  # a gather: a NaN in an unselected row never reaches down(G)
    orthonormal = True  # per instance: False for the sampled selections (see __init__)
    option_defaults: dict[str, Any] = {"grass_select": "top"}
    structural_state_keys = ("proj_dim",)

    def __init__(self, rank: int, update_proj_gap: int, side: str, options: dict[str, Any]):
        super().__init__(rank, update_proj_gap, side, options)
        # a sampled selection may repeat a coordinate and scales it: P is then not orthonormal
        self.orthonormal = options["grass_select"] == "top"

    @classmethod
    def validate_options(cls, group: dict[str, Any]) -> None:
        check_choice("grass_select", group["grass_select"], GRASS_SELECTIONS)

    # ---------------------------------------------------------------- state
    def init_state(self, state: dict[str, Any], shape2d: tuple[int, int], seed: int) -> None:
        super().init_state(state, shape2d, seed)
        state["proj_dim"] = shape2d[1] if self.side == "right" else shape2d[0]

    def has_basis(self, state: dict[str, Any]) -> bool:
        return "proj_indices" in state

    def refresh_state_spec(
        self, shape2d: tuple[int, int], dtype: torch.dtype
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """r int32 indices, plus the r scales ρ of a sampled selection."""
        spec = {"proj_indices": ((self.rank,), torch.int32)}
        if self.options["grass_select"] != "top":
            spec["proj_scales"] = ((self.rank,), dtype)
        return spec

    def default_scale(self, shape2d: tuple[int, int]) -> float:
        if self.options["grass_select"] == "top":
            return super().default_scale(shape2d)
        return 1.0

    # ---------------------------------------------------------------- refresh
    def refresh(self, state: dict[str, Any], grad: torch.Tensor, step: int, group: dict[str, Any]) -> bool:
        # an all-zero gradient scores every row alike: keep the previous rows, or on a first refresh take
        # provisional ones (guarded_basis's rule)
        finite, nonzero = finite_and_nonzero(grad)
        if not refresh_goes_on(state, finite, nonzero, keep_on_zero=self.has_basis(state)):
            return False
        return self._select(state, grass_scores(grad, self.side), step, nonzero)

    def refresh_sharded(self, state: dict[str, Any], grad_local: torch.Tensor, step: int,
                        group: dict[str, Any], ctx: Any) -> bool:
        """Gather-free: right side, the column scores are all-reduced (n numbers); left side, each
        rank's row scores are all-gathered (m numbers)."""
        finite, nonzero = ctx.finite_and_nonzero(grad_local)
        if not refresh_goes_on(state, finite, nonzero, keep_on_zero=self.has_basis(state)):
            return False
        local = grass_scores(grad_local, self.side)
        scores = ctx.all_reduce(local) if self.side == "right" else ctx.all_gather_rows(local)
        return self._select(state, scores, step, nonzero)

    def _select(self, state: dict[str, Any], scores: torch.Tensor, step: int, counted: bool = True) -> bool:
        """The rows/columns by ``scores``; ``counted=False``: provisional ones (from a zero gradient)."""
        method = self.options["grass_select"]
        state["proj_refreshes"] += int(counted)
        if method == "top":
            indices = select_indices(scores, self.rank)
            old = state.get("proj_indices")
            if old is not None and torch.equal(old, indices.to(old.device)):
                return False  # the same coordinates in the same order: nothing changed
            state["proj_indices"] = indices  # new tensors: a copy of the old state keeps the old ones
            return counted  # a provisional selection is no subspace change
        generator = self.refresh_generator(state, step, scores.device)
        indices, scales = sample_selection(scores, self.rank, method, generator)
        state["proj_indices"] = indices
        state["proj_scales"] = scales
        return counted

    # ---------------------------------------------------------------- maps
    def _dim(self) -> int:
        """0: the selection picks rows (left side); 1: columns (right side)."""
        return 0 if self.side == "left" else 1

    def _indices(self, state: dict[str, Any], device: torch.device) -> torch.Tensor:
        return state["proj_indices"].to(device=device)

    def _scales(self, state: dict[str, Any], like: torch.Tensor) -> torch.Tensor | None:
        scales = state.get("proj_scales")
        if scales is None:
            return None
        shape = (-1, 1) if self.side == "left" else (1, -1)
        return scales.to(device=like.device, dtype=like.dtype).view(shape)

    def down(self, state: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
        low = grad.index_select(self._dim(), self._indices(state, grad.device))
        scales = self._scales(state, low)
        return low if scales is None else low.mul_(scales)

    def _scaled(self, state: dict[str, Any], update: torch.Tensor) -> torch.Tensor:
        scales = self._scales(state, update)
        return update if scales is None else update * scales

    def up(self, state: dict[str, Any], update: torch.Tensor) -> torch.Tensor:
        d = int(state["proj_dim"])
        shape = (d, update.shape[1]) if self.side == "left" else (update.shape[0], d)
        out = update.new_zeros(shape)
        return out.index_add_(self._dim(), self._indices(state, update.device), self._scaled(state, update))

    def update_param_(
        self, state: dict[str, Any], param2d: torch.Tensor, update: torch.Tensor, alpha: float, decay: float
    ) -> None:
        """``param <- decay·param + alpha·up(update)``: a scale of the weight and a scatter-add of r
        rows/columns. A lower-precision weight is updated in an fp32 copy and rounded once."""
        work = param2d if param2d.dtype == update.dtype else param2d.to(update.dtype)
        if decay != 1.0:
            work.mul_(decay)
        work.index_add_(self._dim(), self._indices(state, update.device), self._scaled(state, update), alpha=alpha)
        if work is not param2d:
            param2d.copy_(work)

    # ---------------------------------------------------------------- the dense view
    def basis_like(self, state: dict[str, Any], like: torch.Tensor) -> torch.Tensor:
        """The dense P (what generic consumers and the tests read; the step never builds it)."""
        indices = self._indices(state, like.device).long()
        scales = state.get("proj_scales")
        values = (torch.ones(self.rank, device=like.device, dtype=like.dtype) if scales is None
                  else scales.to(device=like.device, dtype=like.dtype))
        d = int(state["proj_dim"])
        columns = torch.arange(self.rank, device=like.device)
        if self.side == "left":
            basis = torch.zeros(d, self.rank, device=like.device, dtype=like.dtype)
            basis[indices, columns] = values
        else:
            basis = torch.zeros(self.rank, d, device=like.device, dtype=like.dtype)
            basis[columns, indices] = values
        return basis

    def basis(self, state: dict[str, Any]) -> torch.Tensor:
        return self.basis_like(state, state_like(state))

    def transition(self, old_state: dict[str, Any], new_state: dict[str, Any]) -> torch.Tensor:
        """``P_old P_newᵀ`` (right; its transpose on the left) without the dense bases:
        ``T[a, b] = ρ_old[a] ρ_new[b] [σ_old[a] == σ_new[b]]``."""
        like = state_like(new_state)
        old, new = old_state["proj_indices"], new_state["proj_indices"].to(old_state["proj_indices"].device)
        t = (old.unsqueeze(1) == new.unsqueeze(0)).to(device=like.device, dtype=like.dtype)
        old_scales, new_scales = old_state.get("proj_scales"), new_state.get("proj_scales")
        if old_scales is not None:
            t = t * old_scales.to(device=like.device, dtype=like.dtype).unsqueeze(1)
        if new_scales is not None:
            t = t * new_scales.to(device=like.device, dtype=like.dtype).unsqueeze(0)
        return t if self.side == "right" else t.T


__all__ = ["GRASS_SELECTIONS", "GrassProjector", "grass_scores", "sample_selection"]
