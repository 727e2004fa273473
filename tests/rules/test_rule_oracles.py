"""Every rule on every path it runs, against the independent oracles of ``tests/oracles.py``.

Paths: full rank through torch's fused AdamW kernel, the foreach path and the one-param-at-a-time
loop; inside every projector (both sides, across subspace refreshes); per-layer updates
(``LayerwiseOptimizer`` with accumulation and active global-norm clipping); 8-bit blockwise
moments; INT8 weights (``lrgrad.quantize_weights``); bf16 params. Options are set away from their
defaults (distinct β1/β2, weight decay, eps) so a swapped or dropped term shows. fp64 params: the
oracles and the library agree to rounding.

The table of which test holds each rule's oracle on each path is in CONTRIBUTING.md
("Where each rule's oracle lives"); a new rule adds its equations to ``tests/oracles.py`` and its
options to ``OPTIONS`` below, and every path here covers it.
"""

from __future__ import annotations

import pytest
import torch
from oracles import MATRIX_RULES, full_rank_from_low_rank_step, full_rank_step, projected_step, top_subspace

import lrgrad

#: every option of every rule, away from the defaults
OPTIONS = {
    "adamw": {"betas": (0.8, 0.95), "eps": 1e-6},
    "adamw8bit": {"betas": (0.8, 0.95), "eps": 1e-6, "moment_block_size": 16, "moment_min_size": 0},
    "adafactor": {"beta1": 0.8, "beta2_decay": -0.7, "eps": 1e-30, "clip_threshold": 0.9},
    "lion": {"betas": (0.7, 0.97)},
    # ns_dtype="fp32": the oracles are exact math, so the iterates are pinned to fp32 on every machine
    # (bf16 iterates, the default where bf16 is native, meet the oracle in tests/rules/test_ns_dtype.py)
    "muon": {"momentum": 0.9, "nesterov": True, "ns_steps": 5, "ns_coefficients": (3.4445, -4.7750, 2.0315),
             "eps": 1e-4, "match_rms_adamw": False, "ns_dtype": "fp32"},
    # auon: the public code's brake (cosh(1.5 X), un-normalized numerator); hybrid_auon: the paper's
    # (the auon_normalize kernel); eps and rms_eps large enough that swapping them shows
    "auon": {"momentum": 0.9, "nesterov": False, "eps": 1e-4, "rms_eps": 1e-3, "gamma": 1.5,
             "normalize_numerator": False},
    "hybrid_auon": {"momentum": 0.9, "nesterov": True, "eps": 1e-4, "rms_eps": 1e-3, "gamma": 1.0,
                    "normalize_numerator": True, "ns_steps": 2, "ns_coefficients": (3.4445, -4.7750, 2.0315),
                    "ns_dtype": "fp32"},
}
ADAMW_FALLBACK = {"adamw_lr": 4e-3, "adamw_betas": (0.85, 0.9), "adamw_eps": 1e-7, "adamw_weight_decay": 0.05}
for _rule in MATRIX_RULES:
    OPTIONS[_rule].update(ADAMW_FALLBACK)
RULES = sorted(OPTIONS)
LR = {"adamw": 1e-2, "adamw8bit": 1e-2, "adafactor": 3e-2, "lion": 3e-3, "muon": 2e-2, "auon": 5e-2,
      "hybrid_auon": 5e-2}
WD = 0.1
STEPS = 5

#: (rule, path, options on top of OPTIONS[rule]); "8bit" keeps every moment 8-bit, the other adamw8bit
#: paths keep them fp32 (under ``moment_min_size``), which take AdamW's fused / foreach / loop paths.
#: The other rules have one full-rank path (a loop over params); "default" differs from "loop" only
#: for the matrix rules' 1-D params, whose AdamW fallback then takes the fused kernel.
FULL_RANK_PATHS = [
    ("adamw", "fused", {"fused": True}),
    ("adamw", "foreach", {"fused": False}),
    ("adamw", "loop", {"foreach": False}),
    ("adamw8bit", "fused", {"fused": True, "moment_min_size": 10**9}),
    ("adamw8bit", "foreach", {"fused": False, "moment_min_size": 10**9}),
    ("adamw8bit", "loop", {"foreach": False, "moment_min_size": 10**9}),
    ("adamw8bit", "8bit", {}),
] + [(rule, path, extra) for rule in RULES if rule not in ("adamw", "adamw8bit")
      for path, extra in (("loop", {"foreach": False}), ("default", {}))]


def gradients(shape, steps: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(steps)]


def spy(monkeypatch, name: str) -> list[int]:
    """Count calls of ``torch.<name>`` (to prove which path ran)."""
    calls = []
    original = getattr(torch, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, name, counting)
    return calls


