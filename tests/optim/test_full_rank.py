"""APOLLO / APOLLO-Mini / Fira (``full_rank=...``) against an independent float64 oracle of the
papers' equations (arXiv:2412.05270, arXiv:2410.01623), plus the option's contract: validation,
the limiter's tensor state, the full gradient it needs, and memory."""

from __future__ import annotations

import math

import pytest
import torch

import lrgrad
from lrgrad.estimate import make_optimizer
from lrgrad.optim.full_rank import LIMITER_KEY

STEPS, GAP, RANK = 10, 4, 3
SHAPES = ((20, 9), (7, 18))  # right side (channels = rows) and left side (channels = columns)


def _oracle_step(w, g, p, side, mom, t, mode, scale_type, lr, wd, alpha, betas, eps, gamma):
    """One step of the written-out equations (fp64); ``mom`` holds m, v and the limiter's last norm."""
    b1, b2 = betas
    r = g @ p.T if side == "right" else p.T @ g
    mom["m"] = b1 * mom["m"] + (1 - b1) * r
    mom["v"] = b2 * mom["v"] + (1 - b2) * r * r
    u = (mom["m"] / (1 - b1**t)) / (mom["v"].sqrt() / math.sqrt(1 - b2**t) + eps)
    if scale_type == "tensor":
        s = u.norm() / (r.norm() + 1e-8)
    elif side == "right":  # one factor per row of G
        s = (u.norm(dim=1) / (r.norm(dim=1) + 1e-8))[:, None]
    else:  # one factor per column of G
        s = (u.norm(dim=0) / (r.norm(dim=0) + 1e-8))[None, :]
    back = (r @ p) if side == "right" else (p @ r)
    scaled = g * s if mode == "apollo" else (g - back) * s
    if gamma is not None and mom.get("prev") is not None:
        cap = gamma * (mom["prev"] + 1e-8)
        if scaled.norm() > cap:
            scaled = scaled * (cap / scaled.norm())
    mom["prev"] = scaled.norm()
    low_rank = 0.0 if mode == "apollo" else alpha * ((u @ p) if side == "right" else (p @ u))
    full = alpha * scaled if mode == "apollo" else scaled
    return w * (1 - lr * wd) - lr * (low_rank + full)


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(m, n, generator=gen, dtype=torch.float64) for m, n in SHAPES]
    data = [[(torch.randn(n, 12, generator=gen, dtype=torch.float64), torch.randn(m, 12, generator=gen,
                                                                                     dtype=torch.float64))
             for m, n in SHAPES] for _ in range(STEPS)]
    return weights, data


def _grad(w, x, y):
    return 2 * (w @ x - y) @ x.T  # d/dW ‖Wx − y‖²


@pytest.mark.parametrize("mode, projector", [("apollo", "random"), ("fira", "svd"), ("apollo", "dct"),
                                             ("fira", "random")])
@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_matches_the_papers_equations(mode, projector, scale_type):
    weights, data = _problem()
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    lr, wd, alpha, betas, eps, gamma = 0.03, 0.1, 0.7, (0.9, 0.99), 1e-6, 1.01
    opt = lrgrad.LowRankAdamW([{"params": params, "rank": RANK}], lr=lr, betas=betas, eps=eps, weight_decay=wd,
                              projector=projector, update_proj_gap=GAP, scale=alpha, full_rank=mode,
                              scale_type=scale_type, norm_growth_limit=gamma)
    group = opt.param_groups[0]
    ref = [w.clone() for w in weights]
    moms = [{"m": 0.0, "v": 0.0} for _ in SHAPES]
    for t, batch in enumerate(data, start=1):
        for p, (x, y) in zip(params, batch):
            p.grad = _grad(p.detach(), x, y)
        opt.step()
        for i, (p, (x, y)) in enumerate(zip(params, batch)):
            projector_obj = opt.projector_for(p, group)
            basis = projector_obj.basis(opt.state[p]).to(torch.float64)  # the subspace this step used
            ref[i] = _oracle_step(ref[i], _grad(ref[i], x, y), basis, projector_obj.side, moms[i], t, mode,
                                  scale_type, lr, wd, alpha, betas, eps, gamma)
            torch.testing.assert_close(p.detach(), ref[i], rtol=1e-10, atol=1e-12)
            assert float(opt.state[p][LIMITER_KEY]) == pytest.approx(float(moms[i]["prev"]), rel=1e-10)
    assert opt.state[params[0]]["proj_refreshes"] >= 2 or projector == "dct"


