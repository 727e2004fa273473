"""Robustness: non-finite gradients and failed SVDs never corrupt weights or the basis."""

from __future__ import annotations

import pytest
import torch

import lrgrad

# ---------------------------------------------------------------- robustness


def test_nonfinite_gradient_is_skipped_and_basis_stays_finite():
    w = torch.nn.Parameter(torch.randn(30, 20))
    bias = torch.nn.Parameter(torch.randn(20))
    opt = lrgrad.GaLoreAdamW([w, bias], rank=4, update_proj_gap=1)
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