@pytest.mark.parametrize("rule,path,extra", FULL_RANK_PATHS, ids=[f"{r}-{p}" for r, p, _ in FULL_RANK_PATHS])
def test_full_rank_matches_oracle(rule, path, extra, monkeypatch):
    options = {**OPTIONS[rule], **extra}
    shapes = [(10, 6), (6,)]  # a matrix and a vector (matrix rules: the AdamW fallback)
    params = [torch.nn.Parameter(torch.randn(*s, dtype=torch.float64)) for s in shapes]
    expected = [p.detach().clone() for p in params]
    opt = lrgrad.LowRankOptimizer(params, lr=LR[rule], rule=rule, weight_decay=WD, **options)
    fused, foreach = spy(monkeypatch, "_fused_adamw_"), spy(monkeypatch, "_foreach_addcdiv_")
    grads = [gradients(s, STEPS, seed=i + 1) for i, s in enumerate(shapes)]
    states = [{} for _ in shapes]
    for t in range(1, STEPS + 1):
        for p, g in zip(params, grads):
            p.grad = g[t - 1].clone()
        opt.step()
        expected = [full_rank_step(rule, e, g[t - 1], s, t, LR[rule], WD, options)
                    for e, g, s in zip(expected, grads, states)]
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-10, msg=f"{rule}/{path} step {t}")
    expect_fused = path == "fused" or (path == "default" and rule in MATRIX_RULES)
    assert bool(fused) == expect_fused and bool(foreach) == (path == "foreach"), (len(fused), len(foreach))
    quantized = ["exp_avg_codes" in opt.state[p] for p in params]
    assert all(quantized) if path == "8bit" else not any(quantized)


#: (rule, path, options): inside a projector; adamw8bit with 8-bit and with fp32 low-rank moments
PROJECTED = [(rule, "fp32" if rule == "adamw8bit" else "", {"moment_min_size": 10**9} if rule == "adamw8bit" else {})
             for rule in RULES] + [("adamw8bit", "8bit", {})]


@pytest.mark.parametrize("projector", sorted(lrgrad.PROJECTORS))
@pytest.mark.parametrize("shape,side", [((24, 16), "right"), ((16, 24), "left")])
@pytest.mark.parametrize("rule,path,extra", PROJECTED, ids=[f"{r}-{p}" if p else r for r, p, _ in PROJECTED])
def test_projected_matches_oracle(rule, path, extra, shape, side, projector):
    """Every rule in every projector: the oracle projects with the basis the step ran in (read through
    the projector's ``basis(state)``: a DCT selection, a seeded random matrix, INT4 codes, ...) and
    does the rest itself: R = down(G), the rule on R, p(1 - lr wd) - lr scale up(u)."""
    options = {**OPTIONS[rule], **extra}
    rank, scale = 4, 0.5
    w = torch.nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    expected = w.detach().clone()
    opt = lrgrad.LowRankOptimizer([w], lr=LR[rule], rule=rule, projector=projector, rank=rank, update_proj_gap=2,
                                  scale=scale, weight_decay=WD, **options)
    group = opt.param_groups[0]
    state: dict = {}
    previous = None
    for t, g in enumerate(gradients(shape, STEPS, seed=7), start=1):
        w.grad = g.clone()
        opt.step()
        # the basis this step ran in (a refresh happens before the step)
        basis = opt.projector_for(w, group).basis(opt.state[w])
        # basis() rebuilds a DCT basis in the state's float dtype: fp32 when the only float tensors
        # are 8-bit block maxima, while the step used fp64 columns (a rounding, not another basis)
        atol = 1e-10 if basis.dtype == torch.float64 or projector != "dct" else 1e-8
        basis = basis.to(torch.float64)
        assert basis.shape == ((rank, shape[1]) if side == "right" else (shape[0], rank))
        if projector == "svd" and t % 2 == 1:  # a refresh: the top-r subspace's energy, to svd_warm_tol
            gram = basis.T @ basis if side == "right" else basis @ basis.T
            top = top_subspace(g, rank, side)
            kept, best = ((g @ gram, g @ top) if side == "right" else (gram @ g, top @ g))
            assert float(kept.square().sum()) >= (1 - 1e-3) * float(best.square().sum())
        # online PCA projects G with the basis its PCA step started from (the previous step's) on
        # every step after the first, and goes back through the new one
        down_basis = previous if projector == "online_pca" and previous is not None else basis
        expected = projected_step(rule, expected, g, basis, side, state, t, LR[rule], WD, scale, options,
                                  down_basis=down_basis)
        torch.testing.assert_close(w.detach(), expected, rtol=0, atol=atol, msg=f"{rule} step {t}")
        previous = basis
    assert ("exp_avg_codes" in opt.state[w]) == (path == "8bit")


