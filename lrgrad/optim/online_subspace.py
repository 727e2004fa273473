"""Online Subspace Descent presets: the rule inside the online-PCA projector (``lrgrad.projectors.online_pca``).

"Memory-Efficient LLM Training with Online Subspace Descent", Liang et al. 2024, arXiv:2408.12857.
"""

from __future__ import annotations

from typing import Any

from lrgrad.optim.generic import LowRankAdamW, LowRankLion, ParamsT
from lrgrad.optim.registry import register_optimizer


@register_optimizer("online_subspace")
class OnlineSubspaceAdamW(LowRankAdamW):
    r"""Online Subspace Descent with AdamW (arXiv:2408.12857).

    .. math::
        P_t &= P_{t-1} - \eta_P\,\mathrm{Adam}\big(\nabla_P \|\hat G_t P^\top P - \hat G_t\|_F^2\big),
            \quad \hat G_t = G_t / \|G_t\|_F, \quad \eta_P = \mathrm{pca\_lr}\cdot \eta_t/\eta_0 \\
        u_t &= \mathrm{AdamW}(G_t P_t^\top), \quad W_t = W_{t-1}(1 - \eta\lambda) - \eta\,\alpha\, u_t P_t

    ``P`` starts from the SVD of the first gradient (``pca_init="svd"``) or a random
    orthonormal matrix (``pca_init="random"``: no SVD ever) and then moves by one
    online-PCA step every ``update_proj_gap`` steps (default 1: every step), with a QR
    guard (``pca_qr_every``, ``pca_ortho_tol``). The moments stay in place across
    these small rotations (``moment_policy="keep"``, as the reference does).
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
        update_proj_gap: int = 1,
        scale: float | None = None,
        proj_type: str = "std",
        pca_init: str = "svd",
        pca_lr: float = 5e-3,
        **options: Any,
    ):
        super().__init__(params, lr, betas, eps, weight_decay, projector="online_pca", rank=rank,
                         update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                         pca_init=pca_init, pca_lr=pca_lr, **options)


@register_optimizer("online_subspace_lion")
class OnlineSubspaceLion(LowRankLion):
    """Online Subspace Descent with Lion (arXiv:2408.12857); see ``OnlineSubspaceAdamW``."""

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        rank: int | None = None,
        update_proj_gap: int = 1,
        scale: float | None = None,
        proj_type: str = "std",
        pca_init: str = "svd",
        pca_lr: float = 5e-3,
        **options: Any,
    ):
        super().__init__(params, lr, betas, weight_decay, projector="online_pca", rank=rank,
                         update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                         pca_init=pca_init, pca_lr=pca_lr, **options)