def test_limiter_caps_the_norm_growth_at_gamma():
    # a gradient that jumps 100x: the applied update may grow by at most gamma per step
    w = torch.nn.Parameter(torch.zeros(16, 6, dtype=torch.float64))
    opt = lrgrad.APOLLOAdamW([{"params": [w], "rank": 2}], lr=1.0, betas=(0.9, 0.999), eps=0.0, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    norms = []
    for step in range(6):
        w.grad = torch.randn(16, 6, generator=gen, dtype=torch.float64) * (100.0 if step >= 2 else 1.0)
        before = w.detach().clone()
        opt.step()
        norms.append(float((w.detach() - before).norm()))
    for a, b in zip(norms[1:], norms[2:]):
        assert b <= 1.01 * (a + 1e-8) * (1 + 1e-12)
    assert norms[2] == pytest.approx(1.01 * (norms[1] + 1e-8), rel=1e-12)  # the jump was limited
    assert opt.state[w][LIMITER_KEY].dim() == 0 and opt.state[w][LIMITER_KEY].dtype == torch.float64
    assert float(opt.state[w][LIMITER_KEY]) == pytest.approx(norms[-1], rel=1e-10)


def test_without_limiter_the_step_follows_the_gradient_jump():
    w = torch.nn.Parameter(torch.zeros(16, 6, dtype=torch.float64))
    opt = lrgrad.APOLLOAdamW([{"params": [w], "rank": 2}], lr=1.0, betas=(0.9, 0.999), eps=0.0, weight_decay=0.0,
                             norm_growth_limit=None)
    gen = torch.Generator().manual_seed(0)
    norms = []
    for step in range(3):
        w.grad = torch.randn(16, 6, generator=gen, dtype=torch.float64) * (100.0 if step >= 2 else 1.0)
        before = w.detach().clone()
        opt.step()
        norms.append(float((w.detach() - before).norm()))
    assert norms[2] > 2 * norms[1]


@pytest.mark.parametrize("bad, error", [
    ({"full_rank": "galore"}, ValueError), ({"scale_type": "row"}, ValueError),
    ({"norm_growth_limit": 0.5}, ValueError), ({"norm_growth_limit": "1.01"}, TypeError),
    ({"norm_growth_limit": float("inf")}, ValueError), ({"norm_growth_limit": True}, TypeError),
])
def test_bad_options_name_the_parameter(bad, error):
    key = next(iter(bad))
    with pytest.raises(error, match=key):
        lrgrad.LowRankAdamW([torch.nn.Parameter(torch.zeros(4, 4))], rank=2, **{"full_rank": "apollo", **bad})


def test_apply_low_rank_without_the_full_gradient_is_refused():
    w = torch.nn.Parameter(torch.randn(8, 6))
    opt = lrgrad.FiraAdamW([{"params": [w], "rank": 2}])
    group = opt.param_groups[0]
    prepared = opt.prepare_grad(w, group, torch.randn(8, 6))
    low = opt.project_grad(w, group, prepared)
    assert opt.needs_full_grad(w, group)
    with pytest.raises(ValueError, match="grad"):
        opt.apply_low_rank(w, group, low)


def test_full_rank_params_and_unprojected_groups_are_plain_adamw():
    # 1-D params (and matrices too small for the rank) are not touched by full_rank
    gen = torch.Generator().manual_seed(1)
    b1 = torch.nn.Parameter(torch.randn(5, generator=gen))
    b2 = torch.nn.Parameter(b1.detach().clone())
    opt = lrgrad.APOLLOAdamW([{"params": [b1], "rank": 2}], lr=0.1)
    ref = torch.optim.AdamW([b2], lr=0.1)
    for _ in range(3):
        g = torch.randn(5, generator=gen)
        b1.grad, b2.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(b1, b2)
    assert not opt.needs_full_grad(b1, opt.param_groups[0])
    assert LIMITER_KEY not in opt.state[b1]


def test_apollo_mini_state_is_two_max_side_vectors_and_a_scalar():
    # rank 1: 2·max(m, n) + 1 numbers per projected matrix, nothing stored for the projection
    w = torch.nn.Parameter(torch.randn(128, 64))
    v = torch.nn.Parameter(torch.randn(64, 128))
    opt = lrgrad.APOLLOMiniAdamW([w, v])
    for p in (w, v):
        p.grad = torch.randn_like(p)
    opt.step()
    assert lrgrad.optimizer_state_bytes(opt) == 2 * (2 * 128 + 1) * 4
    adamw = torch.optim.AdamW([w, v])
    adamw.step()
    state_adamw = sum(t.numel() * t.element_size() for s in adamw.state.values() for k, t in s.items()
                      if k != "step")
    assert lrgrad.optimizer_state_bytes(opt) / state_adamw < 0.02


def test_estimator_counts_the_limiter():
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 16))
    est = lrgrad.estimate_memory(model, optimizer="apollo_mini", rank=1)
    opt = make_optimizer(model, "apollo_mini", rank=1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert est.optimizer_state + est.projector_state == lrgrad.optimizer_state_bytes(opt)
