"""Every projector x every update rule, and the properties every projector must have.

Parametrized over ``lrgrad.PROJECTORS`` and ``lrgrad.RULES``: a projector or rule
registered later is covered without touching this file.
"""

from __future__ import annotations

import copy

import pytest
import torch
from state_utils import assert_states_equal, roundtrip
from tiny_model import TinyLM, train

import lrgrad
from lrgrad.optim.lowrank import LowRankOptimizer

PROJECTOR_NAMES = sorted(lrgrad.PROJECTORS)
RULE_NAMES = sorted(lrgrad.RULES)

#: learning rates at which each rule trains the tiny model in a few steps
RULE_LR = {"lion": 3e-3, "adafactor": 3e-2, "auon": 5e-2, "hybrid_auon": 5e-2, "muon": 2e-2}


def rule_lr(rule: str) -> float:
    return RULE_LR.get(rule, 1e-2)


def make(model: torch.nn.Module, projector: str, rule: str = "adamw", gap: int = 5, **options) -> LowRankOptimizer:
    return LowRankOptimizer(lrgrad.param_groups(model, rank=8, update_proj_gap=gap), lr=rule_lr(rule),
                            projector=projector, rule=rule, **options)


@pytest.mark.parametrize("rule", RULE_NAMES)
@pytest.mark.parametrize("projector", PROJECTOR_NAMES)
def test_every_projector_trains_with_every_rule(projector, rule):
    torch.manual_seed(0)
    model = TinyLM()
    opt = make(model, projector, rule)
    losses = train(model, opt, steps=25)
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses
    projected = [(p, g) for g in opt.param_groups for p in g["params"] if opt.is_projected(p, g)]
    assert len(projected) == 14
    for p, group in projected:
        assert opt.projector_for(p, group).has_basis(opt.state[p])


#: rules that produce a direction APOLLO/Fira can read channel scales off (FRUGAL adds it to its residual step)
DIRECTION_RULES = ("adamw", "adamw8bit", "adafactor", "lion")


