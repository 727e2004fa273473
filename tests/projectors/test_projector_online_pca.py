"""OnlinePCAProjector / OnlineSubspaceAdamW (arXiv:2408.12857)."""

from __future__ import annotations

import pytest
import torch
from tiny_model import TinyLM, train

import lrgrad
from lrgrad.projectors.online_pca import (
    OnlinePCAProjector,
    orthonormality_drift,
    pca_loss,
    pca_loss_grad,
    pca_loss_grad_scaled,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("side", ["right", "left"])
def test_closed_form_gradient_equals_autograd(side):
    m, n, r = 11, 7, 3
    a = torch.randn(m, n, dtype=torch.float64, generator=gen(0))
    shape = (r, n) if side == "right" else (m, r)
    p = torch.randn(shape, dtype=torch.float64, generator=gen(1)).requires_grad_()  # not orthonormal
    (expected,) = torch.autograd.grad(pca_loss(a, p, side), p)
    torch.testing.assert_close(pca_loss_grad(a, p.detach(), side), expected, rtol=1e-12, atol=1e-12)
    # the loss itself is the definition
    pd = p.detach()
    direct = (a @ pd.T @ pd - a) if side == "right" else (pd @ pd.T @ a - a)
    torch.testing.assert_close(pca_loss(a, pd, side), direct.square().sum())


def make(side: str, rank: int = 3, **options) -> OnlinePCAProjector:
    opts = dict(OnlinePCAProjector.option_defaults)
    opts.update(options)
    return OnlinePCAProjector(rank, 1, side, opts)


def low_rank_gradient(m: int, n: int, r: int, seed: int) -> torch.Tensor:
    """A gradient with a clear top-r subspace (singular values 10, 9, 8, ... then noise)."""
    u, _ = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=gen(seed)))
    v, _ = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64, generator=gen(seed + 1)))
    s = torch.arange(10, 10 - r, -1, dtype=torch.float64)
    noise = 0.01 * torch.randn(m, n, dtype=torch.float64, generator=gen(seed + 2))
    return (u * s) @ v.T + noise


@pytest.mark.parametrize("side", ["right", "left"])
def test_loss_decreases_on_a_static_gradient_and_finds_its_subspace(side):
    m, n, r = 30, 20, 3
    g = low_rank_gradient(m, n, r, seed=5)
    proj = make(side, r, pca_init="random", pca_lr=0.05)
    state: dict = {}
    proj.init_state(state, (m, n), seed=7)
    group = {"lr": 1e-3}
    assert proj.refresh(state, g, 1, group)
    a = g / g.norm()
    losses = [float(pca_loss(a, state["proj_basis"], side))]
    for step in range(2, 202):
        assert proj.refresh(state, g, step, group)
        losses.append(float(pca_loss(a, state["proj_basis"], side)))
    assert losses[-1] < 0.01 * losses[0], (losses[0], losses[-1])
    assert all(b < a_ for a_, b in zip(losses[:8], losses[1:9]))  # steady descent (Adam may ripple later)
    # span(P) converged to the top-r singular subspace: overlap ‖P V_rᵀ‖²_F / r -> 1
    u, _, vh = torch.linalg.svd(g)
    p = state["proj_basis"]
    overlap = (p @ vh[:r].T if side == "right" else u[:, :r].T @ p).square().sum() / r
    assert overlap > 0.999
    assert state["proj_step"] == 200 and state["proj_refreshes"] == 201


@pytest.mark.parametrize("side", ["right", "left"])
def test_qr_guard_keeps_the_basis_orthonormal(side):
    m, n, r = 24, 16, 4
    unguarded = make(side, r, pca_lr=0.2, pca_qr_every=0, pca_ortho_tol=None)
    guarded = make(side, r, pca_lr=0.2, pca_qr_every=0, pca_ortho_tol=1e-3)
    periodic = make(side, r, pca_lr=0.2, pca_qr_every=1, pca_ortho_tol=None)
    drifts = {}
    for name, proj in (("unguarded", unguarded), ("guarded", guarded), ("periodic", periodic)):
        state: dict = {}
        proj.init_state(state, (m, n), seed=1)
        worst = 0.0
        for step in range(1, 16):
            g = torch.randn(m, n, dtype=torch.float64, generator=gen(100 + step))
            proj.refresh(state, g, step, {"lr": 1.0})
            worst = max(worst, float(orthonormality_drift(state["proj_basis"], side)))
        drifts[name] = worst
    assert drifts["unguarded"] > 0.1  # a large P step does leave the Stiefel manifold
    assert drifts["guarded"] <= 1e-3
    assert drifts["periodic"] < 1e-10


