r"""Full-rank updates from low-rank statistics: APOLLO, Fira and FRUGAL, for any projector and any rule.

"APOLLO: SGD-like Memory, AdamW-level Performance", Zhu et al. 2024, arXiv:2412.05270;
"Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?", Chen et al. 2024,
arXiv:2410.01623; "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable
Training", Zmushko et al. 2025, arXiv:2412.07837.

A param group option ``full_rank`` changes only what the optimizer does with the rule's
low-rank direction ``u = ψ(R)``, ``R = down(G)``. The projector still picks the subspace and
the rule still keeps its (low-rank) state; then, instead of GaLore's ``up(u)``:

* the **channel scale** reads how much the rule rescales each channel of the low-rank gradient,

  .. math:: s_c = \|u_c\| / (\|R_c\| + ε_s)
     \qquad (``scale_type="channel"``; ``"tensor"``: s = \|u\|_F / (\|R\|_F + ε_s))

  where a channel ``c`` is a row of G for ``side="right"`` (R = G Pᵀ is m×r, the rows are
  not projected) and a column for ``side="left"`` (R = Pᵀ G is r×n); ``ε_s = 1e-8``;
* ``full_rank="apollo"``: the update is the raw full gradient scaled per channel,
  ``S = G ⊙ s``;  ``W ← (1 − ηλ) W − η·scale·lim(S)``;
* ``full_rank="fira"``: GaLore's update plus the residual the subspace misses, scaled per channel,
  ``S = (G − up(R)) ⊙ s``;  ``W ← (1 − ηλ) W − η·(scale·up(u) + lim(S))``;
* ``full_rank="frugal"``: GaLore's update plus a *state-free* signSGD step on the residual,
  ``S = c · sign(G − up(R))`` with ``c = frugal_lr_scale`` (1);
  ``W ← (1 − ηλ) W − η·(scale·up(u) + S)``: the rule (Adam) keeps state only in the subspace,
  the rest of the matrix moves by the sign of what the subspace misses (no channel scale, no
  limiter: FRUGAL has none, and ‖S‖ = c·sqrt(#nonzero) could not grow anyway;
  ``norm_growth_limit`` is ignored and the limiter's slot stays at −1);
* ``lim`` is Fira's **norm-growth limiter** (γ = ``norm_growth_limit``, 1.01; ``None`` turns it
  off): if ``‖S_t‖ > γ (‖S_{t−1}‖ + ε_s)`` then ``S_t ← S_t · γ (‖S_{t−1}‖ + ε_s) / ‖S_t‖``, where
  ``‖S_{t−1}‖`` is the norm after the previous step's limiting. Its one number of state is the
  0-d tensor ``state["limiter_norm"]`` (−1 until the first step: nothing to limit against),
  kept across subspace refreshes; a step whose S is zero (an all-zero gradient) leaves it as it was
  (the references store the 0, and every later update is then capped near γᵏ·ε_s for ~1400 steps).

Everything that touches m×n memory is two passes of ``lrgrad.kernels``: ``channel_sumsq`` (the
limiter needs ‖S‖² = Σ_c s_c² ‖(G − B)_c‖², so S is never materialized) and
``channel_scale_update_`` (decay and the scaled step in one pass). Fira also back-projects
``B = up(R)`` once (an m×n temporary, as in the paper's algorithm) and applies ``scale·up(u)``
with the projector's fused ``update_param_``. No step of this module needs a device sync.

FSDP2 (``Shard(0)`` DTensors): every per-channel quantity is local (right side: the channels
are rows and live with their shard; left side: R and u are replicated), and the three norms that
span shards (‖S‖², and ‖u‖², ‖R‖² for tensor scaling of row-sharded R) are all-reduced sums of
squares, so every rank takes the same limiter decision.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lrgrad import kernels
from lrgrad._checks import check_choice, check_float
from lrgrad.dtensor import is_dtensor
from lrgrad.subspace import compute_dtype

FULL_RANK_MODES = (None, "apollo", "fira", "frugal")
SCALE_TYPES = ("channel", "tensor")
#: ε_s of the scale's denominator and of the limiter's (both references use 1e-8)
SCALE_EPS = 1e-8
#: the group options this module adds to every lrgrad optimizer
FULL_RANK_DEFAULTS: dict[str, Any] = {"full_rank": None, "scale_type": "channel", "norm_growth_limit": 1.01,
                                       "frugal_lr_scale": 1.0}
#: the limiter's state key
LIMITER_KEY = "limiter_norm"
#: what the norm-growth limiter compares step to step (docs/apollo.md, "limiter input"):
#: "update": the update that is applied, S = G ⊙ s with s from the rule's direction (APOLLO's
#: Algorithm 1, arXiv:2412.05270; Fira's limiter, arXiv:2410.01623); "uncorrected": S / c_t with
#: c_t = √(1−β2ᵗ)/(1−β1ᵗ), Adam's bias-correction factor, i.e. S computed from m/(√v + ε) before the
#: bias correction, which is where apollo-torch (v1.0.3) limits (AdamW rules only)
LIMITER_INPUTS = ("update", "uncorrected")
FULL_RANK_DEFAULTS["limiter_input"] = "update"


def validate_full_rank(group: dict[str, Any]) -> None:
    """``ValueError``/``TypeError`` naming the bad option of ``group``."""
    if group["full_rank"] not in FULL_RANK_MODES:
        raise ValueError(f"Invalid full_rank: {group['full_rank']!r}; expected one of {FULL_RANK_MODES}")
    check_choice("scale_type", group["scale_type"], SCALE_TYPES)
    gamma = group["norm_growth_limit"]
    if gamma is not None:
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
            raise TypeError(f"Invalid norm_growth_limit: expected a float > 1 or None, got {gamma!r}")
        if not 1.0 <= gamma < float("inf"):
            raise ValueError(f"Invalid norm_growth_limit: {gamma} (must be a finite value >= 1, or None)")
    check_choice("limiter_input", group.get("limiter_input", "update"), LIMITER_INPUTS)
    if group.get("limiter_input") == "uncorrected" and group.get("rule") not in ("adamw", "adamw8bit"):
        raise ValueError(f"Invalid limiter_input: 'uncorrected' divides by Adam's bias correction, which rule "
                         f"{group.get('rule')!r} does not have; use 'update'")
    check_float("frugal_lr_scale", group["frugal_lr_scale"], minimum=0.0)


def init_full_rank_state(state: dict[str, Any], dtype: torch.dtype, device: torch.device) -> None:
    """The limiter's state: a 0-d tensor, −1 until the first step (a norm is never negative)."""
    state[LIMITER_KEY] = torch.full((), -1.0, dtype=dtype, device=device)


