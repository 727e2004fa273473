"""DCT presets: the rule inside the DCT projector (``lrgrad.projectors.dct``).

"SVD-Free Low-Rank Adaptive Gradient Optimization for Large Language Models", arXiv:2505.17967.
"""

from __future__ import annotations

from typing import Any

from lrgrad.optim.generic import LowRankAdafactor, LowRankAdamW, ParamsT
from lrgrad.optim.registry import register_optimizer


@register_optimizer("dct")
class DCTAdamW(LowRankAdamW):
    r"""AdamW in the r DCT-II directions that carry most of the gradient (arXiv:2505.17967).

    .. math::
        \mathrm{idx}_t &= \mathrm{top}_r\ \text{column norms of } G_t Q \text{ on steps } 1, T+1, \dots
            \quad (Q: \text{shared orthonormal DCT-II basis}) \\
        R_t &= G_t Q_{:, \mathrm{idx}}, \quad u_t = \mathrm{AdamW}(R_t), \quad
        W_t = W_{t-1}(1 - \eta\lambda) - \eta\,\alpha\, u_t Q_{:, \mathrm{idx}}^\top

    The per-layer state is the moments plus r int32 indices; one basis per projected
    size is shared by all layers (``lrgrad.projectors.dct.dct_cached_bytes``).
    ``moment_policy="project"`` (default here): on a reselection each surviving basis
    vector keeps its moments and new ones start at zero - the moments never drift to
    another basis vector. ``dct_scores`` picks the scoring path (``"auto"``: FFT for
    large sizes, matmul otherwise; ``"sketch"``: left-side scores from a seeded rank-(r + 8)
    sketch, what FSDP2 runs by default). Under FSDP2 the left side (m < n) is scored from
    that sketch (``dct_sharded="sketch"``) instead of all-gathering G; ``dct_sharded="gather"``
    keeps exact scores.
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
        moment_policy: str = "project",
        dct_scores: str = "auto",
        **options: Any,
    ):
        super().__init__(params, lr, betas, eps, weight_decay, projector="dct", rank=rank,
                         update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                         moment_policy=moment_policy, dct_scores=dct_scores, **options)


@register_optimizer("dct_adafactor")
class DCTAdafactor(LowRankAdafactor):
    """Adafactor (factored second moment) in the DCT subspace (arXiv:2505.17967); see ``DCTAdamW``."""

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        beta1: float | None = None,
        beta2_decay: float = -0.8,
        eps: float = 1e-30,
        clip_threshold: float = 1.0,
        weight_decay: float = 0.0,
        *,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float | None = None,
        proj_type: str = "std",
        moment_policy: str = "project",
        dct_scores: str = "auto",
        **options: Any,
    ):
        super().__init__(params, lr, beta1, beta2_decay, eps, clip_threshold, weight_decay, projector="dct",
                         rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                         moment_policy=moment_policy, dct_scores=dct_scores, **options)