def test_random_init_makes_no_svd_call(monkeypatch):
    def no_svd(*args, **kwargs):
        raise AssertionError("SVD called")

    for module, name in ((torch.linalg, "svd"), (torch.linalg, "svdvals"), (torch, "svd"),
                         (torch, "svd_lowrank"), (torch, "pca_lowrank")):
        monkeypatch.setattr(module, name, no_svd)
    model = TinyLM()
    opt = lrgrad.OnlineSubspaceAdamW(lrgrad.param_groups(model, rank=8), lr=1e-2, pca_init="random")
    losses = train(model, opt, steps=15)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0]
    states = [s for s in opt.state.values() if "proj_basis" in s]
    assert states and all(s["proj_failures"] == 0 and s["proj_step"] == 14 for s in states)


def test_svd_init_is_the_top_singular_subspace(monkeypatch):
    g = low_rank_gradient(20, 12, 3, seed=2)
    proj = make("right", 3)
    state: dict = {}
    proj.init_state(state, (20, 12), seed=0)
    proj.refresh(state, g, 1, {"lr": 1e-3})
    _, _, vh = torch.linalg.svd(g)
    torch.testing.assert_close(state["proj_basis"].abs(), vh[:3].abs(), rtol=1e-10, atol=1e-10)
    assert state["proj_lr0"] == 1e-3 and state["proj_step"] == 0


def test_basis_changes_every_step_and_the_p_step_follows_the_main_schedule():
    m, n, r = 16, 10, 2
    g0 = torch.randn(m, n, dtype=torch.float64, generator=gen(0))
    g1 = torch.randn(m, n, dtype=torch.float64, generator=gen(1))
    deltas = []
    for lr in (1e-2, 5e-3, 0.0):  # lr_t / lr_0 = 1, 1/2, 0
        proj = make("right", r, pca_lr=1e-3, pca_qr_every=0, pca_ortho_tol=None)
        state: dict = {}
        proj.init_state(state, (m, n), seed=0)
        proj.refresh(state, g0, 1, {"lr": 1e-2})
        before = state["proj_basis"]
        assert proj.refresh(state, g1, 2, {"lr": lr})
        assert state["proj_basis"] is not before  # a new tensor: the old basis is never written
        deltas.append(state["proj_basis"] - before)
    # the first Adam step moves every entry by lr_P (up to eps): lr_P = pca_lr * lr_t / lr_0
    torch.testing.assert_close(deltas[0].abs(), torch.full_like(deltas[0], 1e-3), rtol=1e-4, atol=0)
    torch.testing.assert_close(deltas[1], deltas[0] / 2, rtol=1e-12, atol=1e-15)
    assert torch.all(deltas[2] == 0)


def test_scheduler_initial_lr_is_lr0():
    model = TinyLM()
    opt = lrgrad.OnlineSubspaceAdamW(lrgrad.param_groups(model, rank=8), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.1)  # warm start at 0.1 x the base lr
    train(model, opt, steps=1)
    sched.step()
    for state in opt.state.values():
        if "proj_lr0" in state:
            assert state["proj_lr0"] == 1e-2


def test_nonfinite_gradient_keeps_basis_and_p_state():
    proj = make("right", 2)
    state: dict = {}
    proj.init_state(state, (6, 5), seed=0)
    proj.refresh(state, torch.randn(6, 5), 1, {"lr": 1.0})
    proj.refresh(state, torch.randn(6, 5), 2, {"lr": 1.0})
    snapshot = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    bad = torch.randn(6, 5)
    bad[1, 1] = float("inf")
    assert not proj.refresh(state, bad, 3, {"lr": 1.0})
    for key, value in snapshot.items():
        if key == "proj_failures":
            assert state[key] == value + 1
        elif isinstance(value, torch.Tensor):
            assert torch.equal(state[key], value), key
        else:
            assert state[key] == value, key


@pytest.mark.parametrize("name", ["OnlineSubspaceAdamW", "OnlineSubspaceLion"])
def test_presets_refresh_every_step_and_train(name):
    model = TinyLM()
    cls = lrgrad.OPTIMIZERS[name]
    lr = 3e-3 if "Lion" in name else 1e-2
    opt = cls(lrgrad.param_groups(model, rank=8), lr=lr)
    losses = train(model, opt, steps=20)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0]
    checked = 0
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if "proj_basis" in state:
                side = opt.projector_for(p, group).side
                assert state["proj_refreshes"] == 20 and state["proj_step"] == 19
                assert float(orthonormality_drift(state["proj_basis"], side)) <= 1e-3
                checked += 1
    assert checked == 14


