"""GaLore presets: a rule inside the SVD projector.

"GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
Zhao et al. 2024, arXiv:2403.03507.
"""

from __future__ import annotations

from typing import Any

from lrgrad.optim.generic import LowRankAdafactor, LowRankAdamW, ParamsT
from lrgrad.optim.registry import register_optimizer


@register_optimizer("galore")
class GaLoreAdamW(LowRankAdamW):
    r"""GaLore: AdamW on gradients projected onto their top-r SVD subspace.

    "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
    Zhao et al. 2024, arXiv:2403.03507.

    For a projected m x n matrix (right side shown; ``proj_type="std"`` picks the
    side so moments are max(m, n) x r):

    .. math::
        P_t &= V_{:r}^\top \text{ of } \mathrm{svd}(G_t) \text{ on steps } 1, T+1, 2T+1, \dots \\
        R_t &= G_t P_t^\top, \quad u_t = \mathrm{AdamW}(R_t) \\
        W_t &= W_{t-1}(1 - \eta\lambda) - \eta\,\alpha\, u_t P_t

    ``GaLoreAdamW(model.parameters(), rank=128)`` projects every matrix whose
    smaller side exceeds 128; other params run plain AdamW. Without ``rank`` a
    group runs full-rank (galore-torch's convention: only groups given a rank are
    projected). Defaults follow ``torch.optim.AdamW``; ``scale=0.25`` and
    ``update_proj_gap=200`` follow the paper. The refresh (``svd="warm"``) is a subspace
    iteration from the previous basis (the first: from seeded Gaussian columns), with the
    exact Gram eigenvectors when it does not converge; ``svd="gram"``, ``"exact"``
    (galore-torch's call) and ``"randomized"`` choose otherwise.
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
        **options: Any,
    ):
        super().__init__(params, lr, betas, eps, weight_decay, projector="svd", rank=rank,
                         update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, **options)


@register_optimizer("galore_adafactor")
class GaLoreAdafactor(LowRankAdafactor):
    """GaLore with Adafactor's factored second moment in the low-rank space (arXiv:2403.03507)."""

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
        **options: Any,
    ):
        super().__init__(params, lr, beta1, beta2_decay, eps, clip_threshold, weight_decay, projector="svd",
                         rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                         **options)
