"""``Projector.transition`` on both sides, for every registered projector: the r x r change of
coordinates that ``moment_policy="project"`` applies to the rule's moments at a refresh.

The contract (lrgrad/projectors/base.py): right side ``x_new = x T`` with ``T = P_old P_newᵀ``; left
side ``x_new = T x`` with ``T = P_newᵀ P_old``; either way exactly ``down_new(up_old(x))``. The oracle
writes that composition out with the two dense bases (read through ``basis(state)``) in fp64:
up_old(x) = x P_old (right) / P_old x (left), then down_new(y) = y P_newᵀ / P_newᵀ y. The old state is
the shallow copy the optimizer takes before a refresh, so this also checks that a refresh assigns a
new basis instead of writing into the old one."""

from __future__ import annotations

import pytest
import torch

import lrgrad
from lrgrad.projectors import PROJECTORS

RANK = 4
#: a tall matrix; proj_type picks the side
SHAPE = (24, 16)


def _two_subspaces(projector: str, side: str):
    """A refresh on one gradient, then on an unrelated one: the projector and the states before and after."""
    w = torch.nn.Parameter(torch.zeros(*SHAPE, dtype=torch.float64))
    opt = lrgrad.LowRankOptimizer([w], lr=1e-2, rule="adamw", projector=projector, rank=RANK, update_proj_gap=1,
                                  proj_type=side, moment_policy="project")
    gen = torch.Generator().manual_seed(0)
    w.grad = torch.randn(*SHAPE, generator=gen, dtype=torch.float64)
    opt.step()
    old = dict(opt.state[w])  # the optimizer's own view of the old subspace: a shallow copy
    old_basis = opt.projector_for(w, opt.param_groups[0]).basis(old).clone()
    w.grad = torch.randn(*SHAPE, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3.0, SHAPE[1],
                                                                                        dtype=torch.float64)
    opt.step()
    proj = opt.projector_for(w, opt.param_groups[0])
    assert proj.side == side
    return proj, old, opt.state[w], old_basis


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("projector", sorted(PROJECTORS))
def test_transition_is_down_new_of_up_old(projector, side):
    proj, old, new, old_basis = _two_subspaces(projector, side)
    # Q-GaLore's dequantized INT4 basis is fp32 whatever the param's dtype: fp32 rounding then
    tol = 1e-10 if proj.basis(new).dtype == torch.float64 else 1e-6
    p_old, p_new = proj.basis(old).double(), proj.basis(new).double()
    torch.testing.assert_close(p_old, old_basis.double(), rtol=0, atol=0)  # the refresh left the old basis alone
    assert not torch.allclose(p_old, p_new), "the second refresh did not move the subspace"
    t = proj.transition(old, new).double()
    assert t.shape == (RANK, RANK)
    gen = torch.Generator().manual_seed(1)
    m, n = SHAPE
    if side == "right":  # low-rank coordinates are m x r
        x = torch.randn(m, RANK, generator=gen, dtype=torch.float64)
        oracle = (x @ p_old) @ p_new.T
        got = x @ t
    else:  # r x n
        x = torch.randn(RANK, n, generator=gen, dtype=torch.float64)
        oracle = p_new.T @ (p_old @ x)
        got = t @ x
    torch.testing.assert_close(got, oracle, rtol=tol, atol=tol)
    # the projector's own maps compose to the same change of coordinates
    through_maps = proj.down(new, proj.up(old, x))
    torch.testing.assert_close(through_maps.double(), oracle, rtol=tol, atol=tol)


@pytest.mark.parametrize("side", ["right", "left"])
def test_carried_first_moment_is_the_transition_of_the_old_one(side):
    """``moment_policy="project"`` on the SVD projector: AdamW's first moment (a linear key) after a
    refresh is ``down_new(up_old(m))`` of the moment before it, on either side."""
    w = torch.nn.Parameter(torch.zeros(*SHAPE, dtype=torch.float64))
    opt = lrgrad.GaLoreAdamW([w], lr=1e-2, rank=RANK, update_proj_gap=2, proj_type=side, moment_policy="project",
                             betas=(0.0, 0.999))  # β1 = 0: after the carry, m is exactly this step's R
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        w.grad = torch.randn(*SHAPE, generator=gen, dtype=torch.float64)
        opt.step()
    old = dict(opt.state[w])
    w.grad = torch.randn(*SHAPE, generator=gen, dtype=torch.float64)
    carried = {}
    proj_cls = PROJECTORS["svd"]
    real = proj_cls.carry_moments

    def spy(self, rule, state, old_state):
        real(self, rule, state, old_state)
        carried["exp_avg"] = state["exp_avg"].clone()

    proj_cls.carry_moments = spy
    try:
        opt.step()
    finally:
        proj_cls.carry_moments = real
    p_old, p_new = old["proj_basis"], opt.state[w]["proj_basis"]
    m_old = old["exp_avg"]
    expected = (m_old @ p_old) @ p_new.T if side == "right" else p_new.T @ (p_old @ m_old)
    torch.testing.assert_close(carried["exp_avg"], expected, rtol=1e-10, atol=1e-12)