@pytest.mark.parametrize("rule", RULES)
def test_layerwise_matches_oracle(rule):
    """Per-layer updates with accumulation 2 and clipping: the oracle sums the micro-batch gradients,
    clips them by their exact global norm (torch's factor ``max_norm / (norm + 1e-6)``) and steps."""
    options = dict(OPTIONS[rule])
    rank, scale, max_norm, windows = 4, 0.5, 2.0, 3
    projected = torch.nn.Parameter(torch.randn(24, 16, dtype=torch.float64))
    full = [torch.nn.Parameter(torch.randn(10, 6, dtype=torch.float64)),
            torch.nn.Parameter(torch.randn(6, dtype=torch.float64))]
    params = [projected, *full]
    expected = [p.detach().clone() for p in params]
    opt = lrgrad.LowRankOptimizer([{"params": [projected], "rank": rank}, {"params": full}], lr=LR[rule],
                                  rule=rule, update_proj_gap=2, scale=scale, weight_decay=WD, **options)
    lw = lrgrad.LayerwiseOptimizer(opt, accumulation_steps=2, max_grad_norm=max_norm)
    micro = [gradients(p.shape, 2 * windows, seed=11 + i) for i, p in enumerate(params)]
    states = [{} for _ in params]
    for t in range(1, windows + 1):
        for k in (2 * t - 2, 2 * t - 1):
            # d/dp of sum(p * G) is G: each micro-batch delivers exactly these gradients to the hooks
            sum((p * g[k]).sum() for p, g in zip(params, micro)).backward()
            lw.step()
        summed = [g[2 * t - 2] + g[2 * t - 1] for g in micro]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in summed)).item()
        assert norm > max_norm  # the clip is active
        clipped = [g * min(1.0, max_norm / (norm + 1e-6)) for g in summed]
        basis = opt.state[projected]["proj_basis"]
        expected[0] = projected_step(rule, expected[0], clipped[0], basis, "right", states[0], t, LR[rule], WD,
                                     scale, options)
        for i in (1, 2):
            expected[i] = full_rank_step(rule, expected[i], clipped[i], states[i], t, LR[rule], WD, options)
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-10, msg=f"{rule} window {t}")
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("projected", [False, True], ids=["full", "projected"])
@pytest.mark.parametrize("rule", RULES)
def test_int8_weights_match_oracle(rule, projected):
    """INT8 weights (``lrgrad.quantize_weights``, round-to-nearest): each step is the oracle's step of
    the dequantized weight, stored within half a quantization step of its group."""
    from lrgrad.qweights import QuantizedLinear

    options = dict(OPTIONS[rule])
    rank, scale = 4, 0.5
    linear = torch.nn.Linear(16, 24, bias=False, dtype=torch.float64)
    module = QuantizedLinear.from_linear(linear, bits=8, group_size=16, rounding="nearest")
    w = module.weight  # the handle; the optimizer steps a dequantized work copy and requantizes it
    opt = lrgrad.LowRankOptimizer([w], lr=LR[rule], rule=rule, rank=rank if projected else None,
                                  update_proj_gap=2, scale=scale, weight_decay=WD, **options)
    state: dict = {}
    moved = 0.0
    for t, g in enumerate(gradients((24, 16), STEPS, seed=5), start=1):
        before = module.dequantize(torch.float64)
        w.grad = g.clone()
        opt.step()
        if projected:
            basis = opt.projector_for(w, opt.param_groups[0]).basis(opt.state[w])
            expected = projected_step(rule, before, g, basis, "right", state, t, LR[rule], WD, scale, options)
        else:
            expected = full_rank_step(rule, before, g, state, t, LR[rule], WD, options)
        after = module.dequantize(torch.float64)
        half_step = (module.scale.double() / 2).repeat_interleave(16).view(24, 16)
        assert bool(((after - expected).abs() <= half_step + 1e-6).all()), f"{rule} step {t}"
        moved = max(moved, ((expected - before).abs() / half_step).max().item())
    assert moved > 2  # the updates span several quantization steps: a wrong one would show


