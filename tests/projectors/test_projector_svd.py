"""The SVD projector: sides and shapes, routing by rank, the refresh schedule, randomized SVD."""

from __future__ import annotations

import pytest
import torch
from galore_reference import gapped_gradients, run_lrgrad

import lrgrad
from lrgrad.projectors.svd import randomized_basis, top_singular_basis

# ---------------------------------------------------------------- projector behaviour


@pytest.mark.parametrize("shape,side", [((40, 24), "right"), ((24, 40), "left")])
def test_std_side_rule_and_shapes(shape, side):
    w = torch.nn.Parameter(torch.randn(*shape))
    opt = lrgrad.GaLoreAdamW([w], rank=5)
    w.grad = torch.randn(*shape)
    opt.step()
    state = opt.state[w]
    m, n = shape
    assert state["exp_avg"].shape == ((m, 5) if side == "right" else (5, n))
    assert state["proj_basis"].shape == ((5, n) if side == "right" else (m, 5))
    basis = state["proj_basis"]
    gram = basis @ basis.T if side == "right" else basis.T @ basis
    torch.testing.assert_close(gram, torch.eye(5), atol=1e-5, rtol=0)
    # the basis storage is exactly r x n (m x r), not the whole SVD factor
    assert basis.untyped_storage().nbytes() == basis.numel() * basis.element_size()


@pytest.mark.parametrize("proj_type,expected", [("left", (5, 24)), ("right", (40, 5)), ("reverse_std", (5, 24))])
def test_explicit_sides(proj_type, expected):
    w = torch.nn.Parameter(torch.randn(40, 24))
    opt = lrgrad.GaLoreAdamW([w], rank=5, proj_type=proj_type)
    w.grad = torch.randn(40, 24)
    opt.step()
    assert opt.state[w]["exp_avg"].shape == expected


def test_rank_at_least_min_side_runs_full_rank_and_nd_params_are_viewed_2d():
    small = torch.nn.Parameter(torch.randn(6, 40))
    conv = torch.nn.Parameter(torch.randn(16, 4, 3, 3))  # viewed as 16 x 36
    bias = torch.nn.Parameter(torch.randn(16))
    opt = lrgrad.GaLoreAdamW([small, conv, bias], rank=6)
    for p in (small, conv, bias):
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[small]["exp_avg"].shape == small.shape and "proj_basis" not in opt.state[small]
    assert opt.state[conv]["exp_avg"].shape == (6, 36) or opt.state[conv]["exp_avg"].shape == (16, 6)
    assert opt.state[conv]["proj_basis"].shape in ((16, 6), (6, 36))
    assert opt.state[bias]["exp_avg"].shape == (16,)


def test_refresh_schedule_is_one_based():
    w = torch.nn.Parameter(torch.randn(30, 20))
    opt = lrgrad.GaLoreAdamW([w], rank=4, update_proj_gap=4)
    refreshed = []
    for t in range(1, 11):
        w.grad = torch.randn(30, 20)
        before = opt.state[w].get("proj_basis")
        opt.step()
        if before is None or not torch.equal(before, opt.state[w]["proj_basis"]):
            refreshed.append(t)
    assert refreshed == [1, 5, 9]


def test_randomized_svd_finds_the_same_subspace():
    g = gapped_gradients(60, 40, 6, 1)[0].float()
    exact = top_singular_basis(g, 6, "right")
    gen = torch.Generator().manual_seed(0)
    approx = randomized_basis(g, 6, "right", None, oversample=8, power_iters=2, generator=gen)
    torch.testing.assert_close(approx.T @ approx, exact.T @ exact, atol=1e-4, rtol=0)
    # warm start from the exact basis with no power iterations is already exact
    warm = randomized_basis(g, 6, "right", exact, oversample=4, power_iters=0, generator=gen)
    torch.testing.assert_close(warm.T @ warm, exact.T @ exact, atol=1e-4, rtol=0)
    left = randomized_basis(g.T.contiguous(), 6, "left", None, 8, 2, gen)
    torch.testing.assert_close(left @ left.T, exact.T @ exact, atol=1e-4, rtol=0)


def test_randomized_svd_trains_and_is_deterministic():
    grads = gapped_gradients(40, 24, 6, 6)
    w0 = torch.randn(40, 24, dtype=torch.float64)
    # "project" carries moments by the subspace itself, so the per-vector sign
    # ambiguity of the two SVDs cannot change the result
    a, _ = run_lrgrad(w0, grads, rank=6, update_proj_gap=2, svd="randomized", moment_policy="project")
    b, _ = run_lrgrad(w0, grads, rank=6, update_proj_gap=2, svd="randomized", moment_policy="project")
    assert torch.equal(a, b)
    exact, _ = run_lrgrad(w0, grads, rank=6, update_proj_gap=2, moment_policy="project")
    torch.testing.assert_close(a, exact, atol=1e-6, rtol=0)


def captured_energy(g: torch.Tensor, basis: torch.Tensor) -> float:
    """‖G Pᵀ‖²_F / ‖G‖²_F for a right basis P (r x n)."""
    return float((g @ basis.T).square().sum() / g.square().sum())


def test_warm_started_randomized_refresh_matches_exact_svd_quality():
    """A drifting top-r subspace plus dense noise (as between GaLore refreshes): the refresh
    warm-started from the previous basis with one power iteration keeps ≥ 99.5% of the energy the
    exact top-r subspace captures, and its principal angles to it stay small."""
    m, n, r = 96, 160, 16
    grads = gapped_gradients(m, n, r, 4, seed=5)
    gen = torch.Generator().manual_seed(0)
    previous = None
    for g in grads:
        g = g.float() + 0.05 * torch.randn(m, n, generator=gen)
        exact = top_singular_basis(g, r, "right")
        approx = randomized_basis(g, r, "right", previous, oversample=8, power_iters=1, generator=gen)
        torch.testing.assert_close(approx @ approx.T, torch.eye(r), atol=1e-4, rtol=0)  # orthonormal rows
        assert captured_energy(g, approx) >= 0.995 * captured_energy(g, exact)
        overlap = float((approx @ exact.T).square().sum() / r)  # mean cos² of the principal angles
        assert overlap >= 0.98
        previous = approx
