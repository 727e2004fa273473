"""DCTProjector / DCTAdamW (arXiv:2505.17967): shared basis, int32 state, FFT path, aligned moments."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_model import TinyLM, train

import lrgrad
from lrgrad.projectors.dct import (
    DCTProjector,
    clear_dct_cache,
    dct_basis,
    dct_basis_rows,
    dct_cached_bytes,
    dct_coefficients,
    dct_fft,
    select_indices,
)
from lrgrad.rules.adamw import AdamWRule


def explicit_dct(d: int) -> torch.Tensor:
    """Q[j, k] by the textbook formula, element by element (fp64)."""
    q = torch.empty(d, d, dtype=torch.float64)
    for j in range(d):
        for k in range(d):
            c = math.sqrt(1.0 / d) if k == 0 else math.sqrt(2.0 / d)
            q[j, k] = c * math.cos(math.pi * (2 * j + 1) * k / (2 * d))
    return q


@pytest.mark.parametrize("d", [1, 2, 7, 16])
def test_basis_is_the_orthonormal_dct_ii_with_columns_as_vectors(d):
    q = dct_basis(d, dtype=torch.float64)
    torch.testing.assert_close(q, explicit_dct(d), rtol=0, atol=1e-12)
    torch.testing.assert_close(q.T @ q, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-12)
    # built once per (d, device, dtype) and shared
    assert dct_basis(d, dtype=torch.float64) is q


@pytest.mark.parametrize("side", ["right", "left"])
def test_gathered_basis_is_q_columns_from_one_cached_storage(side):
    """The projector gathers its r vectors as rows of the contiguous Qᵀ; they must be exactly Q's
    columns at the stored indices, and Q and Qᵀ must be one storage (counted once in the state bytes)."""
    clear_dct_cache()
    d, rank = 24, 5
    rows = dct_basis_rows(d)
    q = dct_basis(d)
    assert rows.is_contiguous() and q.data_ptr() == rows.data_ptr() and torch.equal(q, rows.T)
    assert dct_cached_bytes() == d * d * 4
    w = torch.nn.Parameter(torch.randn(40, d) if side == "right" else torch.randn(d, 40))
    opt = lrgrad.DCTAdamW([w], rank=rank, proj_type=side)
    w.grad = torch.randn_like(w)
    opt.step()
    state = opt.state[w]
    idx = state["proj_indices"].long()
    projector = opt.projector_for(w, opt.param_groups[0])
    expected = q[:, idx]  # d x r, the textbook column gather
    basis = projector.basis(state)
    assert torch.equal(basis, expected.T if side == "right" else expected)
    assert dct_cached_bytes() == d * d * 4


@pytest.mark.parametrize("shape", [(6, 16), (5, 17), (33, 9), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fft_path_equals_matmul_path_with_q_not_q_transposed(shape, dtype):
    g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    q_right = explicit_dct(shape[1]).to(dtype)
    q_left = explicit_dct(shape[0]).to(dtype)
    right_fft = dct_coefficients(g, "right", "fft")
    left_fft = dct_coefficients(g, "left", "fft")
    torch.testing.assert_close(right_fft, g @ q_right, rtol=tol, atol=tol)
    torch.testing.assert_close(left_fft, q_left.T @ g, rtol=tol, atol=tol)
    torch.testing.assert_close(right_fft, dct_coefficients(g, "right", "matmul"), rtol=tol, atol=tol)
    torch.testing.assert_close(left_fft, dct_coefficients(g, "left", "matmul"), rtol=tol, atol=tol)
    if shape[1] > 2:  # Q is not symmetric: the transposed basis (the reference's bug) differs
        assert not torch.allclose(right_fft, g @ q_right.T, rtol=1e-3, atol=1e-3)
    # dct_fft along dim 0 of Gᵀ is the right-side transform transposed
    torch.testing.assert_close(dct_fft(g.T, dim=0), right_fft.T, rtol=tol, atol=tol)


def make_projector(rank: int, side: str, scores: str = "matmul") -> DCTProjector:
    return DCTProjector(rank, 1, side, {"dct_scores": scores})


@pytest.mark.parametrize("side", ["right", "left"])
def test_selection_is_the_top_energy_basis_vectors_sorted_int32(side):
    d, r = 24, 4
    chosen = [17, 3, 11, 20]
    q = dct_basis(d, dtype=torch.float64)
    coeff = torch.randn(10, r, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    coeff = coeff + torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)  # clearly dominant columns
    g = coeff @ q[:, chosen].T  # rows live in span(Q[:, chosen])
    g = g + 1e-3 * torch.randn(10, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    if side == "left":
        g = g.T.contiguous()
    proj = make_projector(r, side)
    state: dict = {}
    proj.init_state(state, tuple(g.shape), seed=0)
    assert proj.refresh(state, g, 1, {})
    idx = state["proj_indices"]
    assert idx.dtype == torch.int32 and idx.tolist() == sorted(chosen)
    # same gradient again: same selection, nothing changed
    assert not proj.refresh(state, g, 2, {})
    # the basis is Q[:, idx]ᵀ (right) / Q[:, idx] (left), and down() equals the selected coefficients
    state["exp_avg"] = torch.zeros(1, dtype=torch.float64)  # gives basis() its dtype
    cols = q[:, sorted(chosen)]
    torch.testing.assert_close(proj.basis(state), cols.T if side == "right" else cols)
    coeffs = dct_coefficients(g, side, "fft")
    expected = coeffs[:, sorted(chosen)] if side == "right" else coeffs[sorted(chosen), :]
    torch.testing.assert_close(proj.down(state, g), expected, rtol=1e-10, atol=1e-10)


def test_select_indices_breaks_ties_toward_smaller_index():
    scores = torch.tensor([1.0, 5.0, 5.0, 0.0, 5.0])
    assert select_indices(scores, 2).tolist() == [1, 2]


def test_state_holds_no_float_matrix_per_layer_only_indices_and_counters():
    model = TinyLM()
    opt = lrgrad.DCTAdamW(lrgrad.param_groups(model, rank=8, update_proj_gap=3), lr=1e-2)
    losses = train(model, opt, steps=8)
    assert losses[-1] < losses[0]
    projected = [s for s in opt.state.values() if "proj_indices" in s]
    assert len(projected) == 14  # 7 matrices per block x 2 blocks
    rule_keys = {"exp_avg", "exp_avg_sq"}
    for state in projected:
        for key, value in state.items():
            if key in rule_keys:
                continue
            if isinstance(value, torch.Tensor):
                assert key == "proj_indices" and value.dtype == torch.int32 and value.shape == (8,), key
                assert torch.all(value[1:] > value[:-1])  # sorted, distinct
            else:
                assert isinstance(value, int), (key, value)
        assert lrgrad.PROJECTORS["dct"](8, 3, "right", {"dct_scores": "auto"}).state_bytes(state) == 8 * 4


def test_shared_basis_is_reported_once_per_size():
    model = TinyLM()
    opt = lrgrad.DCTAdamW(lrgrad.param_groups(model, rank=8), lr=1e-2)
    train(model, opt, steps=1)
    # every projected TinyLM matrix projects its 32-wide side: one shared 32 x 32 fp32 basis
    assert opt.shared_state_bytes() == 32 * 32 * 4
    per_param = sum(v.untyped_storage().nbytes() for s in opt.state.values() for v in s.values()
                    if isinstance(v, torch.Tensor))
    assert lrgrad.optimizer_state_bytes(opt) == per_param + 32 * 32 * 4
    assert dct_cached_bytes("cpu") >= 32 * 32 * 4
    galore = lrgrad.GaLoreAdamW(lrgrad.param_groups(TinyLM(), rank=8), lr=1e-2)
    assert galore.shared_state_bytes() == 0


@pytest.mark.parametrize("side", ["right", "left"])
def test_moments_follow_their_basis_vectors_across_a_reselection(side):
    """Old selection {5, 9, 20}, new {1, 20, 30}: vector 20 moves from slot 2 to slot 1 and
    keeps its moments; 1 and 30 start from zero (moment_policy="project", DCTAdamW's default)."""
    d, r = 40, 3
    q = dct_basis(d, dtype=torch.float64)
    shape = (12, d) if side == "right" else (d, 12)
    param = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = lrgrad.DCTAdamW([param], lr=1e-2, rank=r, update_proj_gap=1, proj_type=side)
    assert opt.param_groups[0]["moment_policy"] == "project"
    gen = torch.Generator().manual_seed(3)

    def grad_in(indices):
        coeff = torch.randn(12, len(indices), dtype=torch.float64, generator=gen) + 3.0
        g = coeff @ q[:, indices].T
        return g if side == "right" else g.T.contiguous()

    param.grad = grad_in([5, 9, 20])
    opt.step()
    state = opt.state[param]
    assert state["proj_indices"].tolist() == [5, 9, 20]
    m_old, v_old = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    group = opt.param_groups[0]
    assert opt.advance_subspace(param, group, grad_in([1, 20, 30]))  # refresh + carry, no rule update
    assert state["proj_indices"].tolist() == [1, 20, 30]
    for new_value, old_value in ((state["exp_avg"], m_old), (state["exp_avg_sq"], v_old)):
        if side == "left":
            new_value, old_value = new_value.T, old_value.T
        torch.testing.assert_close(new_value[:, 1], old_value[:, 2], rtol=0, atol=0)
        assert torch.all(new_value[:, 0] == 0) and torch.all(new_value[:, 2] == 0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_transition_is_the_dense_basis_change(side):
    proj = make_projector(3, side)
    old = {"proj_indices": torch.tensor([5, 9, 20], dtype=torch.int32), "proj_dim": 40,
           "exp_avg": torch.zeros(1, dtype=torch.float64)}
    new = dict(old, proj_indices=torch.tensor([1, 20, 30], dtype=torch.int32))
    p_old, p_new = proj.basis(old), proj.basis(new)
    dense = p_old @ p_new.T if side == "right" else p_new.T @ p_old
    torch.testing.assert_close(proj.transition(old, new), dense, rtol=0, atol=1e-12)


def test_full_rank_dct_is_adamw_on_the_rotated_weights():
    """rank = d selects every basis vector: DCT-AdamW == AdamW on W Q with gradients G Q."""
    m, n, lr, wd = 9, 6, 1e-2, 0.1
    gen = torch.Generator().manual_seed(4)
    w0 = torch.randn(m, n, dtype=torch.float64, generator=gen)
    grads = [torch.randn(m, n, dtype=torch.float64, generator=gen) for _ in range(5)]
    q = dct_basis(n, dtype=torch.float64)

    proj = make_projector(n, "right")
    group = {"betas": (0.9, 0.999), "eps": 1e-8}
    rule = AdamWRule(group)
    state: dict = {}
    proj.init_state(state, (m, n), seed=0)
    rule.init_state(state, torch.zeros(m, n, dtype=torch.float64))
    w = w0.clone()
    for t, g in enumerate(grads, start=1):
        if proj.should_refresh(state, t):
            proj.refresh(state, g, t, group)
        assert state["proj_indices"].tolist() == list(range(n))
        u = rule.update(state, proj.down(state, g), t)
        proj.update_param_(state, w, u, alpha=-lr, decay=1 - lr * wd)

    rotated = torch.nn.Parameter(w0 @ q)
    ref = torch.optim.AdamW([rotated], lr=lr, weight_decay=wd, eps=1e-8)
    for g in grads:
        rotated.grad = g @ q
        ref.step()
    torch.testing.assert_close(w, rotated.detach() @ q.T, rtol=1e-12, atol=1e-12)


def test_fft_and_matmul_scores_train_identically():
    torch.manual_seed(0)
    a = TinyLM().double()
    b = TinyLM().double()
    b.load_state_dict(a.state_dict())
    for model, scores in ((a, "fft"), (b, "matmul")):
        opt = lrgrad.DCTAdamW(lrgrad.param_groups(model, rank=8, update_proj_gap=2), lr=1e-2, dct_scores=scores)
        train(model, opt, steps=5)
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)


def test_nonfinite_gradient_keeps_the_selection():
    proj = make_projector(2, "right")
    state: dict = {}
    proj.init_state(state, (4, 8), seed=0)
    g = torch.randn(4, 8)
    proj.refresh(state, g, 1, {})
    before = state["proj_indices"]
    g_bad = g.clone()
    g_bad[0, 0] = float("nan")
    assert not proj.refresh(state, g_bad, 2, {})
    assert state["proj_indices"] is before and state["proj_failures"] == 1


def test_bad_dct_scores_is_rejected():
    with pytest.raises(ValueError, match="dct_scores"):
        lrgrad.DCTAdamW(TinyLM().parameters(), rank=8, dct_scores="dft")


def test_each_step_gathers_each_params_columns_once(monkeypatch):
    """down() and the update of one step share one gather of Q[:, idx] per param."""
    calls = []
    original = torch.Tensor.index_select

    def counting(self, dim, index):
        calls.append(tuple(self.shape))
        return original(self, dim, index)

    params = [torch.nn.Parameter(torch.randn(24, 16)) for _ in range(3)]
    opt = lrgrad.DCTAdamW(params, lr=1e-3, rank=4, update_proj_gap=100)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the first step selects the columns
    monkeypatch.setattr(torch.Tensor, "index_select", counting)
    opt.step()
    assert len(calls) == len(params)
