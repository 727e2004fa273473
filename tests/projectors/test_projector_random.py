"""Flora's random projector (arXiv:2402.03293): seeded, never stored, resampled with moment transfer."""

import io
import math

import pytest
import torch
from tiny_model import TinyLM, train

import lrgrad
from lrgrad.projectors.random import RandomProjector, clear_cache, matrix_seed, random_matrix

SEEDED_KEYS = {"step", "proj_refreshes", "proj_failures", "proj_seed", "proj_dim"}


def projector(side, rank=4, gap=3, kind="gaussian", device="param"):
    return RandomProjector(rank, gap, side, {"random_basis": kind, "random_device": device,
                                             "random_v_transfer": "mean"})


def fresh_state(proj, shape2d, seed=11, draw=1):
    state = {}
    proj.init_state(state, shape2d, seed)
    state["proj_refreshes"] = draw
    return state


def one_matrix_opt(w, cls=lrgrad.FloraAdamW, **kw):
    kw.setdefault("rank", 4)
    kw.setdefault("update_proj_gap", 2)
    return cls([{"params": [w], **{k: kw.pop(k) for k in ("rank", "update_proj_gap")}}], **kw)


def projected_states(opt):
    return [s for s in opt.state.values() if "proj_seed" in s]


# ---------------------------------------------------------------- the matrix
@pytest.mark.parametrize("side,shape", [("right", (6, 16)), ("left", (16, 6))])
def test_flora_convention_unbiased_expectation(side, shape):
    """E[PᵀP] = I_n (right) / E[PPᵀ] = I_m (left): up(down(G)) is unbiased, as Flora's C = GP / PG."""
    r, draws = 4, 3000
    d = 16
    proj = projector(side, rank=r)
    acc = torch.zeros(d, d, dtype=torch.float64)
    for k in range(1, draws + 1):
        p = proj.matrix(fresh_state(proj, shape, seed=5, draw=k), "cpu", torch.float64)
        assert p.shape == ((r, d) if side == "right" else (d, r))
        acc += p.T @ p if side == "right" else p @ p.T
    mean = acc / draws
    # Var of one diagonal entry: r * Var(x²) = r * 2/r² = 2/r; off-diagonal: 1/r. 6σ over d² entries.
    bound = 6 * math.sqrt(2 / (r * draws))
    err = (mean - torch.eye(d, dtype=torch.float64)).abs()
    assert err.max() < bound, (err.max(), bound)
    # the diagonal's average is far tighter (d*draws samples): catches a wrong variance (e.g. N(0, 1))
    assert abs(mean.diagonal().mean() - 1) < 6 * math.sqrt(2 / (r * draws * d))
    # and a single draw is not the identity (it is a rank-r matrix)
    p = proj.matrix(fresh_state(proj, shape, seed=5, draw=1), "cpu", torch.float64)
    assert torch.linalg.matrix_rank(p.T @ p if side == "right" else p @ p.T) == r


@pytest.mark.parametrize("side,shape", [("right", (6, 16)), ("left", (16, 6))])
def test_orthonormal_option_is_orthonormal_projection(side, shape):
    proj = projector(side, kind="orthonormal")
    state = fresh_state(proj, shape)
    p = proj.matrix(state, "cpu", torch.float64)
    gram = p @ p.T if side == "right" else p.T @ p
    torch.testing.assert_close(gram, torch.eye(4, dtype=torch.float64), atol=1e-12, rtol=0)
    g = torch.randn(shape, dtype=torch.float64)
    back = proj.up(state, proj.down(state, g))
    ortho = g @ p.T @ p if side == "right" else p @ p.T @ g
    torch.testing.assert_close(back, ortho)
    torch.testing.assert_close(proj.up(state, proj.down(state, back)), back)  # idempotent
    # the Q factor of the same Gaussian draw: same span as the Gaussian basis
    gauss = projector(side).matrix(state, "cpu", torch.float64)
    gp = gauss.T if side == "right" else gauss
    q = p.T if side == "right" else p
    torch.testing.assert_close(q @ (q.T @ gp), gp, atol=1e-10, rtol=0)