def _local(t: Any) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def _limit(state: dict[str, Any], norm: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """The divisor of S (≥ 1) and the new limiter state, without a host sync."""
    if gamma is None:
        return torch.ones_like(norm)
    prev = state.get(LIMITER_KEY)
    if prev is None:  # e.g. a state dict saved before full_rank was switched on
        prev = torch.full_like(norm, -1.0)
    divisor = torch.clamp(norm / (prev + SCALE_EPS), min=gamma) / gamma
    divisor = torch.where(prev < 0, torch.ones_like(divisor), divisor)
    # the norm after limiting, ‖S‖ / divisor, written as min(‖S‖, γ(prev + ε)): equal, and it stays
    # finite when ‖S‖ overflowed (a 1e30 gradient in fp32; the divisor is then inf and S is dropped)
    limited = torch.minimum(norm, gamma * (prev + SCALE_EPS))
    # A zero S (an all-zero gradient: a layer that saw no data, DCP's zero-gradient template step; Fira's
    # residual of a gradient inside the subspace) moves nothing and is nothing to limit against: kept as the
    # next step's reference it would cap every later update at γᵏ·ε_s, a stall of ~log(‖S‖/ε_s)/log(γ) steps
    # (~1400 for ‖S‖ ~ 1e-2). The previous norm stays.
    new = torch.where(prev < 0, norm, limited)
    state[LIMITER_KEY] = torch.where(norm > 0, new, prev).to(prev.dtype)
    return divisor


def full_rank_update_(
    projector: Any, state: dict[str, Any], param2d: Any, grad2d: Any, low: Any, update: Any, group: dict[str, Any],
    lr: float, decay: float, scale: float,
) -> None:
    """Apply ``group["full_rank"]``'s update to ``param2d`` (see the module docstring).

    ``grad2d`` is the prepared full gradient (compute dtype), ``low = down(G)``, ``update = ψ(low)``
    (the rule has already advanced its state); ``param2d`` is the write target (a DTensor or
    not, any float dtype); ``scale`` is the group's scale, its default already resolved.
    """
    mode = group["full_rank"]
    side = projector.side
    all_reduce = projector.all_reduce  # identity in one process; FSDP2: over the ranks sharing the rows

    g, r, u = _local(grad2d), _local(low), _local(update)
    dtype = compute_dtype(g.dtype)
    if mode == "frugal":
        _frugal_update_(projector, state, param2d, g, low, update, group, lr, decay, scale)
        return
    channel_dim = 0 if side == "right" else 1  # rows of G (R is m×r) or columns (R is r×n)
    low_reduce = 1 if side == "right" else 0
    u_sq = (u.to(dtype) ** 2).sum(dim=low_reduce)
    r_sq = (r.to(dtype) ** 2).sum(dim=low_reduce)
    if group["scale_type"] == "tensor":
        u_sq, r_sq = u_sq.sum(), r_sq.sum()
        if side == "right":  # R's rows are split over the ranks (FSDP2)
            u_sq, r_sq = all_reduce(u_sq.reshape(1)).reshape(()), all_reduce(r_sq.reshape(1)).reshape(())
    scales = u_sq.sqrt() / (r_sq.sqrt() + SCALE_EPS)
    base = _local(projector.up(state, low)).to(dtype) if mode == "fira" else None
    g_sq = kernels.channel_sumsq(g, base, channel_dim).to(dtype)
    channels = g.shape[channel_dim]
    if scales.dim() == 0:
        scales = scales.expand(channels)
    # a zero scale drops its channel even where ‖G_c‖² overflowed (0·inf would be NaN)
    norm_sq = all_reduce(torch.where(scales > 0, scales * scales * g_sq, 0.0).sum().reshape(1)).reshape(())
    norm = norm_sq.sqrt()
    if group.get("limiter_input", "update") == "uncorrected":  # apollo-torch's: before Adam's bias correction
        beta1, beta2 = group["betas"]
        step = state["step"]
        norm = norm * ((1 - beta1**step) / math.sqrt(1 - beta2**step))
    divisor = _limit(state, norm, group["norm_growth_limit"])
    coef = (scales / divisor).contiguous()
    target = _local(param2d)
    if mode == "apollo":
        kernels.channel_scale_update_(target, g, coef, channel_dim, alpha=-lr * scale, decay=decay, base=None)
        return
    # Fira: one fp32 work copy for low-precision weights so they are rounded once per step
    work = target if target.dtype == dtype else target.to(dtype)
    kernels.channel_scale_update_(work, g, coef, channel_dim, alpha=-lr, decay=decay, base=base)
    del base
    projector.update_param_(state, work, update, -lr * scale, 1.0)  # + scale·up(u), fused GEMM
    if work is not target:
        target.copy_(work)


def _frugal_update_(projector: Any, state: dict[str, Any], param2d: Any, g: torch.Tensor, low: Any, update: Any,
                    group: dict[str, Any], lr: float, decay: float, scale: float) -> None:
    """FRUGAL: ``W ← decay·W − η·c·sign(G − up(R)) − η·scale·up(u)``. One m×n temporary (the residual,
    signed in place), as the paper's algorithm; the residual and its sign are local to each FSDP2 shard,
    so nothing crosses ranks."""
    dtype = compute_dtype(g.dtype)
    residual = _local(projector.up(state, low)).to(dtype)
    residual.neg_().add_(g).sign_()  # sign(G − up(R)); torch.sign(0) = 0, as the reference
    residual.mul_(lr * group["frugal_lr_scale"])
    target = _local(param2d)
    work = target if target.dtype == dtype else target.to(dtype)  # low-precision weights: rounded once
    if decay != 1.0:
        work.mul_(decay)
    work.sub_(residual)
    del residual
    projector.update_param_(state, work, update, -lr * scale, 1.0)  # + scale·up(u), the projector's own map
    if work is not target:
        target.copy_(work)


__all__ = ["FULL_RANK_DEFAULTS", "FULL_RANK_MODES", "LIMITER_KEY", "SCALE_EPS", "SCALE_TYPES", "full_rank_update_",
           "init_full_rank_state", "validate_full_rank"]