@pytest.mark.parametrize("projected", [False, True], ids=["full", "projected"])
@pytest.mark.parametrize("rule", RULES)
def test_bf16_params_match_oracle(rule, projected):
    """bf16 params: each step is the oracle's step from the current bf16 value, rounded once to bf16
    (the library computes in fp32, the oracle in fp64: at most one bf16 ulp apart)."""
    options = dict(OPTIONS[rule])
    rank, scale = 4, 0.5
    shapes = [(24, 16), (16,)]
    params = [torch.nn.Parameter((0.05 * torch.randn(*s)).to(torch.bfloat16)) for s in shapes]
    opt = lrgrad.LowRankOptimizer(params, lr=LR[rule], rule=rule, rank=rank if projected else None,
                                  update_proj_gap=2, scale=scale, weight_decay=WD, **options)
    states = [{} for _ in shapes]
    grads = [gradients(s, STEPS, seed=3 + i) for i, s in enumerate(shapes)]
    for t in range(1, STEPS + 1):
        before = [p.detach().double() for p in params]
        for p, g in zip(params, grads):
            p.grad = g[t - 1].to(torch.bfloat16)
        opt.step()
        for i, (p, g) in enumerate(zip(params, grads)):
            g32 = g[t - 1].to(torch.bfloat16).double()
            if projected and p.dim() == 2:
                basis = opt.projector_for(p, opt.param_groups[0]).basis(opt.state[p]).double()
                expected = projected_step(rule, before[i], g32, basis, "right", states[i], t, LR[rule], WD,
                                          scale, options)
            else:
                expected = full_rank_step(rule, before[i], g32, states[i], t, LR[rule], WD, options)
            assert p.dtype == torch.bfloat16
            assert (expected - before[i]).abs().max() > 2**-7 * before[i].abs().max()  # moved by ulps of the largest
            torch.testing.assert_close(p.detach().double(), expected, rtol=2**-7, atol=1e-30,
                                       msg=f"{rule} step {t} param {i}")


#: the full-rank updates from low-rank statistics: (full_rank, projector, scale_type, rank, scale), the
#: APOLLO, APOLLO-Mini and Fira presets' settings (scales away from 1 so a dropped factor shows)
FULL_RANK_MODES = {
    "apollo": ("apollo", "random", "channel", 4, 0.7),
    "apollo_mini": ("apollo", "random", "tensor", 1, 128 ** 0.5),
    "fira": ("fira", "svd", "channel", 4, 0.25),
}


def bf16_spacing(x: torch.Tensor) -> torch.Tensor:
    """The distance between neighbouring bf16 values around each entry of ``x`` (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(2.0**-126))) - 7)


@pytest.mark.parametrize("mode", sorted(FULL_RANK_MODES))
@pytest.mark.parametrize("rule", RULES)
def test_full_rank_bf16_params_are_the_oracle_rounded_once(rule, mode):
    """bf16 weights under APOLLO / APOLLO-Mini / Fira (``full_rank=``), both sides: the step is computed
    in fp32 and rounded to bf16 once, so every entry lies within half a bf16 spacing of the fp64
    oracle's step from the same bf16 value (plus fp32's own rounding, ~1e-3 of a spacing). Fira adds
    two terms (the scaled residual and ``scale·up(u)``): writing the first into the bf16 weight and then
    adding the second rounds twice, which puts a few percent of the entries up to one spacing off."""
    full_rank, projector, scale_type, rank, scale = FULL_RANK_MODES[mode]
    options = dict(OPTIONS[rule])
    shapes = [(24, 16), (16, 24)]  # right side (channels = rows), left side (channels = columns)
    gen = torch.Generator().manual_seed(11)
    params = [torch.nn.Parameter((0.05 * torch.randn(*s, generator=gen)).to(torch.bfloat16)) for s in shapes]
    opt = lrgrad.LowRankOptimizer(params, lr=LR[rule], rule=rule, projector=projector, rank=rank,
                                  update_proj_gap=2, scale=scale, weight_decay=WD, full_rank=full_rank,
                                  scale_type=scale_type, norm_growth_limit=1.01, **options)
    group = opt.param_groups[0]
    states = [{} for _ in shapes]
    grads = [gradients(s, STEPS, seed=3 + i) for i, s in enumerate(shapes)]
    for t in range(1, STEPS + 1):
        before = [p.detach().double() for p in params]
        for p, g in zip(params, grads):
            p.grad = g[t - 1].to(torch.bfloat16)
        opt.step()
        for i, p in enumerate(params):
            projector_obj = opt.projector_for(p, group)
            basis = projector_obj.basis(opt.state[p]).double()  # the subspace this step used
            g_bf16 = grads[i][t - 1].to(torch.bfloat16).double()
            expected = full_rank_from_low_rank_step(full_rank, rule, before[i], g_bf16, basis, projector_obj.side,
                                                    states[i], t, LR[rule], WD, scale, options, scale_type, 1.01)
            got = p.detach().double()
            assert p.dtype == torch.bfloat16
            assert (expected - before[i]).abs().max() > 2**-7 * before[i].abs().max()  # moved by ulps of the largest
            # fp32's own error on the largest operands: under a thousandth of their bf16 spacing
            bound = 0.5 * bf16_spacing(expected) + 2**-20 * before[i].abs().max()
            excess = (got - expected).abs() - bound
            assert float(excess.max()) <= 0, (
                f"{rule} {mode} step {t} param {i}: {int((excess > 0).sum())} of {excess.numel()} entries more "
                f"than half a bf16 spacing from the oracle (rounded twice?)")
            torch.testing.assert_close(float(opt.state[p]["limiter_norm"]), float(states[i]["limiter_prev"]),
                                       rtol=1e-4, atol=0)
