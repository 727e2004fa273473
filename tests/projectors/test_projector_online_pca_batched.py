"""Online PCA's deferred, batched basis step (``OnlinePCAProjector.finish_deferred``): within one
optimizer step the small r x d work of every param (Adam on P, the drift check, the Cholesky QR) runs
batched across the group. It must leave every param and every state entry as the one-param-at-a-time
step (:meth:`OnlinePCAProjector.adam_step`) does, up to the rounding of batched GEMMs."""

from __future__ import annotations

import math

import pytest
import torch

import lrgrad
from lrgrad.projectors import online_pca
from lrgrad.projectors.online_pca import OnlinePCAProjector

#: two right-side and two left-side matrices, two of each shape, so every batch has more than one param
SHAPES = [(24, 16), (24, 16), (16, 30), (16, 30), (20, 12), (9,)]


def _one_at_a_time(cls, items):
    """The reference: each deferred step run alone, in order."""
    for projector, state, g, group in items:
        projector.adam_step(state, g, group)


def _run(steps: int, batched: bool, monkeypatch, dtype=torch.float64, nan_at: tuple[int, int] | None = None,
         device: str = "cpu", **options):
    """``steps`` OnlineSubspaceAdamW steps on SHAPES; returns the params and their states."""
    with monkeypatch.context() as patch:
        if not batched:
            patch.setattr(OnlinePCAProjector, "finish_deferred", classmethod(_one_at_a_time))
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype).to(device)) for s in SHAPES]
        opt = lrgrad.OnlineSubspaceAdamW(params, lr=1e-2, rank=4, **options)
        for t in range(steps):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=g, dtype=dtype).to(device)
                if nan_at == (t, i):
                    p.grad[0, 0] = math.nan
            opt.step()
        return [p.detach().clone() for p in params], [dict(opt.state[p]) for p in params], opt


def _assert_states_close(a, b, tol):
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            torch.testing.assert_close(a[key], b[key], rtol=tol, atol=tol, msg=key)
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("options", [
    {},                                                   # pca_lr 5e-3: a QR every step (drift > tol)
    {"pca_lr": 2e-4, "pca_ortho_tol": 1e-4, "pca_qr_every": 5},  # polar steps, periodic QRs, plain steps
    {"pca_lr": 1e-5, "pca_ortho_tol": None, "pca_qr_every": 0},   # no guard at all
    {"pca_lr": 0.3},                                      # drift past 0.5: Householder QR
], ids=["qr-every-step", "polar-and-periodic-qr", "no-guard", "large-drift"])
def test_batched_step_equals_one_param_at_a_time(monkeypatch, options):
    spy = []
    real = online_pca.batched_cholesky_qr
    monkeypatch.setattr(online_pca, "batched_cholesky_qr", lambda *a: spy.append(len(a[3])) or real(*a))
    w_batched, s_batched, opt = _run(12, True, monkeypatch, **options)
    w_single, s_single, _ = _run(12, False, monkeypatch, **options)
    assert spy, "the batched path was not taken"
    for a, b in zip(w_batched, w_single):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(s_batched, s_single):
        _assert_states_close(a, b, 1e-12)
    steps = {s["proj_step"] for s in s_batched if "proj_step" in s}
    assert steps == {11}  # the first step initialises P, each later one steps it


def test_all_three_guard_actions_occur_in_the_batched_runs(monkeypatch):
    """The parametrized settings above do reach a QR, a polar step and no correction."""
    seen = []
    real = OnlinePCAProjector.guard_action
    monkeypatch.setattr(OnlinePCAProjector, "guard_action", lambda self, t, d: seen.append(real(self, t, d)) or
                        real(self, t, d))
    _run(12, True, monkeypatch, pca_lr=2e-4, pca_ortho_tol=1e-4, pca_qr_every=5)
    assert {"qr", "polar", "none"} <= set(seen)


