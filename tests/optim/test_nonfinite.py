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


def _chooses_from_the_gradient(name: str) -> bool:
    """Presets whose refresh picks the subspace from G itself (not a seeded draw, Conda's momentum or
    LDAdam's error-corrected G + e, which stay nonzero when G is zero)."""
    preset = lrgrad.optim.presets.preset_of(lrgrad.OPTIMIZERS[name])
    return preset.projector in ("svd", "qgalore", "dct", "grass", "online_pca")


@pytest.mark.parametrize("shape", [(40, 48), (48, 40)])
@pytest.mark.parametrize("name", [n for n in sorted(lrgrad.OPTIMIZERS) if _chooses_from_the_gradient(n)])
def test_an_all_zero_gradient_at_a_refresh_keeps_the_previous_subspace(name, shape):
    """A branch that saw no data on a refresh step (an MoE expert called on no tokens, an unused layer after
    ``zero_grad(set_to_none=False)``) has an all-zero gradient, whose SVD / DCT scores / row norms name no
    subspace: the refresh put an arbitrary basis in place for a whole gap, and the step applied the moments
    of the previous basis through it. It keeps the previous basis: the step equals one whose refresh never
    came, bit for bit, and counts no failure."""
    torch.manual_seed(0)
    w0 = torch.randn(shape)
    grads = [torch.randn(shape[0], 4) @ torch.randn(4, shape[1]) + 0.01 * torch.randn(shape) for _ in range(2)]
    grads.append(torch.zeros(shape))  # step 3: a refresh step with gap 2

    def run(gap):
        w = torch.nn.Parameter(w0.clone())
        opt = lrgrad.OPTIMIZERS[name]([w], lr=1e-2, rank=4, update_proj_gap=gap)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        return w, opt.state[w]

    refreshed, state = run(gap=2)
    never, reference = run(gap=1000)
    assert torch.equal(refreshed, never)
    assert state["proj_failures"] == 0
    for key, value in reference.items():
        if key.startswith("proj_") and isinstance(value, torch.Tensor):
            assert torch.equal(state[key], value), key
