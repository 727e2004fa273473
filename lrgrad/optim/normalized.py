"""Normalized-momentum optimizers: AuON, Hybrid-AuON and Muon, full-rank or inside a projector.

* ``AuON`` — "AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates", arXiv:2509.24320.
* ``HybridAuON`` — the same paper: ``ns_steps`` (default 1) Newton–Schulz iterations, then AuON's scaling.
* ``Muon`` — K. Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks";
  ``match_rms_adamw`` from "Muon is Scalable for LLM Training", arXiv:2502.16982.

All three take ``model.parameters()`` directly: matrices (N-d params viewed as
``(shape[0], rest)``) get the normalized update, 1-D params (biases, norms) get AdamW in
the same optimizer with the group's ``adamw_lr``/``adamw_betas``/``adamw_eps``/
``adamw_weight_decay``. ``adamw_lr`` follows LR schedulers (it is scaled by ``lr / initial_lr``).
Embeddings and the output head are matrices, but Muon's guidance gives them AdamW: when they
can be recognised - ``model.named_parameters()`` or ``lrgrad.param_groups(model, rank=...)`` -
they get AdamW by default (``adamw_for_embeddings=True``; see
``lrgrad.optim.embedding_routing``). With a plain ``model.parameters()`` nothing carries a name,
so put them in a group with ``rule="adamw"`` yourself::

    opt = lrgrad.Muon(model.named_parameters(), lr=0.02)      # embed_tokens / lm_head -> AdamW

With ``rank=r`` (and any ``projector=``, e.g. ``"svd"``, ``"random"``) the rule runs on the
low-rank gradient R: the momentum is r x n (or m x r) instead of m x n, and the update is
``up(normalize(momentum(R)))``. Muon's shape factor then uses R's shape. ``scale`` defaults
to 1 (the normalized direction already has a fixed size).
"""

from __future__ import annotations

from typing import Any

from lrgrad._checks import check_bool
from lrgrad.kernels.newton_schulz import MUON_COEFFICIENTS
from lrgrad.optim.embedding_routing import route_embeddings_to_adamw
from lrgrad.optim.generic import ParamsT
from lrgrad.optim.lowrank import LowRankOptimizer
from lrgrad.optim.registry import register_optimizer
from lrgrad.rules.matrix import ADAMW_FALLBACK_DEFAULTS

_FALLBACK = ADAMW_FALLBACK_DEFAULTS


def _route(params: ParamsT, enabled: bool, lr: float, adamw_lr: float | None, betas: tuple[float, float],
           eps: float, weight_decay: float | None) -> ParamsT:
    """Named embeddings/heads to AdamW groups (``lrgrad.optim.embedding_routing``) unless disabled."""
    check_bool("adamw_for_embeddings", enabled)
    if not enabled:
        return params
    adamw: dict[str, Any] = {"lr": lr if adamw_lr is None else adamw_lr, "betas": betas, "eps": eps}
    if weight_decay is not None:
        adamw["weight_decay"] = weight_decay
    return route_embeddings_to_adamw(params, adamw)


