"""AdamW with 8-bit blockwise moments (rule="adamw8bit")."""

from __future__ import annotations

import pytest
import torch
from tiny_model import TinyLM, train

import lrgrad
from lrgrad import quant
from lrgrad.rules import RULES, AdamW8bitRule, AdamWRule

GROUP = {"betas": (0.9, 0.999), "eps": 1e-8, "moment_block_size": 64, "moment_min_size": 256}


def companded_error(x_hat, x, absmax, block, signed):
    a = absmax.repeat_interleave(block)[: x.numel()].view(x.shape)
    a = torch.where(a > 0, a, torch.ones_like(a))
    if signed:
        return ((torch.sign(x_hat) * (x_hat.abs() / a).sqrt()) - (torch.sign(x) * (x.abs() / a).sqrt())).abs()
    return ((x_hat / a) ** 0.25 - (x / a) ** 0.25).abs()


def test_registered():
    assert RULES["adamw8bit"] is AdamW8bitRule


def test_first_step_direction_equals_fp32_adamw():
    grad = torch.randn(40, 30)
    rule8, rule32 = AdamW8bitRule(dict(GROUP)), AdamWRule(dict(GROUP))
    s8, s32 = {}, {}
    rule8.init_state(s8, torch.zeros(40, 30))
    rule32.init_state(s32, torch.zeros(40, 30))
    assert s8["exp_avg_codes"].dtype == torch.int8 and s8["exp_avg_sq_codes"].dtype == torch.uint8
    assert "exp_avg" not in s8
    torch.testing.assert_close(rule8.update(s8, grad, 1), rule32.update(s32, grad, 1), rtol=0, atol=0)


def test_each_step_requantizes_within_blockwise_bound():
    """deq(new) vs the exact fp32 update of deq(old): half a code in the companded domain, every step."""
    rule = AdamW8bitRule(dict(GROUP))
    state = {}
    rule.init_state(state, torch.zeros(50, 20))  # 1000 elements: 16 blocks of 64, the last one partial
    beta1, beta2 = GROUP["betas"]
    fp32_m, fp32_v = torch.zeros(50, 20), torch.zeros(50, 20)
    for step in range(1, 21):
        grad = torch.randn(50, 20) * torch.logspace(-3, 0, 20)  # columns of very different scales
        m_old = rule.load_moment(state, "exp_avg", True, torch.float32)
        v_old = rule.load_moment(state, "exp_avg_sq", False, torch.float32)
        rule.update(state, grad, step)
        m_exact = m_old * beta1 + (1 - beta1) * grad
        v_exact = v_old * beta2 + (1 - beta2) * grad * grad
        m_new = rule.load_moment(state, "exp_avg", True, torch.float32)
        v_new = rule.load_moment(state, "exp_avg_sq", False, torch.float32)
        assert companded_error(m_new, m_exact, state["exp_avg_absmax"], 64, True).max() <= 1 / 254 + 1e-6
        assert companded_error(v_new, v_exact, state["exp_avg_sq_absmax"], 64, False).max() <= 1 / 510 + 1e-6
        fp32_m.lerp_(grad, 1 - beta1)
        fp32_v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    # accumulated over 20 steps, the moments stay close to fp32 ones in norm
    assert (m_new - fp32_m).norm() <= 0.02 * fp32_m.norm()
    assert (v_new - fp32_v).norm() <= 0.02 * fp32_v.norm()
    assert bool((v_new > 0).all())  # no second moment flushed to 0


def test_training_tracks_fp32_adamw():
    torch.manual_seed(0)
    model32 = TinyLM()
    model8 = TinyLM()
    model8.load_state_dict(model32.state_dict())
    opt32 = lrgrad.LowRankOptimizer(model32.parameters(), lr=3e-3, rule="adamw")
    opt8 = lrgrad.LowRankOptimizer(model8.parameters(), lr=3e-3, rule="adamw8bit", moment_min_size=256,
                                   moment_block_size=64)
    train(model8, opt8, 1)
    train(model32, opt32, 1)
    quantized = sum("exp_avg_codes" in s for s in opt8.state.values())
    assert quantized >= 14  # every matrix of the tiny model has 8-bit moments
    l32 = train(model32, opt32, 40, batch_seed=1)
    l8 = train(model8, opt8, 40, batch_seed=1)
    # tolerance: every loss within 3 % of the fp32 run (measured max 0.2 %)
    rel = [abs(a - b) / a for a, b in zip(l32, l8)]
    assert max(rel) < 0.03, max(rel)
    assert l8[-1] < 0.2 * l8[0]


def test_small_tensors_keep_the_fp32_foreach_path_bit_identical():
    torch.manual_seed(0)
    a, b = TinyLM(), TinyLM()
    b.load_state_dict(a.state_dict())
    opt_a = lrgrad.LowRankOptimizer(a.parameters(), lr=3e-3, rule="adamw")
    opt_b = lrgrad.LowRankOptimizer(b.parameters(), lr=3e-3, rule="adamw8bit")  # all < 4096: fp32
    train(a, opt_a, 5)
    train(b, opt_b, 5)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert all("exp_avg" in s and s["exp_avg"].dtype == torch.float32 for s in opt_b.state.values())


