"""GoLore (arXiv:2410.11289): GaLore's SVD subspace up to ``golore_switch``, then seeded Haar-random
orthonormal subspaces; against the paper's equations (tests/oracles.py) in fp64 on both sides."""

from __future__ import annotations

import oracles
import pytest
import torch
from state_utils import regression_problem

import lrgrad

STEPS, GAP, RANK, LR, WD = 12, 3, 4, 0.02, 0.1
SHAPES = {"right": (20, 12), "left": (12, 20)}
BETAS, EPS = (0.9, 0.999), 1e-8


def _grad(w, x, y):
    return 2 * (w @ x - y) @ x.T


@pytest.mark.parametrize("switch", [0, 4])
@pytest.mark.parametrize("side", ["right", "left"])
def test_matches_the_paper(side, switch):
    """Refreshes on steps 1, 4, 7, 10: SVD while t <= switch, random after; m carried, v kept."""
    start, data = regression_problem(*SHAPES[side], STEPS, 8)
    w = torch.nn.Parameter(start.clone())
    opt = lrgrad.GoLoreAdamW([{"params": [w], "rank": RANK, "proj_type": side}], lr=LR, weight_decay=WD,
                             update_proj_gap=GAP, golore_switch=switch, svd="exact", scale=1.5)
    expected, state, basis = start.clone(), {}, None
    kinds = []
    for t, (x, y) in enumerate(data, start=1):
        w.grad = _grad(w.detach(), x, y)
        g = _grad(expected, x, y)
        opt.step()
        if (t - 1) % GAP == 0:
            if t <= switch:  # GaLore: the top-r singular vectors (the reference's torch.linalg.svd)
                u, _, vh = torch.linalg.svd(g, full_matrices=False)
                new = vh[:RANK] if side == "right" else u[:, :RANK]
                kinds.append("svd")
            else:  # GoLore: the seeded draw (gradient-free), read from the state; checked orthonormal
                new = opt.state[w]["proj_basis"]
                gram = new @ new.T if side == "right" else new.T @ new
                torch.testing.assert_close(gram, torch.eye(RANK, dtype=torch.float64), rtol=0, atol=1e-12)
                kinds.append("random")
            if basis is not None:
                oracles.golore_carry(state, basis, new, side)
            basis = new
        expected = oracles.projected_step("adamw", expected, g, basis, side, state, t, LR, WD, 1.5,
                                          {"betas": BETAS, "eps": EPS})
        torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-11)
    assert kinds == (["svd", "svd", "random", "random"] if switch else ["random"] * 4)
    assert float((expected - start).abs().max()) > 0.05


def test_random_frames_are_haar_and_seeded():
    """E[P Pᵀ] = (r/d) I for a uniformly random r-frame in d dimensions; a draw is a function of
    (param seed, step) alone: the same again after a restart, different at another step."""
    w = torch.nn.Parameter(torch.zeros(24, 8, dtype=torch.float64))  # left side: P is 24 x r
    opt = lrgrad.GoLoreAdamW([{"params": [w], "rank": 3, "proj_type": "left"}])
    group = opt.param_groups[0]
    state: dict = {}
    opt.init_param_state(w, group, state)
    projector = opt.projector_for(w, group)
    total = torch.zeros(24, 24, dtype=torch.float64)
    draws = 3000
    for step in range(1, draws + 1):
        projector.refresh(state, torch.zeros(24, 8, dtype=torch.float64), step, group)
        p = state["proj_basis"]
        total += p @ p.T
    torch.testing.assert_close(total / draws, torch.eye(24, dtype=torch.float64) * 3 / 24, rtol=0, atol=0.02)
    again: dict = {}
    opt.init_param_state(w, group, again)
    projector.refresh(again, torch.zeros(24, 8, dtype=torch.float64), draws, group)
    assert torch.equal(again["proj_basis"], state["proj_basis"])
    projector.refresh(again, torch.zeros(24, 8, dtype=torch.float64), draws - 1, group)
    assert not torch.allclose(again["proj_basis"], state["proj_basis"])


def test_bad_switch_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="golore_switch"):
        lrgrad.GoLoreAdamW([torch.nn.Parameter(torch.zeros(4, 4))], rank=2, golore_switch=-1)
    with pytest.raises(ValueError, match="golore_v_transfer"):
        lrgrad.GoLoreAdamW([torch.nn.Parameter(torch.zeros(4, 4))], rank=2, golore_v_transfer="mean")
