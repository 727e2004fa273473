"""Shapes and sides of a projected matrix: the vocabulary every projector, rule and optimizer shares.

Layer 0: imports only torch. A gradient ``G`` of a parameter is seen as the 2-D
matrix ``matrix_shape(param)`` (m x n; N-d params as ``(shape[0], -1)``).

* ``"right"``: the basis ``P`` is r x n, ``R = G Pᵀ`` is m x r, ``up(U) = U P``.
* ``"left"``:  the basis ``P`` is m x r, ``R = Pᵀ G`` is r x n, ``up(U) = P U``.

``proj_type="std"`` projects the smaller side so moments are max(m, n) x r.
"""

from __future__ import annotations

from typing import Any

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right")
MOMENT_POLICIES = ("keep", "project", "reset")


def projection_side(shape2d: tuple[int, int], proj_type: str) -> str:
    """Return ``"left"`` or ``"right"`` for a (m, n) matrix under ``proj_type``."""
    m, n = shape2d
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right"):
        return proj_type
    raise ValueError(f"Invalid proj_type: {proj_type!r}; expected one of {PROJ_TYPES}")


def low_rank_shape(shape2d: tuple[int, int], rank: int, side: str) -> tuple[int, int]:
    m, n = shape2d
    return (m, rank) if side == "right" else (rank, n)


def basis_shape(shape2d: tuple[int, int], rank: int, side: str) -> tuple[int, int]:
    m, n = shape2d
    return (rank, n) if side == "right" else (m, rank)


def apply_transition(x: torch.Tensor, transition: torch.Tensor, side: str, quadratic: bool = False) -> torch.Tensor:
    """Move low-rank coordinates ``x`` into a new subspace.

    ``transition`` is r_old x r_new for ``side="right"`` (``x_new = x T``) and
    r_new x r_old for ``side="left"`` (``x_new = T x``). Second moments are
    non-negative averages of squares, so ``quadratic=True`` uses ``T∘T``: exact
    for a permutation (DCT reselection), a convex-like reweighting for a rotation,
    and never negative.
    """
    source = selection_source(transition, side)
    if source is not None:
        # A 0/1 selection (a DCT reselection): move entries by indexing, so an inf moment stays
        # inf where it is kept and new directions start at exactly 0 - a matmul would make 0·inf = NaN.
        return select_along(x, source, side)
    t = transition * transition if quadratic else transition
    t = t.to(x.dtype)
    # works for matrices and for 1-D factored statistics along the projected axis
    return x @ t if side == "right" else t @ x


def selection_source(transition: torch.Tensor, side: str) -> torch.Tensor | None:
    """For a transition that only selects (entries 0/1, at most one 1 per new coordinate):
    the old index of each new coordinate, ``-1`` for a new one; ``None`` for any other matrix."""
    t = transition if side == "right" else transition.T  # r_old x r_new either way
    if t.dim() != 2 or t.numel() == 0 or not bool(((t == 0) | (t == 1)).all()):
        return None
    hits = t.sum(dim=0)
    if bool((hits > 1).any()):
        return None
    return torch.where(hits > 0, t.argmax(dim=0), torch.full_like(hits, -1, dtype=torch.long))


def select_along(x: torch.Tensor, source: torch.Tensor, side: str) -> torch.Tensor:
    """New low-rank coordinates from old ones: ``new[j] = old[source[j]]`` along the rank axis
    (columns for ``"right"``, rows for ``"left"``; a 1-D statistic along its only axis), zero
    where ``source[j] == -1``."""
    axis = -1 if side == "right" else 0
    source = source.to(x.device)
    picked = x.index_select(axis, source.clamp_min(0))
    keep = (source >= 0).to(x.dtype)
    shape = [1] * x.dim()
    shape[axis] = -1
    return torch.where(keep.reshape(shape) > 0, picked, torch.zeros((), dtype=x.dtype, device=x.device))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for fp32/bf16/fp16 params, fp64 for fp64 params."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def matrix_shape(param: torch.Tensor) -> tuple[int, int]:
    """The 2-D view a projector sees: ``(shape[0], numel // shape[0])``."""
    m = param.shape[0]
    return (m, param.numel() // m if m else 0)


def state_like(state: dict[str, Any]) -> torch.Tensor:
    """A floating tensor of a parameter's state (the device and compute dtype of its moments);
    an empty fp32 CPU tensor when the state has none yet."""
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type != "meta":
            return value
    return torch.empty(0)
