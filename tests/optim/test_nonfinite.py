"""Robustness: non-finite gradients and failed SVDs never corrupt weights or the basis."""

from __future__ import annotations

import pytest
import torch

import lrgrad

# ---------------------------------------------------------------- robustness


def test_nonfinite_gradient_is_skipped_and_basis_stays_finite():
    w = torch.nn.Parameter(torch.randn(30, 20))
    bias = torch.nn.Parameter(torch.randn(20))
    opt = lrgrad.GaLoreAdamW([w, bias], rank=4, update_proj_gap=1, skip_nonfinite=True)
    w.grad, bias.grad = torch.randn(30, 20), torch.randn(20)
    opt.step()
    before_w, before_b, basis = w.clone(), bias.clone(), opt.state[w]["proj_basis"].clone()
    bad = torch.randn(30, 20)
    bad[3, 4] = float("nan")
    w.grad, bias.grad = bad, torch.full((20,), float("inf"))
    opt.step()
    assert torch.equal(w, before_w) and torch.equal(bias, before_b)
    assert torch.equal(opt.state[w]["proj_basis"], basis)
    assert opt.state[w]["nonfinite_skips"] == 1 and opt.state[bias]["nonfinite_skips"] == 1
    assert opt.state[w]["step"] == 1
    w.grad, bias.grad = torch.randn(30, 20), torch.randn(20)
    opt.step()
    assert torch.isfinite(w).all() and opt.state[w]["step"] == 2


def test_nonfinite_first_gradient_without_check_never_enters_basis():
    w = torch.nn.Parameter(torch.randn(30, 20))
    opt = lrgrad.GaLoreAdamW([w], rank=4, skip_nonfinite=False)
    w.grad = torch.full((30, 20), float("nan"))
    opt.step()
    assert "proj_basis" not in opt.state[w] and opt.state[w]["proj_failures"] == 1
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("svd, solver", [("gram", "eigh"), ("exact", "svd")])
def test_svd_failure_keeps_previous_basis(monkeypatch, svd, solver):
    w = torch.nn.Parameter(torch.randn(30, 20))
    opt = lrgrad.GaLoreAdamW([w], rank=4, update_proj_gap=1, svd=svd)
    w.grad = torch.randn(30, 20)
    opt.step()
    basis = opt.state[w]["proj_basis"]

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, solver, broken)
    w.grad = torch.randn(30, 20)
    opt.step()
    assert opt.state[w]["proj_basis"] is basis and opt.state[w]["proj_failures"] == 1
    assert opt.state[w]["step"] == 2  # the step still ran in the old subspace


def test_default_is_unguarded_like_torch_adamw_but_nan_never_enters_a_basis():
    """``skip_nonfinite`` defaults to False (torch.optim.AdamW's semantics, no extra read, no sync): a NaN
    gradient entry reaches the weights exactly where AdamW's does, while a refresh on that step keeps the
    previous basis (counted in ``proj_failures``) instead of taking an SVD of NaN."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(30, 20))
    bias = torch.nn.Parameter(torch.randn(20))
    twin = torch.nn.Parameter(bias.detach().clone())
    opt = lrgrad.GaLoreAdamW([w, bias], lr=1e-2, rank=4, update_proj_gap=1)
    assert opt.param_groups[0]["skip_nonfinite"] is False
    ref = torch.optim.AdamW([twin], lr=1e-2)
    grads = [torch.randn(20), torch.randn(20)]
    grads[1][5] = float("nan")
    basis = None
    for i, g in enumerate(grads):
        w.grad = torch.randn(30, 20)
        if i == 1:
            w.grad[3, 4] = float("nan")
        bias.grad, twin.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        if i == 0:
            basis = opt.state[w]["proj_basis"].clone()
    assert torch.equal(torch.isnan(bias), torch.isnan(twin)) and torch.isnan(bias).sum() == 1
    finite = ~torch.isnan(twin)
    torch.testing.assert_close(bias[finite], twin[finite])
    assert torch.equal(opt.state[w]["proj_basis"], basis) and opt.state[w]["proj_failures"] == 1
    assert "nonfinite_skips" not in opt.state[w] and opt.state[w]["step"] == 2
