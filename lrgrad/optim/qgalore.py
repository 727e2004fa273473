"""Q-GaLore presets: INT4 projections, an adaptive refresh gap and 8-bit Adam moments.

"Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank
Gradients", Zhang et al. 2024, arXiv:2407.08296. The INT8-weight part of
Q-GaLore (stochastic rounding of quantized weights) lives with
``lrgrad.quantize_weights``; these optimizers handle the optimizer state.
"""

from __future__ import annotations

from typing import Any

from lrgrad.optim.generic import ParamsT
from lrgrad.optim.lowrank import LowRankOptimizer
from lrgrad.optim.registry import register_optimizer


@register_optimizer("qgalore")
class QGaLoreAdamW(LowRankOptimizer):
    r"""Q-GaLore: AdamW with 8-bit moments inside an INT4-quantized SVD subspace.

    Per projected m x n matrix (right side shown):

    .. math::
        P_t &= Q_4\big(V_{:r}^\top(\mathrm{svd}(G_t))\big) \text{ refreshed every } T_\ell \text{ steps} \\
        R_t &= G_t\, \hat P_t^\top, \quad u_t = \mathrm{AdamW}_{8\text{bit}}(R_t) \\
        W_t &= W_{t-1}(1 - \eta\lambda) - \eta\,\alpha\, u_t \hat P_t

    where :math:`Q_4` stores the basis as packed INT4 codes with fp16 scale/zero
    per group of ``proj_quant_group_size`` and :math:`\hat P` is its dequantization.
    The per-layer gap :math:`T_\ell` starts at ``update_proj_gap`` and doubles
    (up to ``max_proj_gap``, default 8x) while the last ``adaptive_window``
    subspace overlaps ``‖P_{old} P_{new}^\top‖_F^2 / r`` stay ``≥ adaptive_threshold``;
    it halves again when the subspace moves. Adam moments of at least
    ``moment_min_size`` elements are stored blockwise 8-bit (``moment_block_size``);
    params outside the projector (embeddings, norms) use the same 8-bit AdamW.

    ``proj_bits=8`` stores INT8 codes; ``adaptive_gap=False`` keeps a fixed gap.
    Options of ``projector="svd"`` (``svd="randomized"``, ...) apply too.
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
        proj_bits: int = 4,
        proj_quant_group_size: int = 256,
        adaptive_gap: bool = True,
        adaptive_threshold: float = 0.4,
        adaptive_window: int = 5,
        max_proj_gap: int | None = None,
        **options: Any,
    ):
        super().__init__(
            params, lr, rule="adamw8bit", projector="qgalore", betas=betas, eps=eps, weight_decay=weight_decay,
            rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, proj_bits=proj_bits,
            proj_quant_group_size=proj_quant_group_size, adaptive_gap=adaptive_gap,
            adaptive_threshold=adaptive_threshold, adaptive_window=adaptive_window, max_proj_gap=max_proj_gap,
            **options,
        )


@register_optimizer("galore8bit")
class GaLoreAdamW8bit(LowRankOptimizer):
    """GaLore (fp32 SVD basis, fixed gap) with 8-bit blockwise Adam moments.

    "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
    Zhao et al. 2024, arXiv:2403.03507 (its "8-bit GaLore"), moments as in
    ``rule="adamw8bit"`` (arXiv:2110.02861).
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
        super().__init__(
            params, lr, rule="adamw8bit", projector="svd", betas=betas, eps=eps, weight_decay=weight_decay,
            rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, **options,
        )


__all__ = ["GaLoreAdamW8bit", "QGaLoreAdamW"]