def test_matrix_is_a_pure_function_of_seed_and_draw():
    clear_cache()
    proj = projector("right")
    a = proj.matrix(fresh_state(proj, (6, 16), seed=3, draw=2), "cpu", torch.float32)
    assert proj.matrix(fresh_state(proj, (6, 16), seed=3, draw=2), "cpu", torch.float32) is a  # memo: one draw
    clear_cache()
    proj = projector("right")  # a new projector object (a new step) regenerates it
    b = proj.matrix(fresh_state(proj, (6, 16), seed=3, draw=2), "cpu", torch.float32)
    assert torch.equal(a, b) and a is not b
    expected = random_matrix(matrix_seed(3, 2), 4, 16, "right")
    assert torch.equal(a, expected)
    others = [proj.matrix(fresh_state(proj, (6, 16), seed=s, draw=k), "cpu", torch.float32)
              for s, k in ((3, 3), (4, 2), (2, 3))]
    for o in others:
        assert not torch.allclose(a, o)
    # independent of the generator state of the process
    torch.manual_seed(123)
    clear_cache()
    proj = projector("right")
    assert torch.equal(proj.matrix(fresh_state(proj, (6, 16), seed=3, draw=2), "cpu", torch.float32), a)


def test_draw_does_not_depend_on_the_compute_dtype():
    """An fp64 param with 8-bit moments keeps no fp64 tensor in its state (int8 codes, fp32 block
    maxima), so ``basis``/``transition`` regenerate the matrix in fp32: it must be the same draw as
    the fp64 one ``down`` projects with, or ``moment_policy="project"`` carries the moments with
    another subspace's matrix."""
    for kind in ("gaussian", "orthonormal"):
        torch.testing.assert_close(random_matrix(5, 3, 12, "right", kind, torch.float64),
                                   random_matrix(5, 3, 12, "right", kind, torch.float32).double(),
                                   rtol=0, atol=1e-6)
    w = torch.nn.Parameter(torch.randn(20, 12, dtype=torch.float64))
    opt = lrgrad.LowRankOptimizer([w], rule="adamw8bit", projector="random", rank=4, update_proj_gap=2,
                                  moment_min_size=0, moment_policy="project")
    w.grad = torch.randn(20, 12, dtype=torch.float64)
    opt.step()
    state = opt.state[w]
    proj = opt.projector_for(w, opt.param_groups[0])
    old, new = dict(state), {**state, "proj_refreshes": state["proj_refreshes"] + 1}
    p_old, p_new = (proj.matrix(s, "cpu", torch.float64) for s in (old, new))  # what down/up use
    torch.testing.assert_close(proj.transition(old, new).double(), p_old @ p_new.T, rtol=0, atol=1e-5)


def test_invalid_options():
    w = torch.nn.Parameter(torch.randn(8, 12))
    with pytest.raises(ValueError, match="random_basis"):
        one_matrix_opt(w, random_basis="uniform")
    with pytest.raises(ValueError, match="random_device"):
        one_matrix_opt(w, random_device="gpu")
    with pytest.raises(ValueError, match="random_v_transfer"):
        one_matrix_opt(w, random_v_transfer="reset")