def test_fp32_batched_step_is_within_the_single_steps_rounding(monkeypatch):
    w_batched, s_batched, _ = _run(8, True, monkeypatch, dtype=torch.float32)
    w_single, s_single, _ = _run(8, False, monkeypatch, dtype=torch.float32)
    for a, b in zip(w_batched, w_single):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(s_batched, s_single):
        if "proj_basis" in a:
            torch.testing.assert_close(a["proj_basis"], b["proj_basis"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_a_nonfinite_gradient_in_the_batch_touches_only_its_param(monkeypatch, skip_nonfinite):
    """A NaN in one param's gradient at step 5: with the skip, that param keeps its whole state and the
    others step exactly as in the one-at-a-time run; without it, its basis step fails (old basis kept,
    ``proj_failures`` counted) and the other params' bases still step."""
    w_b, s_b, _ = _run(6, True, monkeypatch, nan_at=(5, 1), skip_nonfinite=skip_nonfinite)
    w_s, s_s, _ = _run(6, False, monkeypatch, nan_at=(5, 1), skip_nonfinite=skip_nonfinite)
    for i, (a, b) in enumerate(zip(s_b, s_s)):
        if i == 1 and not skip_nonfinite:
            assert a["proj_failures"] == b["proj_failures"] == 1
            torch.testing.assert_close(a["proj_basis"], b["proj_basis"], rtol=1e-12, atol=1e-12)
            continue
        _assert_states_close(a, b, 1e-12)
        torch.testing.assert_close(w_b[i], w_s[i], rtol=1e-12, atol=1e-12)
    if skip_nonfinite:
        assert s_b[1]["nonfinite_skips"] == 1 and s_b[1]["proj_step"] == s_b[0]["proj_step"] - 1


def test_moment_policy_project_steps_each_basis_at_once(monkeypatch):
    """Carrying the moments needs the new basis during the projection loop, so nothing is deferred."""
    calls = []
    monkeypatch.setattr(OnlinePCAProjector, "finish_deferred", classmethod(lambda cls, items: calls.append(len(items))))
    _, states, _ = _run(3, True, monkeypatch, moment_policy="project")
    assert calls == [] and all(s.get("proj_step") == 2 for s in states if "proj_basis" in s)


def test_rerun_and_resume_are_bit_identical(monkeypatch):
    """Batched steps stay deterministic: a run resumed from its state_dict halfway, and a rerun, end
    bit-identical to the straight run."""
    g = torch.Generator().manual_seed(3)
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(8)]

    def run(steps, state=None, start=None):
        params = [torch.nn.Parameter(torch.zeros(s) if start is None else start[i].clone())
                  for i, s in enumerate(SHAPES)]
        opt = lrgrad.OnlineSubspaceAdamW(params, lr=1e-2, rank=4)
        if state is not None:
            opt.load_state_dict(state)
        for step in steps:
            for p, grad in zip(params, step):
                p.grad = grad.clone()
            opt.step()
        return [p.detach().clone() for p in params], opt

    full, _ = run(grads)
    half, opt = run(grads[:4])
    resumed, _ = run(grads[4:], opt.state_dict(), half)
    again, _ = run(grads)
    for a, b, c in zip(full, resumed, again):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_each_param_gets_a_basis_of_its_own():
    """The batched QR writes every new basis into its own tensor: no two params share storage (a state
    dict of views into one batch buffer would save, and keep alive, the whole batch per param)."""
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES[:4]]
    opt = lrgrad.OnlineSubspaceAdamW(params, lr=1e-2, rank=4)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    pointers = [opt.state[p][key].untyped_storage().data_ptr() for p in params
                for key in ("proj_basis", "proj_exp_avg", "proj_exp_avg_sq")]
    assert len(set(pointers)) == len(pointers)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: make gpu-check runs it")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_step_on_cuda_equals_one_param_at_a_time(monkeypatch, dtype):
    """On a GPU the batched Gram matrices, Cholesky factors and triangular inverses take cuBLAS/cuSOLVER's
    batched paths: the result still equals the one-param-at-a-time step (fp64 to 1e-10, fp32 within the
    single step's own rounding), under a QR every step and under polar steps."""
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for options in ({}, {"pca_lr": 2e-4, "pca_ortho_tol": 1e-4, "pca_qr_every": 5}):
        w_b, s_b, _ = _run(8, True, monkeypatch, dtype=dtype, device="cuda", **options)
        w_s, s_s, _ = _run(8, False, monkeypatch, dtype=dtype, device="cuda", **options)
        for a, b in zip(w_b, w_s):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        for a, b in zip(s_b, s_s):
            if "proj_basis" in a:
                assert a["proj_basis"].is_cuda
                torch.testing.assert_close(a["proj_basis"], b["proj_basis"], rtol=tol, atol=tol)


