"""``AdamWRule.update_many``: every projected param's Adam direction in one ``torch._fused_adamw_`` call,
against the per-param reference :meth:`AdamWRule.update` (torch's arithmetic, op by op)."""

from __future__ import annotations

import pytest
import torch

import lrgrad
from lrgrad.rules.adamw import AdamWRule

SHAPES = [(64, 16), (16, 96), (33, 7), (1, 5)]
#: the fused kernel scales by lr/(1-β1ᵗ) before dividing and contracts to FMAs: a few fp32 roundings
RTOL = 1e-6


def _group(**extra):
    return {"betas": (0.9, 0.999), "eps": 1e-8, "fused": None, **extra}


def _states(dtype=torch.float32):
    return [{"exp_avg": torch.zeros(s, dtype=dtype), "exp_avg_sq": torch.zeros(s, dtype=dtype)} for s in SHAPES]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / (b.abs() + torch.finfo(b.dtype).tiny)).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_directions_and_moments_match_the_per_param_reference(dtype):
    """30 steps, gradients from 1e-6 to 10, params at different step counts (bias corrections differ)."""
    torch.manual_seed(0)
    rule = AdamWRule(_group())
    fused, reference = _states(dtype), _states(dtype)
    tol = RTOL if dtype == torch.float32 else 1e-14
    for t in range(1, 31):
        grads = [torch.randn(s, dtype=dtype) * 10.0 ** torch.randint(-6, 2, ()).item() for s in SHAPES]
        steps = [t, t + 3, t + 7, t + 100]
        got = rule.update_many(fused, grads, steps)
        want = [rule.update(s, g, k) for s, g, k in zip(reference, grads, steps)]
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == dtype
            assert _rel(a, b) <= tol
        for a, b in zip(fused, reference):
            assert _rel(a["exp_avg"], b["exp_avg"]) <= tol
            assert _rel(a["exp_avg_sq"], b["exp_avg_sq"]) <= tol


def test_fused_false_and_mixed_dtypes_take_the_reference_loop_bit_for_bit():
    torch.manual_seed(1)
    grads = [torch.randn(s) for s in SHAPES]
    for rule, states in ((AdamWRule(_group(fused=False)), _states()),
                         (AdamWRule(_group()), _states()[:-1] + _states(torch.float64)[-1:])):
        reference = [{k: v.clone() for k, v in s.items()} for s in states]
        grads_here = [g.to(s["exp_avg"].dtype) for g, s in zip(grads, states)]
        got = rule.update_many(states, grads_here, [1, 2, 3, 4])
        want = [rule.update(s, g, k) for s, g, k in zip(reference, grads_here, [1, 2, 3, 4])]
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_directions_do_not_alias_each_other_or_the_moments():
    rule = AdamWRule(_group())
    states = _states()
    outs = rule.update_many(states, [torch.ones(s) for s in SHAPES], [1] * len(SHAPES))
    outs[0].fill_(123.0)
    assert not any(bool((o == 123.0).any()) for o in outs[1:])
    assert not bool((states[0]["exp_avg"] == 123.0).any())
    torch.testing.assert_close(outs[1], torch.ones(SHAPES[1]), rtol=1e-6, atol=0)  # m̂/√v̂ = 1 at step 1


def _galore_weights(init: list[torch.Tensor], grads: list[list[torch.Tensor]], **options) -> list[torch.Tensor]:
    """The weights after GaLoreAdamW (rank 6, lr 1e-2) steps through ``grads`` from ``init``; every step
    also checks that ``.grad`` is never written."""
    params = [torch.nn.Parameter(w.clone()) for w in init]
    opt = lrgrad.GaLoreAdamW(params, lr=1e-2, rank=6, **options)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(params, step))
    return [p.detach().clone() for p in params]


def test_galore_adamw_fused_step_matches_the_unfused_optimizer():
    """The whole optimizer, fused (default) vs ``fused=False`` (per-param reference), 12 steps with a
    refresh every 4: the weights agree to the fused kernel's rounding."""
    torch.manual_seed(2)
    shapes = [(48, 24), (24, 40), (30,)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(12)]
    weights = [_galore_weights(init, grads, update_proj_gap=4, fused=fused) for fused in (None, False)]
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_transposed_gradient_takes_the_reference_path():
    """The fused kernel walks memory: a non-contiguous operand (a transposed view) must not reach it."""
    torch.manual_seed(3)
    rule = AdamWRule(_group())
    g = torch.randn(16, 24).T  # 24 x 16, not contiguous
    a = {"exp_avg": torch.zeros(24, 16), "exp_avg_sq": torch.zeros(24, 16)}
    b = {k: v.clone() for k, v in a.items()}
    (got,) = rule.update_many([a], [g], [1])
    assert torch.equal(got, rule.update(b, g, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reused_gradients_hold_the_same_directions_and_moments_bit_for_bit(dtype):
    """``reuse_grads=True`` writes the directions into the gradients (no zeroed buffer): the directions
    and both moments equal the zeroed-buffer path exactly, over 20 steps at mixed step counts and
    gradients from 1e-30 to 1e30 (the ``g·0`` that replaces the zero must stay an exact 0)."""
    torch.manual_seed(4)
    rule = AdamWRule(_group())
    buffered, reused = _states(dtype), _states(dtype)
    for t in range(1, 21):
        exponent = torch.randint(-30, 31, ()).item() if dtype == torch.float64 else torch.randint(-30, 30, ()).item()
        grads = [torch.randn(s, dtype=dtype) * 10.0**exponent for s in SHAPES]
        steps = [t, t + 1, t + 5, t + 50]
        want = rule.update_many(buffered, [g.clone() for g in grads], steps)
        mine = [g.clone() for g in grads]
        got = rule.update_many(reused, mine, steps, reuse_grads=True)
        for a, b, g in zip(got, want, mine):
            assert a.data_ptr() == g.data_ptr()  # written in place: nothing allocated
            assert torch.equal(a, b)
        for a, b in zip(reused, buffered):
            assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_reuse_grads_is_ignored_where_the_buffer_path_is_not_taken():
    """A transposed gradient goes through the per-param reference: the caller's tensor is not written."""
    rule = AdamWRule(_group())
    g = torch.randn(16, 24).T
    before = g.clone()
    a = {"exp_avg": torch.zeros(24, 16), "exp_avg_sq": torch.zeros(24, 16)}
    (got,) = rule.update_many([a], [g], [1], reuse_grads=True)
    assert torch.equal(g, before) and got.data_ptr() != g.data_ptr()


@pytest.mark.parametrize("full_rank", [None, "apollo", "fira"])
def test_optimizer_step_with_reused_gradients_equals_the_buffered_step(full_rank, monkeypatch):
    """The optimizer reuses the low-rank gradients only when nothing reads them after the rule (no
    full-rank update): 8 steps with a refresh every 3 equal, bit for bit, a run that never reuses."""
    torch.manual_seed(5)
    shapes = [(40, 24), (24, 56), (30,)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(8)]
    reused = _galore_weights(init, grads, update_proj_gap=3, full_rank=full_rank)
    original = AdamWRule.update_many
    monkeypatch.setattr(AdamWRule, "update_many",
                        lambda self, s, g, k, reuse_grads=False: original(self, s, g, k, False))
    buffered = _galore_weights(init, grads, update_proj_gap=3, full_rank=full_rank)
    for a, b in zip(reused, buffered):
        assert torch.equal(a, b)
