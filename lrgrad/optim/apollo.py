r"""APOLLO, APOLLO-Mini and Fira presets: full-rank updates from low-rank AdamW statistics.

"APOLLO: SGD-like Memory, AdamW-level Performance", Zhu et al. 2024, arXiv:2412.05270;
"Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?", Chen et al. 2024,
arXiv:2410.01623.

Each is ``LowRankOptimizer(rule="adamw", projector=..., full_rank=...)``; the mechanism (channel
scale, residual, norm-growth limiter) lives in ``lrgrad.optim.full_rank`` and works with every
projector and rule, e.g. ``LowRankAdamW(groups, projector="dct", full_rank="apollo")`` or
``LowRankLion(groups, projector="svd", full_rank="fira")``.
"""

from __future__ import annotations

import math
from typing import Any

from lrgrad.optim.generic import LowRankAdamW, ParamsT
from lrgrad.optim.registry import register_optimizer

#: APOLLO-Mini's gradient scale α = √128 (the paper's setting for its rank-1, tensor-wise variant)
APOLLO_MINI_SCALE = math.sqrt(128.0)


@register_optimizer("apollo")
class APOLLOAdamW(LowRankAdamW):
    r"""APOLLO: the raw gradient scaled per channel by a low-rank AdamW's rescaling (arXiv:2412.05270).

    For a projected m×n matrix with a seeded Gaussian projection ``P`` (entries N(0, 1/r),
    regenerated from a seed, never stored; resampled every ``update_proj_gap`` steps) and the
    channels along the non-projected axis:

    .. math::
        R_t = \mathrm{down}_P(G_t), \quad u_t = \mathrm{AdamW}(R_t), \quad
        s_c = \|u_{t,c}\| / (\|R_{t,c}\| + 10^{-8}) \\
        W_t = W_{t-1}(1 - \eta\lambda) - \eta\,\alpha\,\mathrm{lim}_\gamma(G_t \odot s)

    ``lim_γ`` is Fira's norm-growth limiter (γ = ``norm_growth_limit`` = 1.01). State per
    matrix: the two r-column moments and one limiter scalar. Moments are kept across resamples
    (``moment_policy="keep"``, as the reference). ``projector`` may be any lrgrad projector.
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
        scale: float = 1.0,
        scale_type: str = "channel",
        norm_growth_limit: float | None = 1.01,
        proj_type: str = "std",
        moment_policy: str = "keep",
        projector: str = "random",
        seed: int = 0,
        **options: Any,
    ):
        super().__init__(params, lr, betas, eps, weight_decay, projector=projector, rank=rank,
                         update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                         moment_policy=moment_policy, seed=seed, full_rank="apollo", scale_type=scale_type,
                         norm_growth_limit=norm_growth_limit, **options)


@register_optimizer("apollo_mini")
class APOLLOMiniAdamW(APOLLOAdamW):
    r"""APOLLO-Mini: rank 1, one tensor-wise scale, α = √128 (arXiv:2412.05270).

    .. math::
        s = \|u_t\|_F / (\|R_t\|_F + 10^{-8}), \quad
        W_t = W_{t-1}(1 - \eta\lambda) - \eta\,\sqrt{128}\,\mathrm{lim}_\gamma(s\,G_t)

    State per projected matrix: 2·max(m, n) + 1 numbers (a rank-1 pair of moments and the limiter).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        rank: int | None = 1,
        scale: float = APOLLO_MINI_SCALE,
        scale_type: str = "tensor",
        **options: Any,
    ):
        super().__init__(params, lr, betas, eps, weight_decay, rank=rank, scale=scale, scale_type=scale_type,
                         **options)


@register_optimizer("fira")
class FiraAdamW(LowRankAdamW):
    r"""Fira: GaLore's update plus the out-of-subspace residual, scaled per channel (arXiv:2410.01623).

    .. math::
        R_t = G_t P_t^\top, \quad u_t = \mathrm{AdamW}(R_t), \quad
        \phi_c = \|u_{t,c}\| / (\|R_{t,c}\| + 10^{-8}) \\
        W_t = W_{t-1}(1 - \eta\lambda) - \eta\,\big(\alpha\, u_t P_t
              + \mathrm{lim}_\gamma\big((G_t - R_t P_t) \odot \phi\big)\big)

    ``P`` is GaLore's top-r SVD basis (``projector="svd"``; any lrgrad projector works); the
    residual is the part of ``G`` the subspace misses, and ``lim_γ`` (γ = 1.01) Fira's norm-growth
    limiter. State: GaLore's (moments + basis) and one limiter scalar per matrix.
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
        scale: float = 0.25,
        scale_type: str = "channel",
        norm_growth_limit: float | None = 1.01,
        proj_type: str = "std",
        projector: str = "svd",
        **options: Any,
    ):
        super().__init__(params, lr, betas, eps, weight_decay, projector=projector, rank=rank,
                         update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, full_rank="fira",
                         scale_type=scale_type, norm_growth_limit=norm_growth_limit, **options)