@pytest.mark.parametrize(("key", "value", "error"), [
    ("pca_init", "svd_lowrank", ValueError), ("pca_lr", -1.0, ValueError), ("pca_qr_every", -1, ValueError),
    ("pca_qr_every", 2.0, TypeError), ("pca_ortho_tol", 0.0, ValueError), ("pca_betas", (0.9,), TypeError),
])
def test_bad_options_are_rejected(key, value, error):
    with pytest.raises(error, match=key):
        lrgrad.OnlineSubspaceAdamW(TinyLM().parameters(), rank=8, **{key: value})


@pytest.mark.parametrize("side", ["right", "left"])
def test_scaled_gradient_equals_the_reference_on_the_normalized_matrix(side):
    """The step's fast form (scale on the small products) against pca_loss_grad(G / ‖G‖, P)."""
    m, n, r = 40, 30, 5
    g = torch.randn(m, n, dtype=torch.float64, generator=gen(3)) * 50
    shape = (r, n) if side == "right" else (m, r)
    p = torch.randn(shape, dtype=torch.float64, generator=gen(4))
    scale = 1 / torch.linalg.vector_norm(g)
    expected = pca_loss_grad(g * scale, p, side)
    torch.testing.assert_close(pca_loss_grad_scaled(g, scale, p, side), expected, rtol=1e-12, atol=1e-14)
    got32 = pca_loss_grad_scaled(g.float(), scale.float(), p.float(), side)
    torch.testing.assert_close(got32, expected.float(), rtol=1e-4, atol=1e-6)  # fp32: rounding only


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_the_pca_step_and_the_projection_share_one_gemm(monkeypatch, shape):
    """After the first (SVD) step, ``down(G)`` is the PCA step's own ``G P_tᵀ`` product (P_t: the
    basis the step started from): no second projection GEMM, and R_t equals G P_tᵀ."""
    import lrgrad.projectors.base as base

    calls = []
    original = base.kernels.project_down

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(base.kernels, "project_down", counting)
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    opt = lrgrad.OnlineSubspaceAdamW([w], lr=1e-2, rank=4)
    seen = []
    original_update = opt.rule_for(opt.param_groups[0]).__class__.update_many

    def spy(rule, states, grads, steps, reuse_grads=False):
        seen.append(grads[0].clone())
        return original_update(rule, states, grads, steps, reuse_grads)

    monkeypatch.setattr(type(opt.rule_for(opt.param_groups[0])), "update_many", spy)
    for step in range(1, 4):
        w.grad = torch.randn(*shape, dtype=torch.float64)
        before = opt.state[w]["proj_basis"].clone() if opt.state[w] else None
        opt.step()
        assert len(calls) == (1 if step == 1 else 0)
        calls.clear()
        if before is not None:
            want = w.grad @ before.T if shape[0] >= shape[1] else before.T @ w.grad
            torch.testing.assert_close(seen[-1], want, rtol=1e-12, atol=1e-12)
            assert not torch.equal(opt.state[w]["proj_basis"], before)  # the update goes back through P_{t+1}


def perturbed_basis(side: str, d: int, r: int, size: float, seed: int):
    """An orthonormal d x r basis (r x d on the right side) plus noise of Frobenius norm ``size``,
    with the drift check's (P Pᵀ − I, ‖P Pᵀ − I‖_F) in fp64."""
    from lrgrad.projectors.online_pca import gram_and_drift

    g = gen(seed)
    q, _ = torch.linalg.qr(torch.randn(d, r, dtype=torch.float64, generator=g))
    p = q.T if side == "right" else q
    noise = torch.randn(p.shape, dtype=torch.float64, generator=g)
    p = p + noise * (size / noise.norm())
    deviation, drift = gram_and_drift(p, side)
    return p, deviation, float(drift)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("delta", [1e-3, 1e-2, 5e-2])
def test_polar_step_squares_the_drift_and_moves_toward_the_polar_factor(side, delta):
    """E → −(3/4)E² + E³/4 per eigenvalue: the drift after one step is at most (3/4)δ² + δ³/4, and the
    result is closer to the polar factor U Vᵀ (the nearest orthonormal matrix) than P was."""
    from lrgrad.projectors.online_pca import polar_step

    p, deviation, drift = perturbed_basis(side, 40, 6, delta / 4, seed=11)
    new = polar_step(p, deviation, side)
    assert float(orthonormality_drift(new, side)) <= 0.75 * drift**2 + 0.25 * drift**3 + 1e-14
    u, _, vh = torch.linalg.svd(p, full_matrices=False)
    polar = u @ vh
    assert (new - polar).norm() < (p - polar).norm()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-14)])
