"""AuON, HybridAuON and Muon: the update equations, mixed routing (1-D params -> AdamW),
projected variants, and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_model import TinyLM, lm_loss, make_batch, train

import lrgrad
from lrgrad.kernels import newton_schulz
from lrgrad.optim.normalized import AuON, DCTAuON, GaLoreAuON, GaLoreMuon, HybridAuON, Muon

LR = {"AuON": 5e-2, "HybridAuON": 5e-2, "Muon": 2e-2, "GaLoreAuON": 5e-2, "GaLoreMuon": 2e-2}
FULL = [AuON, HybridAuON, Muon]


def one_param(shape, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=dtype))
    return p


def run_steps(opt, p, grads):
    """Apply ``grads`` one step each; return the list of (p_after - p_before)."""
    deltas = []
    for g in grads:
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        deltas.append(p.detach() - before)
    return deltas


def nesterov_dirs(grads, beta, nesterov=True):
    m = torch.zeros_like(grads[0])
    out = []
    for g in grads:
        m = beta * m + (1 - beta) * g
        out.append((1 - beta) * g + beta * m if nesterov else m.clone())
    return out


def auon_paper(v, gamma=1.0, normalized=True):
    x = v / (v.norm() + 1e-7)
    rms = torch.sqrt(torch.mean(torch.cosh(gamma * x) ** 2))
    return (x if normalized else v) / (rms + 1e-8)


def quintic(v, steps):
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = v.shape[0] > v.shape[1]
    x = v.T if tall else v
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


def grads_for(shape, count, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(count)]


# ---------------------------------------------------------------- equations, full rank
@pytest.mark.parametrize("nesterov", [True, False])
def test_auon_matches_the_paper_equations(nesterov):
    p = one_param((12, 20))
    opt = AuON([p], lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.0)
    grads = grads_for((12, 20), 3)
    for delta, v in zip(run_steps(opt, p, grads), nesterov_dirs(grads, 0.9, nesterov)):
        torch.testing.assert_close(delta, -0.1 * auon_paper(v), rtol=1e-10, atol=1e-12)


def test_auon_reference_code_variant_options():
    """gamma=1.5 inside cosh and the un-normalized numerator (the public code's departures)."""
    p = one_param((10, 7))
    opt = AuON([p], lr=0.1, gamma=1.5, normalize_numerator=False)
    grads = grads_for((10, 7), 2)
    for delta, v in zip(run_steps(opt, p, grads), nesterov_dirs(grads, 0.95)):
        torch.testing.assert_close(delta, -0.1 * auon_paper(v, gamma=1.5, normalized=False), rtol=1e-10, atol=1e-12)


def test_hybrid_auon_is_one_newton_schulz_step_then_the_brake():
    p = one_param((9, 16))
    opt = HybridAuON([p], lr=0.1, weight_decay=0.0)
    grads = grads_for((9, 16), 2)
    for delta, v in zip(run_steps(opt, p, grads), nesterov_dirs(grads, 0.95)):
        torch.testing.assert_close(delta, -0.1 * auon_paper(quintic(v, 1)), rtol=1e-9, atol=1e-12)
    p3 = one_param((9, 16))
    opt3 = HybridAuON([p3], lr=0.1, ns_steps=3)
    (delta,) = run_steps(opt3, p3, grads[:1])
    torch.testing.assert_close(delta, -0.1 * auon_paper(quintic(nesterov_dirs(grads[:1], 0.95)[0], 3)))


@pytest.mark.parametrize("shape", [(24, 8), (8, 24), (16, 16)])
@pytest.mark.parametrize("match_rms_adamw", [False, True])
def test_muon_matches_the_reference_equations(shape, match_rms_adamw):
    p = one_param(shape)
    opt = Muon([p], lr=0.05, weight_decay=0.1, match_rms_adamw=match_rms_adamw)
    grads = grads_for(shape, 3)
    m, n = shape
    factor = 0.2 * math.sqrt(max(m, n)) if match_rms_adamw else math.sqrt(max(1.0, m / n))
    p_ref = p.detach().clone()
    for v, g in zip(nesterov_dirs(grads, 0.95), grads):
        p_ref = p_ref * (1 - 0.05 * 0.1) - 0.05 * factor * quintic(v, 5)
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p.detach(), p_ref, rtol=1e-9, atol=1e-11)


