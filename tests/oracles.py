"""Independent oracles: every update rule written again from its paper's equations.

Nothing here imports lrgrad. Each function is the textbook form of a rule (plain
torch, the math in the dtype of the inputs — tests pass fp64), written without
looking at the fused, foreach, in-place or chunked forms the library uses, so a
test comparing the library with these formulas checks the library, never itself.

A rule is ``direction(rule, state, g, t, options) -> u`` with ``state`` a plain
dict the oracle owns; the optimizer step around it is AdamW's decoupled order:

    full rank:  p <- p (1 - lr wd) - lr u(g)
    projected:  p <- p (1 - lr wd) - lr scale up(u(down(g)))
                right: down(G) = G Pᵀ, up(U) = U P;  left: down(G) = Pᵀ G, up(U) = P U
"""

from __future__ import annotations

import math
from typing import Any

import torch

#: the rules that update whole matrices and give 1-D params AdamW (with the ``adamw_*`` options)
MATRIX_RULES = ("muon", "auon", "hybrid_auon")


# ---------------------------------------------------------------- the rules
def adamw(state: dict, g: torch.Tensor, t: int, betas: tuple[float, float], eps: float) -> torch.Tensor:
    """Loshchilov & Hutter, arXiv:1711.05101, with torch.optim.AdamW's eps placement."""
    b1, b2 = betas
    m = state["m"] = b1 * state.get("m", torch.zeros_like(g)) + (1 - b1) * g
    v = state["v"] = b2 * state.get("v", torch.zeros_like(g)) + (1 - b2) * g * g
    m_hat = m / (1 - b1**t)
    return m_hat / ((v / (1 - b2**t)).sqrt() + eps)


def adafactor(state: dict, g: torch.Tensor, t: int, beta1: float | None, beta2_decay: float, eps: float,
              clip_threshold: float) -> torch.Tensor:
    """Shazeer & Stern, arXiv:1804.04235: factored second moment (Alg. 4), update clipping, optional β1."""
    beta2 = 1 - t**beta2_decay
    sq = g * g + eps
    if g.dim() == 2:
        row = state["row"] = beta2 * state.get("row", torch.zeros(g.shape[0], dtype=g.dtype)) + (1 - beta2) * sq.mean(1)
        col = state["col"] = beta2 * state.get("col", torch.zeros(g.shape[1], dtype=g.dtype)) + (1 - beta2) * sq.mean(0)
        v_hat = torch.outer(row, col) / row.mean()
    else:
        v_hat = state["v"] = beta2 * state.get("v", torch.zeros_like(g)) + (1 - beta2) * sq
    u = g / v_hat.sqrt()
    rms = u.pow(2).mean().sqrt().item()
    u = u / max(1.0, rms / clip_threshold)
    if beta1 is not None:
        u = state["m"] = beta1 * state.get("m", torch.zeros_like(g)) + (1 - beta1) * u
    return u


def lion(state: dict, g: torch.Tensor, betas: tuple[float, float]) -> torch.Tensor:
    """Chen et al., arXiv:2302.06675, Alg. 2: u = sign(β1 m + (1-β1) g), then m = β2 m + (1-β2) g."""
    b1, b2 = betas
    m = state.get("m", torch.zeros_like(g))
    u = torch.sign(b1 * m + (1 - b1) * g)
    state["m"] = b2 * m + (1 - b2) * g
    return u


def momentum(state: dict, g: torch.Tensor, beta: float, nesterov: bool) -> torch.Tensor:
    """EMA momentum M = β M + (1-β) g; the Nesterov direction (1-β) g + β M, else M."""
    m = state["m"] = beta * state.get("m", torch.zeros_like(g)) + (1 - beta) * g
    return (1 - beta) * g + beta * m if nesterov else m


def quintic(x: torch.Tensor, steps: int, coefficients=(3.4445, -4.7750, 2.0315), eps: float = 1e-7) -> torch.Tensor:
    """Muon's Newton–Schulz iteration on X = V / (‖V‖_F + eps), on the wide orientation."""
    a, b, c = coefficients
    tall = x.shape[0] > x.shape[1]
    y = x.T if tall else x
    y = y / (y.norm() + eps)
    for _ in range(steps):
        gram = y @ y.T
        y = a * y + (b * gram + c * gram @ gram) @ y
    return y.T if tall else y


def auon_brake(v: torch.Tensor, eps: float, rms_eps: float, gamma: float = 1.0,
               normalize_numerator: bool = True) -> torch.Tensor:
    """AuON, arXiv:2509.24320: X = V/(‖V‖+eps), rms = ‖cosh(γX)‖/√N, u = X (or V) / (rms + rms_eps)."""
    x = v / (v.norm() + eps)
    rms = torch.cosh(gamma * x).pow(2).mean().sqrt()
    return (x if normalize_numerator else v) / (rms + rms_eps)


