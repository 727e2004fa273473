"""The generic presets: one update rule inside any projector (``projector="svd" | "dct" | ...``).

The argument names follow ``torch.optim.AdamW`` (``lr, betas, eps, weight_decay,
maximize, foreach``) and galore-torch's group keys (``rank, update_proj_gap,
scale, proj_type``) so migrating is a change of import.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lrgrad.optim.adafactor_compat import translate_adafactor_kwargs
from lrgrad.optim.lowrank import LowRankOptimizer
from lrgrad.optim.registry import register_optimizer

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


@register_optimizer()
class LowRankAdamW(LowRankOptimizer):
    """AdamW inside any projector: ``LowRankAdamW(params, projector="dct", rank=128)``."""

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        projector: str = "svd",
        **options: Any,
    ):
        super().__init__(params, lr, rule="adamw", projector=projector, betas=betas, eps=eps,
                         weight_decay=weight_decay, **options)


@register_optimizer()
class LowRankAdafactor(LowRankOptimizer):
    """Adafactor (factored second moment) inside any projector.

    Also takes ``transformers.Adafactor``'s keywords (``decay_rate``, ``eps=(eps1, eps2)``,
    ``scale_parameter=False``, ``relative_step=False``, ``warmup_init=False``) with their
    meaning; the relative step and parameter scaling are refused with what to use instead
    (``lrgrad.optim.adafactor_compat``).
    """

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
        projector: str = "svd",
        **options: Any,
    ):
        lr, eps, beta2_decay = translate_adafactor_kwargs(lr, eps, beta2_decay, options)
        super().__init__(params, lr, rule="adafactor", projector=projector, beta1=beta1,
                         beta2_decay=beta2_decay, eps=eps, clip_threshold=clip_threshold,
                         weight_decay=weight_decay, **options)


@register_optimizer()
class LowRankLion(LowRankOptimizer):
    """Lion inside any projector."""

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        projector: str = "svd",
        **options: Any,
    ):
        super().__init__(params, lr, rule="lion", projector=projector, betas=betas,
                         weight_decay=weight_decay, **options)