def _deferred_items(bases: list[torch.Tensor], side: str) -> list[tuple]:
    """One deferred item per basis (r x d right, d x r left) with ``pca_lr=0``: the Adam step leaves P
    as given, so the batch's guard (a QR, the drift being far above ``pca_ortho_tol``) meets these P."""
    items = []
    for seed, p in enumerate(bases):
        rank = p.shape[0] if side == "right" else p.shape[1]
        projector = OnlinePCAProjector(rank, 1, side, {**OnlinePCAProjector.option_defaults, "pca_lr": 0.0})
        state = {"proj_basis": p.clone(), "proj_exp_avg": torch.zeros_like(p), "proj_exp_avg_sq": torch.zeros_like(p),
                 "proj_step": 0, "proj_lr0": 1.0, "proj_refreshes": 1, "proj_failures": 0, "proj_seed": seed,
                 "proj_orthonormal": False}
        items.append((projector, state, torch.zeros_like(p), {"lr": 1.0, "moment_policy": "keep"}))
    return items


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_qr_of_an_ill_conditioned_basis_is_householders(side, monkeypatch):
    """A near-singular P (smallest singular value 1e-2 ... 3e-4, κ² up to 1e7) in the batched path: its
    Gram matrix still has a Cholesky factor in fp32, but Cholesky QR's error grows as κ²·eps (‖QQᵀ − I‖
    ≈ 0.25 at κ² = 1e7). The batch must leave such a P to Householder QR, as the single path does
    (Cholesky QR only below ``CHOLESKY_QR_MAX_DRIFT``): every basis ends orthonormal to fp32 rounding,
    equal to ``torch.linalg.qr``'s in fp64 (diag(R) > 0) up to fp32's κ·eps, and flagged orthonormal."""
    gen = torch.Generator().manual_seed(0)
    rank, d = 6, 40
    bases, smallest_values = [], (1e-2, 1e-3, 3e-4, 0.9)
    for smallest in smallest_values:  # the last one well conditioned: the batch's Cholesky QR
        q, _ = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64))
        mix, _ = torch.linalg.qr(torch.randn(rank, rank, generator=gen, dtype=torch.float64))
        singular = torch.tensor([1.0, 0.9, 1.1, 1.0, 0.95, smallest], dtype=torch.float64)
        rows = (mix * singular) @ q.T  # r x d with the chosen singular values
        bases.append((rows if side == "right" else rows.T).float().contiguous())
    items = _deferred_items(bases, side)
    batched = []
    real = online_pca.batched_cholesky_qr
    monkeypatch.setattr(online_pca, "batched_cholesky_qr", lambda *a: batched.append(list(a[3])) or real(*a))
    OnlinePCAProjector.finish_deferred(items)
    assert batched == [[3]]  # one batch; its Cholesky QR takes only the well-conditioned P
    eye = torch.eye(rank, dtype=torch.float64)
    for (_, state, _, _), p, smallest in zip(items, bases, smallest_values):
        got = state["proj_basis"]
        rows = (got if side == "right" else got.T).double()
        assert state["proj_orthonormal"] and state["proj_failures"] == 0
        assert float(torch.linalg.matrix_norm(rows @ rows.T - eye)) < 1e-5
        q, r = torch.linalg.qr((p.T if side == "right" else p).double())  # Householder, in fp64
        q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
        # fp32 Householder moves the direction of the smallest singular value by ~κ·eps (κ ≈ 1/smallest)
        torch.testing.assert_close(rows, q.T, rtol=0, atol=3e-6 / smallest)