@pytest.mark.parametrize("full_rank", ["apollo", "fira", "frugal"])
@pytest.mark.parametrize("rule", DIRECTION_RULES)
@pytest.mark.parametrize("projector", PROJECTOR_NAMES)
def test_full_rank_updates_train_with_every_projector_and_rule(projector, rule, full_rank):
    """APOLLO's / Fira's / FRUGAL's full-rank update (``full_rank=...``) in every projector, every direction rule."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = make(model, projector, rule, full_rank=full_rank)
    losses = train(model, opt, steps=15)
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0], losses
    projected = [(p, g) for g in opt.param_groups for p in g["params"] if opt.is_projected(p, g)]
    assert len(projected) == 14
    for p, _ in projected:
        limiter = opt.state[p]["limiter_norm"]
        if full_rank == "frugal":  # a state-free residual step: FRUGAL has no limiter
            assert limiter.dim() == 0 and float(limiter) == -1
        else:
            assert limiter.dim() == 0 and float(limiter) > 0  # the limiter saw every step


@pytest.mark.parametrize("full_rank", ["apollo", "fira", "frugal"])
@pytest.mark.parametrize("projector", PROJECTOR_NAMES)
def test_full_rank_resume_is_bit_identical(projector, full_rank):
    """APOLLO/Fira/FRUGAL: 5 steps straight == 2 steps + weights_only save/load + 3 steps (refreshes on 1, 3, 5)."""
    torch.manual_seed(2)
    reference = TinyLM()
    start = copy.deepcopy(reference.state_dict())
    train(reference, make(reference, projector, gap=2, full_rank=full_rank), steps=5)

    first = TinyLM()
    first.load_state_dict(start)
    train(first, opt := make(first, projector, gap=2, full_rank=full_rank), steps=2)
    checkpoint = roundtrip({"model": first.state_dict(), "opt": opt.state_dict()})

    resumed = TinyLM()
    resumed.load_state_dict(checkpoint["model"])
    opt_resumed = make(resumed, projector, gap=2, full_rank=full_rank)
    opt_resumed.load_state_dict(checkpoint["opt"])
    train(resumed, opt_resumed, steps=3, batch_seed=2)
    for (key, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


# ---------------------------------------------------------------------------- projector properties
def one_step(projector: str, shape: tuple[int, int], proj_type: str):
    """A single projected fp64 matrix after one step; returns (optimizer, param, projector, state, G)."""
    torch.manual_seed(1)
    param = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    opt = LowRankOptimizer([param], lr=1e-3, projector=projector, rank=4, update_proj_gap=1, proj_type=proj_type)
    param.grad = torch.randn(shape, dtype=torch.float64)
    opt.step()
    group = opt.param_groups[0]
    proj = opt.projector_for(param, group)
    assert proj.side == proj_type
    grad = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return opt, param, proj, opt.state[param], grad


def orthonormality_tol(projector: str, state: dict) -> float:
    if projector == "online_pca":
        return lrgrad.PROJECTORS[projector].option_defaults["pca_ortho_tol"]
    return 1e-10


@pytest.mark.parametrize("proj_type", ["right", "left"])
@pytest.mark.parametrize("projector", PROJECTOR_NAMES)
def test_back_projection_is_the_projection_onto_the_subspace(projector, proj_type):
    _, _, proj, state, g = one_step(projector, (24, 20), proj_type)
    p = proj.basis(state).to(torch.float64)
    shape = (4, 20) if proj_type == "right" else (24, 4)
    assert tuple(p.shape) == shape
    low = proj.down(state, g)
    back = proj.up(state, low)
    # down/up are the maps of the basis the projector reports
    if proj_type == "right":
        torch.testing.assert_close(low, g @ p.T, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(back, g @ p.T @ p, rtol=1e-10, atol=1e-10)
        rows = p  # span of the rows of P
    else:
        torch.testing.assert_close(low, p.T @ g, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(back, p @ p.T @ g, rtol=1e-10, atol=1e-10)
        rows = p.T
    # the orthogonal projector onto span(P) (valid for any full-rank P)
    gram_inv = torch.linalg.inv(rows @ rows.T)
    ortho = rows.T @ gram_inv @ rows  # d x d
    proj_g = g @ ortho if proj_type == "right" else ortho @ g
    # up(down(G)) always lies in span(P) ...
    in_span = back @ ortho if proj_type == "right" else ortho @ back
    torch.testing.assert_close(in_span, back, rtol=1e-8, atol=1e-8)
    if proj.orthonormal:
        # ... and for an orthonormal basis it *is* the orthogonal projection of G
        tol = orthonormality_tol(projector, state)
        drift = torch.linalg.matrix_norm(rows @ rows.T - torch.eye(4, dtype=torch.float64))
        assert drift <= tol
        torch.testing.assert_close(back, proj_g, rtol=0, atol=4 * tol * float(g.norm()))
        # idempotent: projecting twice changes nothing
        torch.testing.assert_close(proj.up(state, proj.down(state, back)), back, rtol=0,
                                   atol=4 * tol * float(g.norm()))


@pytest.mark.parametrize("projector", PROJECTOR_NAMES)
def test_fused_update_matches_up(projector):
    _, _, proj, state, g = one_step(projector, (24, 20), "right")
    low = proj.down(state, g)
    w = torch.randn(24, 20, dtype=torch.float64)
    expected = 0.9 * w - 0.5 * proj.up(state, low)
    proj.update_param_(state, w, low, alpha=-0.5, decay=0.9)
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- checkpoints



@pytest.mark.parametrize("projector", PROJECTOR_NAMES)
def test_state_survives_weights_only_load(projector):
    model = TinyLM()
    opt = make(model, projector, gap=2)
    train(model, opt, steps=5)
    fresh = make(model, projector, gap=2)
    fresh.load_state_dict(roundtrip(opt.state_dict()))
    assert_states_equal(opt.state_dict()["state"], fresh.state_dict()["state"])


@pytest.mark.parametrize("rule", ["adamw", "lion"])
@pytest.mark.parametrize("projector", PROJECTOR_NAMES)
def test_resume_is_bit_identical_across_refreshes(projector, rule):
    """7 steps straight == 3 steps + weights_only save/load + 4 steps (refreshes on 1, 3, 5, 7)."""
    torch.manual_seed(2)
    reference = TinyLM()
    start = copy.deepcopy(reference.state_dict())
    train(reference, make(reference, projector, rule, gap=2), steps=7)

    first = TinyLM()
    first.load_state_dict(start)
    train(first, opt := make(first, projector, rule, gap=2), steps=3)
    checkpoint = roundtrip({"model": first.state_dict(), "opt": opt.state_dict()})

    resumed = TinyLM()
    resumed.load_state_dict(checkpoint["model"])
    opt_resumed = make(resumed, projector, rule, gap=2)
    opt_resumed.load_state_dict(checkpoint["opt"])
    train(resumed, opt_resumed, steps=4, batch_seed=3)
    for (key, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