def test_muon_match_rms_adamw_gives_update_rms_02():
    p = one_param((64, 32), dtype=torch.float32)
    opt = Muon([p], lr=1.0, match_rms_adamw=True)
    (delta,) = run_steps(opt, p, [torch.randn(64, 32)])
    rms = delta.pow(2).mean().sqrt().item()
    assert 0.2 * 0.68 <= rms <= 0.2 * 1.21


@pytest.mark.parametrize("cls", FULL)
@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_update_is_independent_of_gradient_scale(cls, scale):
    shape = (16, 24)
    grads = grads_for(shape, 3)
    p1, p2 = one_param(shape), one_param(shape)
    d1 = run_steps(cls([p1], lr=0.1), p1, grads)
    d2 = run_steps(cls([p2], lr=0.1), p2, [scale * g for g in grads])
    for a, b in zip(d1, d2):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-5)  # entries ~1e-2; eps=1e-7 vs ‖V‖~6e-3
    if cls is not Muon:  # AuON's update has unit-order Frobenius norm: ‖U‖ ∈ [1/sqrt(1+sinh²1/N), 1]
        norm = (d1[0] / 0.1).norm().item()
        assert 1 / math.sqrt(1 + math.sinh(1) ** 2 / (16 * 24)) - 1e-6 <= norm <= 1 + 1e-9


@pytest.mark.parametrize("cls", FULL)
def test_nd_params_are_updated_as_matrices(cls):
    conv = one_param((6, 3, 2, 2))
    flat = torch.nn.Parameter(conv.detach().reshape(6, 12).clone())
    grads = grads_for((6, 3, 2, 2), 2)
    d_conv = run_steps(cls([conv], lr=0.1), conv, grads)
    d_flat = run_steps(cls([flat], lr=0.1), flat, [g.reshape(6, 12) for g in grads])
    for a, b in zip(d_conv, d_flat):
        torch.testing.assert_close(a.reshape(6, 12), b, rtol=1e-12, atol=1e-14)


def test_state_is_one_momentum_matrix_per_matrix():
    p = one_param((12, 20), dtype=torch.float32)
    for cls in FULL:
        opt = cls([p], lr=0.0)
        run_steps(opt, p, [torch.randn(12, 20)])
        state = opt.state[p]
        assert {k for k, v in state.items() if isinstance(v, torch.Tensor)} == {"momentum_buffer"}
        assert state["momentum_buffer"].shape == (12, 20)
        assert lrgrad.optimizer_state_bytes(opt) == 12 * 20 * 4