def muon_factor(rows: int, cols: int, match_rms_adamw: bool) -> float:
    return 0.2 * math.sqrt(max(rows, cols)) if match_rms_adamw else math.sqrt(max(1.0, rows / cols))


# ---------------------------------------------------------------- 8-bit blockwise moments
def quantize_8bit(x: torch.Tensor, block: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dettmers et al., arXiv:2110.02861, with a companded map: codes of (|x|/absmax)^(1/p) on a linear grid.

    Signed (first moments): p = 2, codes round(127 y)·sign(x); unsigned (second moments): p = 4,
    codes round(255 y). Computed in fp32, as the moments are stored.
    """
    flat = x.reshape(-1).float()
    codes = torch.zeros_like(flat)
    absmax = []
    for start in range(0, flat.numel(), block):
        chunk = flat[start:start + block]
        top = chunk.abs().max()
        absmax.append(top)
        if top > 0:
            y = (chunk.abs() / top).clamp(max=1.0)
            codes[start:start + block] = (torch.round(127 * y.sqrt()) * torch.sign(chunk) if signed
                                          else torch.round(255 * y.sqrt().sqrt()))
    return codes.reshape(x.shape), torch.stack(absmax)


def dequantize_8bit(codes: torch.Tensor, absmax: torch.Tensor, block: int, signed: bool) -> torch.Tensor:
    flat = codes.reshape(-1).float()
    scale = absmax.repeat_interleave(block)[: flat.numel()]
    values = torch.sign(flat) * (flat.abs() / 127) ** 2 if signed else (flat / 255) ** 4
    return (values * scale).reshape(codes.shape)


def adamw8bit(state: dict, g: torch.Tensor, t: int, betas: tuple[float, float], eps: float,
              block: int) -> torch.Tensor:
    """AdamW whose moments are stored as 8-bit blockwise codes between steps: dequantize the old
    moments, take the exact AdamW step (the direction uses the unrounded new moments), store the
    new moments quantized."""
    b1, b2 = betas
    if "m_codes" in state:
        m_old = dequantize_8bit(state["m_codes"], state["m_absmax"], block, True).to(g.dtype)
        v_old = dequantize_8bit(state["v_codes"], state["v_absmax"], block, False).to(g.dtype)
    else:
        m_old, v_old = torch.zeros_like(g), torch.zeros_like(g)
    m = b1 * m_old + (1 - b1) * g
    v = b2 * v_old + (1 - b2) * g * g
    state["m_codes"], state["m_absmax"] = quantize_8bit(m, block, True)
    state["v_codes"], state["v_absmax"] = quantize_8bit(v, block, False)
    return (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)


# ---------------------------------------------------------------- dispatch
def direction(rule: str, state: dict, g: torch.Tensor, t: int, options: dict[str, Any]) -> torch.Tensor:
    """The direction ``u`` of ``rule`` for gradient ``g`` at 1-based step ``t`` (``state`` advanced)."""
    o = options
    if rule == "adamw":
        return adamw(state, g, t, o["betas"], o["eps"])
    if rule == "adamw8bit":
        if g.numel() < o["moment_min_size"]:
            return adamw(state, g, t, o["betas"], o["eps"])
        return adamw8bit(state, g, t, o["betas"], o["eps"], o["moment_block_size"])
    if rule == "adafactor":
        return adafactor(state, g, t, o["beta1"], o["beta2_decay"], o["eps"], o["clip_threshold"])
    if rule == "lion":
        return lion(state, g, o["betas"])
    if rule in MATRIX_RULES:
        v = momentum(state, g, o["momentum"], o["nesterov"])
        if rule == "muon":
            return quintic(v, o["ns_steps"], o["ns_coefficients"], o["eps"]) * muon_factor(
                *v.shape, o["match_rms_adamw"])
        if rule == "hybrid_auon":
            v = quintic(v, o["ns_steps"], o["ns_coefficients"], o["eps"])
        return auon_brake(v, o["eps"], o["rms_eps"], o["gamma"], o["normalize_numerator"])
    raise KeyError(rule)


def full_rank_step(rule: str, p: torch.Tensor, g: torch.Tensor, state: dict, t: int, lr: float, wd: float,
                   options: dict[str, Any]) -> torch.Tensor:
    """The new value of a full-rank param; matrix rules give 1-D params AdamW with the ``adamw_*`` options."""
    if rule in MATRIX_RULES and p.dim() < 2:
        lr = options["adamw_lr"]
        if options["adamw_weight_decay"] is not None:
            wd = options["adamw_weight_decay"]
        u = adamw(state, g, t, options["adamw_betas"], options["adamw_eps"])
    else:
        u = direction(rule, state, g, t, options)
    return p * (1 - lr * wd) - lr * u


def projected_step(rule: str, p: torch.Tensor, g: torch.Tensor, basis: torch.Tensor, side: str, state: dict,
                   t: int, lr: float, wd: float, scale: float, options: dict[str, Any],
                   down_basis: torch.Tensor | None = None) -> torch.Tensor:
    """The new value of a param projected on ``basis`` (``side`` as in the module docstring);
    ``down_basis``: the basis that projects G when it is not the one the update goes back through
    (online PCA projects with the basis its step started from)."""
    down_basis = basis if down_basis is None else down_basis
    low = g @ down_basis.T if side == "right" else down_basis.T @ g
    u = direction(rule, state, low, t, options)
    back = u @ basis if side == "right" else basis @ u
    return p * (1 - lr * wd) - lr * scale * back


def full_rank_from_low_rank_step(mode: str, rule: str, p: torch.Tensor, g: torch.Tensor, basis: torch.Tensor,
                                 side: str, state: dict, t: int, lr: float, wd: float, scale: float,
                                 options: dict[str, Any], scale_type: str, gamma: float | None) -> torch.Tensor:
    """APOLLO (``mode="apollo"``, Zhu et al., arXiv:2412.05270) and Fira (``"fira"``, Chen et al.,
    arXiv:2410.01623): a full-rank update built from the rule's low-rank direction ``u = ψ(R)``.

        R = down(G),  s_c = ‖u_c‖ / (‖R_c‖ + 1e-8)  (channel c: a row of G on the right side, a column
        on the left; ``scale_type="tensor"``: one s = ‖u‖_F / (‖R‖_F + 1e-8))
        APOLLO: S = G ⊙ s;            p <- p (1 - lr wd) - lr scale lim(S)
        Fira:   S = (G - up(R)) ⊙ s;  p <- p (1 - lr wd) - lr (scale up(u) + lim(S))
        lim (Fira's norm-growth limiter, γ): S <- S γ (‖S_prev‖ + 1e-8) / ‖S‖ when ‖S‖ exceeds that
        bound, ‖S_prev‖ being the previous step's norm after limiting (no limit at the first step).
    """
    low = g @ basis.T if side == "right" else basis.T @ g
    u = direction(rule, state, low, t, options)
    if scale_type == "tensor":
        s = u.norm() / (low.norm() + 1e-8)
    elif side == "right":  # R is m x r: one factor per row of G
        s = (u.norm(dim=1) / (low.norm(dim=1) + 1e-8))[:, None]
    else:  # R is r x n: one factor per column of G
        s = (u.norm(dim=0) / (low.norm(dim=0) + 1e-8))[None, :]
    back = low @ basis if side == "right" else basis @ low
    scaled = (g if mode == "apollo" else g - back) * s
    norm = scaled.norm()
    if gamma is not None and "limiter_prev" in state and norm > gamma * (state["limiter_prev"] + 1e-8):
        scaled = scaled * (gamma * (state["limiter_prev"] + 1e-8) / norm)
    state["limiter_prev"] = scaled.norm()
    if mode == "apollo":
        return p * (1 - lr * wd) - lr * scale * scaled
    up_u = u @ basis if side == "right" else basis @ u
    return p * (1 - lr * wd) - lr * (scale * up_u + scaled)


def top_subspace(g: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """The orthogonal projector onto the top-``rank`` singular subspace of ``g`` on ``side`` (sign-free)."""
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    q = vh[:rank].T if side == "right" else u[:, :rank]
    return q @ q.T


# ---------------------------------------------------------------- Grass's sparse projection
def grass_top_indices(g: torch.Tensor, rank: int, side: str) -> list[int]:
    """Muhamed et al., arXiv:2406.17660 (Top-r): the r coordinates of the projected side (rows
    for ``side="left"``, columns for ``"right"``) with the largest squared norm, ties to the
    smaller index, in ascending order."""
    norms = (g * g).sum(dim=1 if side == "left" else 0).tolist()
    ranked = sorted(range(len(norms)), key=lambda i: (-norms[i], i))
    return sorted(ranked[:rank])


def grass_sampling_scales(g: torch.Tensor, indices: list[int], side: str, method: str) -> list[float]:
    """ρ_j = 1 / sqrt(r q_{σ_j}) of r draws with replacement: ``q_i = ‖G_i‖² / Σ ‖G‖²``
    (Multinomial-Norm²) or ``q_i = 1/d`` (Multinomial-Uniform); E[P Pᵀ] = I."""
    norms = (g * g).sum(dim=1 if side == "left" else 0).tolist()
    total = sum(norms)
    rank = len(indices)
    q = [1.0 / len(norms) if method == "uniform" else norms[i] / total for i in indices]
    return [1.0 / math.sqrt(rank * qi) for qi in q]


def grass_basis(indices: list[int], scales: list[float] | None, dim: int, side: str,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense P of a selection: ``Pᵀ = ρ B`` with ``B[j, σ_j] = 1`` (left: P is dim x r; right:
    P is r x dim, lrgrad's side convention), written entry by entry."""
    rank = len(indices)
    basis = torch.zeros(rank, dim, dtype=dtype)
    for j, i in enumerate(indices):
        basis[j, i] += 1.0 if scales is None else scales[j]
    return basis if side == "right" else basis.T


# ---------------------------------------------------------------- FRUGAL's full-rank step
def frugal_step(p: torch.Tensor, g: torch.Tensor, basis: torch.Tensor, side: str, state: dict, t: int, lr: float,
                wd: float, scale: float, residual_lr_scale: float, options: dict[str, Any]) -> torch.Tensor:
    """Zmushko et al., arXiv:2412.07837 (Alg. 1): AdamW on R = down(G) (state-full, in the subspace),
    signSGD on the residual G − up(R) (state-free), decoupled decay first:
    ``p ← p(1 − lr·wd) − lr·scale·up(u) − lr·c·sign(G − up(R))``."""
    low = g @ basis.T if side == "right" else basis.T @ g
    u = direction("adamw", state, low, t, options)
    back_u = u @ basis if side == "right" else basis @ u
    back_g = low @ basis if side == "right" else basis @ low
    return p * (1 - lr * wd) - lr * scale * back_u - lr * residual_lr_scale * torch.sign(g - back_g)


# ---------------------------------------------------------------- GoLore's moment transport
def golore_carry(state: dict, p_old: torch.Tensor, p_new: torch.Tensor, side: str) -> None:
    """He et al., arXiv:2410.11289 (the reference's AdamW): at a subspace change the first moment is
    re-expressed in the new subspace, ``M ← P_newᵀ P_old M`` (left) / ``M P_old P_newᵀ`` (right), and the
    second moment is kept as it is."""
    if "m" in state:
        state["m"] = p_new.T @ (p_old @ state["m"]) if side == "left" else (state["m"] @ p_old) @ p_new.T


# ---------------------------------------------------------------- LDAdam
def ldadam_step(p: torch.Tensor, g: torch.Tensor, state: dict, t: int, lr: float, wd: float, scale: float,
                rank: int, side: str, betas: tuple[float, float], eps: float, rho: float, basis: str,
                error_feedback: bool) -> torch.Tensor:
    """Robert et al., arXiv:2410.16103 (Alg. 1-3), one step at 1-based ``t``; ``state`` holds the basis
    ``P``, the moments ``m``, ``v`` and the error ``e``. The subspace is re-estimated every step from
    ``ρ·up(m̂) + (1 − ρ)·G̃`` (one power-iteration step from the old basis, or its SVD), the moments are
    moved into it (m linearly; v's variance part by T∘T, its mean part exactly), and the error of the
    projection and of the transport is fed back into the next gradient."""
    b1, b2 = betas

    def up(basis_, x):
        return x @ basis_ if side == "right" else basis_ @ x

    def down(basis_, x):
        return x @ basis_.T if side == "right" else basis_.T @ x

    def top(x):
        u, _, vh = torch.linalg.svd(x, full_matrices=False)
        return vh[:rank] if side == "right" else u[:, :rank]

    gt = g + state["e"] if error_feedback and "e" in state else g
    lost = torch.zeros_like(g)
    if t == 1:
        new = top(gt)
        state["m"] = torch.zeros_like(down(new, gt))
        state["v"] = torch.zeros_like(state["m"])
    else:
        old = state["P"]
        c1, c2 = 1 - b1 ** (t - 1), 1 - b2 ** (t - 1)
        blend = rho * up(old, state["m"]) / c1 + (1 - rho) * gt
        if basis == "svd":
            new = top(blend)
        elif side == "right":
            new = torch.linalg.qr(blend.T @ (blend @ old.T))[0].T
        else:
            new = torch.linalg.qr(blend @ (blend.T @ old))[0]
        change = old @ new.T if side == "right" else new.T @ old
        m, v = state["m"], state["v"]
        m_new = m @ change if side == "right" else change @ m
        variance = v / c2 - m * m / c1**2
        moved = variance @ (change * change) if side == "right" else (change * change) @ variance
        state["v"] = c2 * (moved + m_new * m_new / c1**2).abs()
        state["m"] = m_new
        lost = b1 / (1 - b1) * (up(old, m) - up(new, m_new))
    state["P"] = new
    r = down(new, gt)
    if error_feedback:
        state["e"] = gt - up(new, r) + lost
    state["m"] = b1 * state["m"] + (1 - b1) * r
    state["v"] = b2 * state["v"] + (1 - b2) * r * r
    u = (state["m"] / (1 - b1**t)) / ((state["v"] / (1 - b2**t)).sqrt() + eps)
    return p * (1 - lr * wd) - lr * scale * up(new, u)