@register_optimizer("auon")
class AuON(LowRankOptimizer):
    r"""AuON: normalized momentum with a cosh brake, O(mn) per matrix (arXiv:2509.24320).

    .. math::
        M_t &= \beta M_{t-1} + (1-\beta) G_t, \quad V_t = (1-\beta) G_t + \beta M_t \ \text{(Nesterov)} \\
        X_t &= V_t / (\lVert V_t\rVert_F + \epsilon), \quad
        \mathrm{rms}_t = \lVert\cosh(\gamma X_t)\rVert_F / \sqrt{N} \\
        W_t &= W_{t-1}(1-\eta\lambda) - \eta\, X_t / (\mathrm{rms}_t + \epsilon_{rms})

    Defaults follow the paper (lr 0.055, momentum 0.95, γ = 1, normalized numerator).
    ``gamma=1.5, normalize_numerator=False`` reproduce the public reference code's variant.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.055,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        eps: float = 1e-7,
        rms_eps: float = 1e-8,
        gamma: float = 1.0,
        normalize_numerator: bool = True,
        *,
        adamw_lr: float | None = _FALLBACK["adamw_lr"],
        adamw_betas: tuple[float, float] = _FALLBACK["adamw_betas"],
        adamw_eps: float = _FALLBACK["adamw_eps"],
        adamw_weight_decay: float | None = _FALLBACK["adamw_weight_decay"],
        projector: str = "svd",
        rank: int | None = None,
        scale: float = 1.0,
        adamw_for_embeddings: bool = True,
        **options: Any,
    ):
        params = _route(params, adamw_for_embeddings, lr, adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay)
        super().__init__(params, lr, rule=options.pop("rule", "auon"), projector=projector, momentum=momentum,
                         nesterov=nesterov, weight_decay=weight_decay, eps=eps, rms_eps=rms_eps, gamma=gamma,
                         normalize_numerator=normalize_numerator, adamw_lr=adamw_lr, adamw_betas=adamw_betas,
                         adamw_eps=adamw_eps, adamw_weight_decay=adamw_weight_decay, rank=rank, scale=scale,
                         **options)


@register_optimizer("hybrid_auon")
class HybridAuON(AuON):
    """Hybrid-AuON: ``ns_steps`` quintic Newton–Schulz iterations, then AuON's cosh scaling
    (arXiv:2509.24320; one iteration by default, as in the paper)."""

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.055,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        eps: float = 1e-7,
        rms_eps: float = 1e-8,
        gamma: float = 1.0,
        normalize_numerator: bool = True,
        *,
        ns_steps: int = 1,
        ns_coefficients: tuple[float, float, float] = MUON_COEFFICIENTS,
        **options: Any,
    ):
        super().__init__(params, lr, momentum, nesterov, weight_decay, eps, rms_eps, gamma, normalize_numerator,
                         rule="hybrid_auon", ns_steps=ns_steps, ns_coefficients=ns_coefficients, **options)


@register_optimizer("muon")
class Muon(LowRankOptimizer):
    r"""Muon: momentum orthogonalized by 5 quintic Newton–Schulz steps (Jordan et al. 2024).

    .. math::
        M_t = \beta M_{t-1} + (1-\beta) G_t, \quad V_t = (1-\beta) G_t + \beta M_t, \quad
        W_t = W_{t-1}(1-\eta\lambda) - \eta\,\sqrt{\max(1, m/n)}\ \mathrm{NS}_5(V_t)

    ``match_rms_adamw=True`` scales by ``0.2·sqrt(max(m, n))`` instead, so the update RMS matches
    AdamW's and AdamW's lr and weight decay carry over ("Muon is Scalable for LLM Training",
    arXiv:2502.16982).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        *,
        match_rms_adamw: bool = False,
        ns_coefficients: tuple[float, float, float] = MUON_COEFFICIENTS,
        eps: float = 1e-7,
        adamw_lr: float | None = _FALLBACK["adamw_lr"],
        adamw_betas: tuple[float, float] = _FALLBACK["adamw_betas"],
        adamw_eps: float = _FALLBACK["adamw_eps"],
        adamw_weight_decay: float | None = _FALLBACK["adamw_weight_decay"],
        projector: str = "svd",
        rank: int | None = None,
        scale: float = 1.0,
        adamw_for_embeddings: bool = True,
        **options: Any,
    ):
        params = _route(params, adamw_for_embeddings, lr, adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay)
        super().__init__(params, lr, rule="muon", projector=projector, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay, ns_steps=ns_steps, match_rms_adamw=match_rms_adamw,
                         ns_coefficients=ns_coefficients, eps=eps, adamw_lr=adamw_lr, adamw_betas=adamw_betas,
                         adamw_eps=adamw_eps, adamw_weight_decay=adamw_weight_decay, rank=rank, scale=scale,
                         **options)


@register_optimizer("galore_muon")
class GaLoreMuon(Muon):
    """Muon on GaLore's top-r SVD subspace: r x n (or m x r) momentum, Newton–Schulz on the
    low-rank matrix (arXiv:2403.03507 × Jordan et al. 2024). ``rank`` projects every matrix
    whose smaller side exceeds it; smaller matrices run full-rank Muon, 1-D params AdamW."""

    def __init__(self, params: ParamsT, lr: float = 0.02, *, rank: int | None = None,
                 update_proj_gap: int = 200, proj_type: str = "std", **options: Any):
        super().__init__(params, lr, projector="svd", rank=rank, update_proj_gap=update_proj_gap,
                         proj_type=proj_type, **options)


@register_optimizer("galore_auon")
class GaLoreAuON(AuON):
    """AuON on GaLore's top-r SVD subspace (arXiv:2509.24320 × arXiv:2403.03507): the momentum
    is low-rank and the normalization costs O(r·max(m, n))."""

    def __init__(self, params: ParamsT, lr: float = 0.055, *, rank: int | None = None,
                 update_proj_gap: int = 200, proj_type: str = "std", **options: Any):
        super().__init__(params, lr, projector="svd", rank=rank, update_proj_gap=update_proj_gap,
                         proj_type=proj_type, **options)


@register_optimizer("dct_auon")
class DCTAuON(AuON):
    """AuON in the r DCT-II directions that carry most of the gradient (arXiv:2509.24320 ×
    arXiv:2505.17967): r x n (or m x r) momentum plus r int32 indices per matrix, no stored basis,
    and no matrix product in the update rule. ``moment_policy="project"``: on a reselection each
    surviving DCT direction keeps its momentum, new ones start at zero."""

    def __init__(self, params: ParamsT, lr: float = 0.055, *, rank: int | None = None,
                 update_proj_gap: int = 200, proj_type: str = "std", moment_policy: str = "project",
                 **options: Any):
        super().__init__(params, lr, projector="dct", rank=rank, update_proj_gap=update_proj_gap,
                         proj_type=proj_type, moment_policy=moment_policy, **options)