# ---------------------------------------------------------------- mixed routing
def test_bias_gets_torch_adamw_exactly():
    weight = torch.nn.Parameter(torch.randn(8, 6, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(8, dtype=torch.float64))
    ref = torch.nn.Parameter(bias.detach().clone())
    opt = Muon([weight, bias], lr=0.02, weight_decay=0.05, adamw_lr=3e-3, adamw_betas=(0.8, 0.9), adamw_eps=1e-6)
    torch_opt = torch.optim.AdamW([ref], lr=3e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.05)
    for g in grads_for((8,), 4):
        weight.grad = torch.randn(8, 6, dtype=torch.float64)
        bias.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
        torch.testing.assert_close(bias.detach(), ref.detach(), rtol=1e-12, atol=1e-14)
    assert set(opt.state[bias]) >= {"exp_avg", "exp_avg_sq"} and "momentum_buffer" not in opt.state[bias]
    assert "momentum_buffer" in opt.state[weight]


def test_adamw_fallback_follows_the_lr_scheduler_and_its_own_weight_decay():
    bias = torch.nn.Parameter(torch.randn(5))
    ref = torch.nn.Parameter(bias.detach().clone())
    opt = AuON([bias], lr=0.05, weight_decay=0.3, adamw_lr=1e-2, adamw_weight_decay=0.0)
    torch_opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    torch_sched = torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda s: 0.5**s)
    for g in grads_for((5,), 3):
        bias.grad, ref.grad = g.float(), g.float()
        opt.step()
        torch_opt.step()
        sched.step()
        torch_sched.step()
        torch.testing.assert_close(bias.detach(), ref.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("schedule", ["plateau", "onecycle", "by_hand"])
def test_adamw_fallback_follows_every_scheduler_relative_to_the_constructor_lr(schedule):
    """The fallback's lr is ``adamw_lr · lr_t / lr_0`` with ``lr_0`` the lr the group was built with.
    ReduceLROnPlateau (and an lr set by hand) record no ``initial_lr``, and OneCycleLR records its own
    start ``max_lr / div_factor``: measured against those, the 1-D params kept 3e-3 while Muon's lr fell
    100x, or ran at 24x adamw_lr at OneCycle's peak."""
    weight = torch.nn.Parameter(torch.randn(8, 6, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(8, dtype=torch.float64))
    ref = torch.nn.Parameter(bias.detach().clone())
    opt = Muon([weight, bias], lr=0.02, weight_decay=0.0, adamw_lr=3e-3)
    torch_opt = torch.optim.AdamW([ref], lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    if schedule == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.1)
    elif schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=10)
    for g in grads_for((8,), 4):
        weight.grad = torch.randn(8, 6, dtype=torch.float64)
        if schedule == "by_hand":
            opt.param_groups[0]["lr"] *= 0.5
        torch_opt.param_groups[0]["lr"] = 3e-3 * opt.param_groups[0]["lr"] / 0.02
        bias.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
        if schedule == "plateau":
            sched.step(1.0)  # no improvement: lr x 0.1 every step
        elif schedule == "onecycle":
            sched.step()
        torch.testing.assert_close(bias.detach(), ref.detach(), rtol=1e-12, atol=1e-14)
    assert opt.param_groups[0]["lr"] != 0.02


@pytest.mark.parametrize("route", ["deepcopy", "state_dict into another lr"])
@pytest.mark.parametrize("cls", [Muon, AuON, HybridAuON, GaLoreMuon])
def test_the_lr_adamw_lr_pairs_with_travels_with_the_group(cls, route):
    """The 1-D params' AdamW lr is ``adamw_lr · lr / lr₀``. ``lr₀`` lived on the optimizer object, which
    ``deepcopy``/pickle (torch keeps only defaults, state and param_groups) dropped, and which a
    ``load_state_dict`` into an optimizer built with another lr replaced, while the saved lr was taken: the
    biases then stepped at 10x the saved run's lr. It is the group key ``adamw_lr_pairs_with`` now, so both
    continue the saved run exactly."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(16, 12))
    bias = torch.nn.Parameter(torch.randn(16))
    rank = {"rank": 4} if cls is GaLoreMuon else {}
    opt = cls([weight, bias], lr=0.02, **rank)
    weight.grad, bias.grad = torch.randn(16, 12), torch.randn(16)
    opt.step()
    opt.param_groups[0]["lr"] *= 0.1  # a scheduler's decay
    assert opt.param_groups[0]["adamw_lr_pairs_with"] == 0.02
    if route == "deepcopy":
        twin_weight, twin_bias, twin = copy.deepcopy((weight, bias, opt))  # one memo: the copy steps the copies
    else:
        twin_weight = torch.nn.Parameter(weight.detach().clone())
        twin_bias = torch.nn.Parameter(bias.detach().clone())
        twin = cls([twin_weight, twin_bias], lr=0.2, **rank)  # another lr: the saved one is taken, as torch does
        twin.load_state_dict(opt.state_dict())
    for _ in range(3):
        g_weight, g_bias = torch.randn(16, 12), torch.randn(16)
        weight.grad, bias.grad, twin_weight.grad, twin_bias.grad = g_weight, g_bias, g_weight.clone(), g_bias.clone()
        opt.step()
        twin.step()
    assert torch.equal(bias, twin_bias) and torch.equal(weight, twin_weight)


def test_adamw_lr_none_uses_lr():
    bias = torch.nn.Parameter(torch.zeros(4))
    opt = AuON([bias], lr=0.07, adamw_lr=None)
    bias.grad = torch.ones(4)
    opt.step()
    torch.testing.assert_close(bias.detach(), torch.full((4,), -0.07), rtol=1e-5, atol=1e-7)


def test_per_group_rule_override_gives_embeddings_adamw():
    torch.manual_seed(0)
    model = TinyLM()
    groups = lrgrad.param_groups(model, rank=8)
    groups[0]["rank"] = None  # hidden matrices: full-rank Muon
    groups[1].update(rule="adamw", lr=3e-3)  # embeddings, head, norms: AdamW with its own defaults
    opt = Muon(groups, lr=0.02)
    assert opt.param_groups[1]["eps"] == 1e-8 and opt.param_groups[1]["betas"] == (0.9, 0.999)
    emb = model.embed_tokens.weight
    ref_emb = torch.nn.Parameter(emb.detach().clone())
    torch_opt = torch.optim.AdamW([ref_emb], lr=3e-3, weight_decay=opt.param_groups[1]["weight_decay"])
    losses = []
    for i in range(3):
        opt.zero_grad()
        loss = lm_loss(model, make_batch(seed=i))
        loss.backward()
        ref_emb.grad = emb.grad.clone()
        opt.step()
        torch_opt.step()
        losses.append(loss.item())
    torch.testing.assert_close(emb.detach(), ref_emb.detach(), rtol=1e-5, atol=1e-7)
    assert "exp_avg_sq" in opt.state[emb]
    hidden = dict(model.named_parameters())["layers.0.q_proj.weight"]
    assert set(k for k in opt.state[hidden] if k != "step") == {"momentum_buffer"}


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("cls", FULL)
def test_loss_decreases_with_model_parameters(cls):
    torch.manual_seed(0)
    model = TinyLM()
    opt = cls(model.parameters(), lr=LR[cls.__name__])
    losses = train(model, opt, steps=25)
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses
    for p in model.parameters():
        keys = set(opt.state[p])
        assert ("momentum_buffer" in keys) == (p.dim() >= 2), (p.shape, keys)
        assert ("exp_avg" in keys) == (p.dim() < 2)


@pytest.mark.parametrize("cls", [GaLoreAuON, GaLoreMuon])
def test_loss_decreases_inside_the_svd_projector(cls):
    torch.manual_seed(0)
    model = TinyLM()
    opt = cls(lrgrad.param_groups(model, rank=8, update_proj_gap=5), lr=LR[cls.__name__])
    losses = train(model, opt, steps=25)
    assert sum(losses[-5:]) / 5 < 0.85 * losses[0], losses
    group = opt.param_groups[0]
    for p in group["params"]:
        assert opt.is_projected(p, group)
        assert 8 in opt.state[p]["momentum_buffer"].shape
        assert opt.state[p]["momentum_buffer"].numel() == 8 * max(p.shape)


@pytest.mark.parametrize("projector", sorted(lrgrad.PROJECTORS))
@pytest.mark.parametrize("cls", [AuON, Muon])
def test_loss_decreases_inside_every_projector(cls, projector):
    torch.manual_seed(0)
    model = TinyLM()
    opt = cls(lrgrad.param_groups(model, rank=8, update_proj_gap=5), lr=LR[cls.__name__], projector=projector)
    losses = train(model, opt, steps=20)
    assert sum(losses[-5:]) / 5 < 0.85 * losses[0], losses
    group = opt.param_groups[0]
    for p in group["params"]:
        assert opt.state[p]["momentum_buffer"].numel() == 8 * max(p.shape)  # r x n momentum, not m x n


def test_dct_auon_state_is_low_rank_momentum_and_indices():
    torch.manual_seed(0)
    model = TinyLM()
    opt = DCTAuON(lrgrad.param_groups(model, rank=8, update_proj_gap=5))
    train(model, opt, steps=3)
    p = dict(model.named_parameters())["layers.0.gate_proj.weight"]
    floats = {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    assert set(floats) == {"momentum_buffer"} and floats["momentum_buffer"].numel() == 8 * max(p.shape)


@pytest.mark.parametrize("rule", ["auon", "muon", "hybrid_auon"])
def test_projected_step_is_up_of_the_rule_on_R(rule):
    """Inside a projector the rule runs on R = down(G): Δ = -lr · scale · up(normalize(momentum(R)))."""
    p = one_param((40, 24))
    opt = lrgrad.LowRankOptimizer([p], lr=0.1, rule=rule, projector="svd", rank=6, scale=0.5, weight_decay=0.0)
    group = opt.param_groups[0]
    g = grads_for((40, 24), 1)[0]
    (delta,) = run_steps(opt, p, [g])
    state = opt.state[p]
    projector = opt.projector_for(p, group)
    R = projector.down(state, g)
    v = nesterov_dirs([R], 0.95)[0]
    if rule == "auon":
        u = auon_paper(v)
    elif rule == "hybrid_auon":
        u = auon_paper(quintic(v, 1))
    else:
        u = quintic(v, 5) * math.sqrt(max(1.0, R.shape[0] / R.shape[1]))
    torch.testing.assert_close(delta, -0.1 * 0.5 * projector.up(state, u), rtol=1e-8, atol=1e-11)
    assert state["momentum_buffer"].shape == R.shape


def test_bit_identical_to_a_deepcopy_and_newton_schulz_entry():
    model = TinyLM()
    twin = copy.deepcopy(model)
    a, b = Muon(model.parameters(), lr=0.02), Muon(twin.parameters(), lr=0.02)
    train(model, a, steps=2)
    train(twin, b, steps=2)
    for x, y in zip(model.parameters(), twin.parameters()):
        assert torch.equal(x, y)
    assert callable(newton_schulz)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "cls, kwargs, exc, match",
    [
        (HybridAuON, {"ns_steps": 0}, ValueError, "ns_steps"),
        (Muon, {"ns_steps": 0}, ValueError, "ns_steps"),
        (Muon, {"ns_steps": 2.5}, TypeError, "ns_steps"),
        (Muon, {"momentum": 1.0}, ValueError, "momentum"),
        (AuON, {"momentum": -0.1}, ValueError, "momentum"),
        (AuON, {"momentum": "0.9"}, TypeError, "momentum"),
        (AuON, {"nesterov": 1}, TypeError, "nesterov"),
        (AuON, {"gamma": 0.0}, ValueError, "gamma"),
        (AuON, {"eps": -1e-7}, ValueError, "eps"),
        (AuON, {"rms_eps": float("nan")}, ValueError, "rms_eps"),
        (AuON, {"normalize_numerator": "yes"}, TypeError, "normalize_numerator"),
        (Muon, {"match_rms_adamw": None}, TypeError, "match_rms_adamw"),
        (Muon, {"ns_coefficients": (1.0, 2.0)}, TypeError, "ns_coefficients"),
        (Muon, {"adamw_betas": (0.9, 1.0)}, ValueError, "adamw_betas"),
        (Muon, {"adamw_betas": 0.9}, TypeError, "adamw_betas"),
        (AuON, {"adamw_lr": -1.0}, ValueError, "adamw_lr"),
        (AuON, {"adamw_eps": -1.0}, ValueError, "adamw_eps"),
        (Muon, {"adamw_weight_decay": -0.1}, ValueError, "adamw_weight_decay"),
        (Muon, {"lr": -0.1}, ValueError, "learning rate"),
        (Muon, {"bogus": 1}, TypeError, "bogus"),
    ],
)
def test_bad_input_is_rejected(cls, kwargs, exc, match):
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(exc, match=match):
        cls([p], **kwargs)


def test_bad_group_override_is_rejected():
    p, q = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    opt = Muon([p], lr=0.02)
    with pytest.raises(ValueError, match="ns_steps"):
        opt.add_param_group({"params": [q], "ns_steps": -1})
    assert len(opt.param_groups) == 1