# ---------------------------------------------------------------- the optimizer state
def test_state_holds_no_matrix_only_ints_and_moments():
    torch.manual_seed(0)
    model = TinyLM()
    opt = lrgrad.FloraAdamW(lrgrad.param_groups(model, rank=8, update_proj_gap=2), lr=1e-2)
    train(model, opt, 3)
    states = projected_states(opt)
    assert states
    for state in states:
        assert set(state) == SEEDED_KEYS | {"exp_avg", "exp_avg_sq"}
        for key in SEEDED_KEYS:
            assert type(state[key]) is int
        # moments only: max(m, n) x r each, nothing shaped like a basis with the other side
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape
        assert 8 in state["exp_avg"].shape
    flora = lrgrad.optimizer_state_bytes(opt)
    galore_model = TinyLM()
    galore = lrgrad.GaLoreAdamW(lrgrad.param_groups(galore_model, rank=8, update_proj_gap=2), lr=1e-2)
    train(galore_model, galore, 1)
    bases = sum(s["proj_basis"].numel() * 4 for s in galore.state.values() if "proj_basis" in s)
    assert lrgrad.optimizer_state_bytes(galore) - flora == bases


def test_same_seed_same_weights_different_seed_different_weights():
    def run(seed):
        torch.manual_seed(0)
        model = TinyLM()
        opt = lrgrad.FloraAdamW(lrgrad.param_groups(model, rank=8, update_proj_gap=2), lr=1e-2, seed=seed)
        losses = train(model, opt, 5)
        return model, losses

    a, losses = run(1)
    b, _ = run(1)
    c, _ = run(2)
    assert losses[-1] < losses[0]
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.allclose(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_resample_happens_every_gap_steps():
    w = torch.nn.Parameter(torch.randn(8, 12))
    opt = one_matrix_opt(w, update_proj_gap=3)
    proj = opt.projector_for(w, opt.param_groups[0])
    seen, bases = [], []
    for _ in range(7):
        w.grad = torch.randn(8, 12)
        opt.step()
        seen.append(opt.state[w]["proj_refreshes"])
        bases.append(proj.basis(opt.state[w]).clone())
    assert seen == [1, 1, 1, 2, 2, 2, 3]  # steps 1, 4, 7
    changed = [not torch.equal(bases[i], bases[i - 1]) for i in range(1, 7)]
    assert changed == [False, False, True, False, False, True]


@pytest.mark.parametrize("shape", [(8, 12), (12, 8)])  # left and right side
def test_momentum_transfer_equals_down_new_up_old_by_hand(shape):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    beta1, beta2 = 0.9, 0.999
    opt = one_matrix_opt(w, lr=0.01, betas=(beta1, beta2), update_proj_gap=2, weight_decay=0.0,
                         random_v_transfer="mean")
    proj = opt.projector_for(w, opt.param_groups[0])
    for _ in range(2):
        w.grad = torch.randn(shape, dtype=torch.float64)
        opt.step()
    state = opt.state[w]
    m_old, v_old = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    p_old = proj.basis(state).clone()
    g3 = torch.randn(shape, dtype=torch.float64)
    w.grad = g3
    opt.step()  # step 3: resample
    p_new = proj.basis(state)
    assert not torch.allclose(p_old, p_new)
    if proj.side == "right":  # up(x) = x P, down(G) = G Pᵀ
        m_moved, r3 = (m_old @ p_old) @ p_new.T, g3 @ p_new.T
        v_moved = v_old.mean(dim=1, keepdim=True).expand_as(v_old)
    else:  # up(x) = P x, down(G) = Pᵀ G
        m_moved, r3 = p_new.T @ (p_old @ m_old), p_new.T @ g3
        v_moved = v_old.mean(dim=0, keepdim=True).expand_as(v_old)
    torch.testing.assert_close(state["exp_avg"], beta1 * m_moved + (1 - beta1) * r3)
    torch.testing.assert_close(state["exp_avg_sq"], beta2 * v_moved + (1 - beta2) * r3 * r3)


def test_quadratic_v_transfer_option_and_adafactor_factor_mean():
    torch.manual_seed(0)
    shape = (12, 8)  # right side: Adafactor's column factor lies along the projected axis
    w = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    opt = one_matrix_opt(w, cls=lrgrad.FloraAdafactor, beta1=0.9, update_proj_gap=2, random_v_transfer="mean")
    proj = opt.projector_for(w, opt.param_groups[0])
    for _ in range(2):
        w.grad = torch.randn(shape, dtype=torch.float64)
        opt.step()
    state = opt.state[w]
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    state["proj_refreshes"] += 1
    proj.carry_moments(opt.rule_for(opt.param_groups[0]), state, before)
    torch.testing.assert_close(state["exp_avg_sq_col"], before["exp_avg_sq_col"].mean().expand(4))
    assert torch.equal(state["exp_avg_sq_row"], before["exp_avg_sq_row"])  # unprojected axis: kept
    t = proj.transition(before, state)
    torch.testing.assert_close(state["exp_avg"], before["exp_avg"] @ t)
    # "quadratic": the generic T∘T transfer
    quad = RandomProjector(4, 2, "right", {**proj.options, "random_v_transfer": "quadratic"})
    state2 = dict(before)
    state2["proj_refreshes"] += 1
    quad.carry_moments(opt.rule_for(opt.param_groups[0]), state2, before)
    torch.testing.assert_close(state2["exp_avg_sq_col"], before["exp_avg_sq_col"] @ (t * t))


def test_mean_v_transfer_estimates_new_second_moment():
    """Why "mean": for a fixed gradient the new draw's coordinates have E[R²] equal to the old
    coordinates' mean (isotropy of the draw), while T∘T inflates it by about n/r."""
    torch.manual_seed(0)
    m, n, r = 32, 64, 4  # 32 rows: v_old (one draw) has m·r = 128 chi-square terms, so its sum is not luck
    g = torch.randn(m, n, dtype=torch.float64)
    proj = projector("right", rank=r)
    old = fresh_state(proj, (m, n), seed=9, draw=1)
    v_old = proj.down(old, g) ** 2
    ratios_mean, ratios_quad = [], []
    for k in range(2, 400):
        new = fresh_state(proj, (m, n), seed=9, draw=k)
        v_new = proj.down(new, g) ** 2
        t = proj.transition(old, new).double()  # fresh states hold no moments: fp32 by default
        ratios_mean.append(v_old.mean(dim=1).sum() / v_new.mean(dim=1).sum())
        ratios_quad.append((v_old @ (t * t)).mean(dim=1).sum() / v_new.mean(dim=1).sum())
    mean_ratio = torch.stack(ratios_mean).median()
    quad_ratio = torch.stack(ratios_quad).median()
    assert 0.5 < mean_ratio < 2.0
    assert quad_ratio > 0.5 * n / r


# ---------------------------------------------------------------- checkpoints
def test_weights_only_round_trip_and_bit_identical_resume_across_resample():
    torch.manual_seed(0)
    model = TinyLM()
    opt = lrgrad.FloraAdamW(lrgrad.param_groups(model, rank=8, update_proj_gap=3), lr=1e-2, seed=7)
    train(model, opt, 2)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = TinyLM()
    model2.load_state_dict(ckpt["model"])
    opt2 = lrgrad.FloraAdamW(lrgrad.param_groups(model2, rank=8, update_proj_gap=3), lr=1e-2, seed=7)
    opt2.load_state_dict(ckpt["opt"])
    # regenerated matrices after torch.load are identical to the originals
    for (p1, s1), (p2, s2) in zip(opt.state.items(), opt2.state.items()):
        if "proj_seed" in s1:
            proj = opt.projector_for(p1, opt.param_groups[0])
            clear_cache()
            b1 = proj.basis(s1)
            clear_cache()
            assert torch.equal(b1, opt2.projector_for(p2, opt2.param_groups[0]).basis(s2))
    train(model, opt, 4)  # crosses the resample at step 4
    train(model2, opt2, 4)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert projected_states(opt)[0]["proj_refreshes"] == 2


@pytest.mark.parametrize("cls,kw", [(lrgrad.FloraAdafactor, {}), (lrgrad.FloraAdafactor, {"beta1": 0.9}),
                                    (lrgrad.LowRankLion, {"projector": "random", "lr": 3e-3}),
                                    (lrgrad.FloraAdamW, {"random_basis": "orthonormal", "scale": 4.0})])
def test_other_rules_and_orthonormal_train(cls, kw):
    torch.manual_seed(0)
    model = TinyLM()
    kw = {"lr": 1e-2, **kw}
    opt = cls(lrgrad.param_groups(model, rank=8, update_proj_gap=3), **kw)
    losses = train(model, opt, 12)
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: device generator")
def test_cuda_param_and_cpu_generators():
    proj_cpu = projector("right", device="cpu")
    state = fresh_state(proj_cpu, (6, 16))
    on_cuda = proj_cpu.matrix(state, "cuda", torch.float32)
    assert on_cuda.device.type == "cuda"
    assert torch.equal(on_cuda.cpu(), proj_cpu.matrix(state, "cpu", torch.float32))
    proj_dev = projector("right", device="param")
    clear_cache()
    a = proj_dev.matrix(state, "cuda", torch.float32)
    clear_cache()
    assert torch.equal(a, proj_dev.matrix(state, "cuda", torch.float32))


@pytest.mark.parametrize("kind,factor", [("gaussian", 16 / 4), ("orthonormal", 4 / 16)])
def test_transfer_scaling_and_auto_v_policy(kind, factor):
    """Flora's transfer scales E‖m‖² by d/r (Gaussian) or r/d (orthonormal); "auto" picks the v
    transfer that scales v alike for Gaussian (T∘T) and keeps it for orthonormal (mean)."""
    proj = projector("right", rank=4, kind=kind)
    x = torch.randn(3, 4, dtype=torch.float64)
    old = fresh_state(proj, (3, 16), seed=2, draw=1)
    ratios = []
    for k in range(2, 600):
        t = proj.transition(old, fresh_state(proj, (3, 16), seed=2, draw=k)).double()
        ratios.append(((x @ t) ** 2).sum() / (x**2).sum())
    assert abs(torch.stack(ratios).mean() / factor - 1) < 0.25
    w = torch.nn.Parameter(torch.randn(16, 12, dtype=torch.float64))  # right side: v is 16 x r
    opt = one_matrix_opt(w, cls=lrgrad.FloraAdamW, random_basis=kind, update_proj_gap=2)
    assert opt.param_groups[0]["random_v_transfer"] == "auto"
    for _ in range(2):
        w.grad = torch.randn(16, 12, dtype=torch.float64)
        opt.step()
    state = opt.state[w]
    proj = opt.projector_for(w, opt.param_groups[0])
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    state["proj_refreshes"] += 1
    proj.carry_moments(opt.rule_for(opt.param_groups[0]), state, before)
    t = proj.transition(before, state)
    v = before["exp_avg_sq"]
    expected = v @ (t * t) if kind == "gaussian" else v.mean(dim=1, keepdim=True).expand_as(v)
    torch.testing.assert_close(state["exp_avg_sq"], expected)


def test_each_step_draws_each_matrix_once(monkeypatch):
    """down() and the update of one step share one draw per param, even when a whole group is projected
    before any update runs (the fused Adam pass); the next step draws again (nothing is kept)."""
    import lrgrad.projectors.random as random_module

    calls = []
    original = random_module.random_matrix

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(random_module, "random_matrix", counting)
    clear_cache()
    params = [torch.nn.Parameter(torch.randn(24, 16)) for _ in range(4)]
    opt = lrgrad.FloraAdamW(params, lr=1e-3, rank=4, update_proj_gap=2)
    # step 1: the first draw; step 2: the same draw again (nothing kept between steps); step 3: a
    # resample, whose moment transfer regenerates the old draw too (moment_policy="project")
    for draws_per_param in (1, 1, 2):
        for p in params:
            p.grad = torch.randn_like(p)
        calls.clear()
        opt.step()
        assert len(calls) == draws_per_param * len(params) and len(set(calls)) == len(calls)