def test_fused_basis_adam_matches_the_op_by_op_reference(dtype, tol):
    from lrgrad.projectors.online_pca import adam_step_, adam_step_reference_

    g = gen(4)
    p0 = torch.randn(8, 32, dtype=dtype, generator=g)
    a = [p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)]
    b = [p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)]
    for t in range(1, 21):
        grad = torch.randn(32, 8, dtype=dtype, generator=g).T  # transposed, as the left side's
        adam_step_(a[0], grad, a[1], a[2], t, 5e-3, 0.9, 0.999, 1e-8)
        adam_step_reference_(b[0], grad, b[1], b[2], t, 5e-3, 0.9, 0.999, 1e-8)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol * 1e-3)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("delta", [1e-2, 0.3, 0.45, 2.0])
def test_cholesky_qr_is_the_householder_qr(side, delta):
    """With the drift check's Gram matrix, orthonormalize() is Cholesky QR below drift 0.5 and Householder
    above: the same Q (QR with diag(R) > 0 is unique) to rounding, orthonormal to 1e-12."""
    from lrgrad.projectors.online_pca import orthonormalize

    p, deviation, drift = perturbed_basis(side, 48, 8, delta / 3, seed=21)
    fast = orthonormalize(p, side, deviation, drift)
    householder = orthonormalize(p, side)
    torch.testing.assert_close(fast, householder, rtol=0, atol=1e-12)
    assert float(orthonormality_drift(fast, side)) < 1e-12


@pytest.mark.parametrize("side", ["right", "left"])
def test_orthonormal_shortcut_equals_the_general_form_to_rounding(side):
    """``2 (K P − C)`` (P fresh from a QR, M = I) against ``2 (M C + K P − 2 C)``: equal to fp64
    rounding in fp64, and in fp32 closer than the general form's own fp32 rounding."""
    from lrgrad.projectors.online_pca import pca_grad_from_sums

    m, n, r = 40, 30, 5
    a = torch.randn(m, n, dtype=torch.float64, generator=gen(5))
    a = a / a.norm()
    q, _ = torch.linalg.qr(torch.randn(n if side == "right" else m, r, dtype=torch.float64, generator=gen(6)))
    p = q.T if side == "right" else q

    def both(a, p):  # the left side is the right side of Aᵀ
        a, p = (a, p) if side == "right" else (a.T, p.T)
        b = a @ p.T
        grads = [pca_grad_from_sums(p, b.T @ a, b.T @ b, orthonormal=o) for o in (False, True)]
        return grads if side == "right" else [x.T for x in grads]

    general, short = both(a, p)
    torch.testing.assert_close(short, general, rtol=0, atol=1e-14)
    general32, short32 = both(a.float(), p.float())
    assert float((short32.double() - general).norm()) <= float((general32.double() - general).norm()) + 1e-7


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_shortcut_runs_only_when_the_basis_is_orthonormal(monkeypatch, side):
    """The flag is set by the initial basis and by a QR, cleared by a polar step or no correction:
    every step that takes ``M = I`` starts from a basis orthonormal to rounding, and steps after a
    polar step (drift up to tol / 2) take the general form."""
    import lrgrad.projectors.online_pca as pca

    m, n, r = 24, 16, 4
    seen = []
    real = pca.pca_grad_from_projection

    def spy(grad, projected, scale, p, orthonormal=False):
        seen.append((orthonormal, float(pca.orthonormality_drift(p, "right"))))
        return real(grad, projected, scale, p, orthonormal)

    monkeypatch.setattr(pca, "pca_grad_from_projection", spy)
    # small P steps: the drift stays near the tolerance, so polar steps and QRs (every 5th) both occur
    proj = make(side, r, pca_lr=2e-4, pca_qr_every=5, pca_ortho_tol=1e-4)
    state: dict = {}
    proj.init_state(state, (m, n), seed=1)
    for step in range(1, 21):
        g = torch.randn(m, n, dtype=torch.float64, generator=gen(200 + step))
        proj.refresh(state, g, step, {"lr": 1.0})
    flags = [flag for flag, _ in seen]
    assert flags[0] is True and any(flags[1:]) and not all(flags)
    assert all(drift < 1e-12 for flag, drift in seen if flag)
    assert any(drift > 1e-8 for flag, drift in seen if not flag)  # a polar-corrected basis took the general form
