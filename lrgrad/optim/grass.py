"""Grass preset: AdamW inside Grass's sparse row-selection projector (``lrgrad.projectors.grass``).

"Grass: Compute Efficient Low-Memory LLM Training with Structured Sparse Gradients",
Muhamed et al. 2024, arXiv:2406.17660.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lrgrad.optim.lowrank import LowRankOptimizer
from lrgrad.optim.registry import register_optimizer

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


@register_optimizer("grass")
class GrassAdamW(LowRankOptimizer):
    r"""Grass: AdamW on r selected rows (or columns) of the gradient (arXiv:2406.17660).

    For a projected m x n matrix whose rows are selected (``proj_type="std"`` selects along the
    larger side's complement, as every lrgrad projector does: moments are max(m, n) x r):

    .. math::
        \sigma_t &= \text{the } r \text{ rows of largest } \|G_{t,i}\|^2 \text{ (or sampled
            with } q_i \propto \|G_{t,i}\|^2\text{) on steps } 1, T+1, \dots \\
        R_t &= \rho\, G_t[\sigma_t, :], \quad u_t = \mathrm{AdamW}(R_t), \quad
        W_t = W_{t-1}(1 - \eta\lambda) - \eta\,\alpha\, \mathrm{scatter}_{\sigma_t}(\rho\, u_t)

    ``down`` is a gather and the update a scatter-add: no projection GEMM, and the state per
    matrix is the two r-row moments and r int32 indices (+ r scales ρ when sampled).
    ``grass_select``: ``"top"`` (default; deterministic, ρ = 1), ``"norm"`` (Multinomial-Norm²
    with replacement, ρ_j = 1/sqrt(r q_j): unbiased), ``"uniform"``. Moments are reset at every
    refresh (``moment_policy="reset"``, the paper's choice); ``"project"`` carries the rows that
    stay selected.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float | None = None,
        proj_type: str = "std",
        moment_policy: str = "reset",
        grass_select: str = "top",
        **options: Any,
    ):
        super().__init__(params, lr, rule="adamw", projector="grass", betas=betas, eps=eps,
                         weight_decay=weight_decay, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                         proj_type=proj_type, moment_policy=moment_policy, grass_select=grass_select, **options)