def test_change_basis_permutation_moves_codes_exactly():
    rule = AdamW8bitRule({**GROUP, "moment_block_size": 4096})
    state = {}
    rule.init_state(state, torch.zeros(40, 8))
    for step in range(1, 4):
        rule.update(state, torch.randn(40, 8), step)
    perm = torch.randperm(8)
    transition = torch.eye(8)[:, perm]  # right side: x_new = x T  -> columns permuted
    m_codes, v_codes = state["exp_avg_codes"].clone(), state["exp_avg_sq_codes"].clone()
    rule.change_basis(state, transition, "right")
    assert torch.equal(state["exp_avg_codes"], m_codes[:, perm])
    assert torch.equal(state["exp_avg_sq_codes"], v_codes[:, perm])


def test_change_basis_rotation_matches_fp32_rule():
    rule8, rule32 = AdamW8bitRule(dict(GROUP)), AdamWRule(dict(GROUP))
    s8, s32 = {}, {}
    rule8.init_state(s8, torch.zeros(12, 40))
    rule32.init_state(s32, torch.zeros(12, 40))
    for step in range(1, 4):
        g = torch.randn(12, 40)
        rule8.update(s8, g, step)
        rule32.update(s32, g, step)
    rotation, _ = torch.linalg.qr(torch.randn(12, 12))
    rule8.change_basis(s8, rotation, "left")
    rule32.change_basis(s32, rotation, "left")
    m8 = rule8.load_moment(s8, "exp_avg", True, torch.float32)
    v8 = rule8.load_moment(s8, "exp_avg_sq", False, torch.float32)
    assert (m8 - s32["exp_avg"]).norm() <= 0.03 * s32["exp_avg"].norm()
    assert (v8 - s32["exp_avg_sq"]).norm() <= 0.03 * s32["exp_avg_sq"].norm()


def test_reset_state_zeroes_quantized_moments():
    rule = AdamW8bitRule(dict(GROUP))
    state = {}
    rule.init_state(state, torch.zeros(30, 30))
    rule.update(state, torch.randn(30, 30), 1)
    rule.reset_state(state)
    assert rule.load_moment(state, "exp_avg", True, torch.float32).abs().max() == 0
    assert rule.load_moment(state, "exp_avg_sq", False, torch.float32).abs().max() == 0


@pytest.mark.parametrize("policy", ["project", "reset"])
def test_moment_policies_train_with_quantized_moments(policy):
    model = TinyLM()
    opt = lrgrad.GaLoreAdamW8bit(lrgrad.param_groups(model, rank=8, update_proj_gap=4), lr=1e-2,
                                 moment_policy=policy, moment_min_size=64, moment_block_size=64)
    losses = train(model, opt, 20)
    assert losses[-1] < 0.5 * losses[0]
    assert any("exp_avg_codes" in s and s.get("proj_refreshes", 0) > 1 for s in opt.state.values())


def test_state_bytes_are_one_byte_per_moment_entry():
    p = torch.nn.Parameter(torch.zeros(100, 50))
    opt = lrgrad.LowRankOptimizer([p], rule="adamw8bit")
    p.grad = torch.randn(100, 50)
    opt.step()
    blocks = quant.num_groups(5000, 256)
    assert lrgrad.optimizer_state_bytes(opt) == 2 * (5000 + 4 * blocks)


@pytest.mark.parametrize("options,err,match", [
    ({"moment_block_size": 0}, ValueError, "moment_block_size"),
    ({"moment_block_size": 2.5}, TypeError, "moment_block_size"),
    ({"moment_min_size": -1}, ValueError, "moment_min_size"),
    ({"moment_min_size": None}, TypeError, "moment_min_size"),
    ({"betas": (0.9, 1.0)}, ValueError, "beta"),
])
def test_bad_options(options, err, match):
    with pytest.raises(err, match=match):
        lrgrad.LowRankOptimizer([torch.nn.Parameter(torch.zeros(3))], rule="adamw8bit", **options)


def test_chunked_update_equals_one_pass(monkeypatch):
    """Chunks of whole blocks are exact: the same codes, absmax and direction as one pass."""
    import lrgrad.rules.adamw8bit as module

    def run():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(50, 300))  # 15000 elements: 59 blocks, a short last one
        opt = lrgrad.LowRankOptimizer([w], lr=1e-2, rule="adamw8bit")
        for _ in range(3):
            w.grad = torch.randn(50, 300)
            opt.step()
        return w.detach().clone(), opt.state[w]

    w_one, state_one = run()
    monkeypatch.setattr(module, "UPDATE_CHUNK", 1000)  # -> chunks of 768 elements
    w_chunked, state_chunked = run()
    assert torch.equal(w_one, w_chunked)
    for key in ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"):
        assert torch.equal(state_one[key], state_chunked[key]), key
