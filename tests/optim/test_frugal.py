"""FRUGAL (``full_rank="frugal"``, arXiv:2412.07837) against the paper's equations written out in
tests/oracles.py, in fp64, inside three projectors and on both sides; its state is the subspace
rule's only; the preset has the reference's defaults."""

from __future__ import annotations

import oracles
import pytest
import torch
from state_utils import regression_problem

import lrgrad
from lrgrad.estimate import make_optimizer
from lrgrad.optim.full_rank import LIMITER_KEY

STEPS, GAP, RANK, LR, WD = 10, 4, 3, 0.02, 0.1
SHAPES = {"right": (20, 9), "left": (7, 18)}
BETAS, EPS = (0.9, 0.999), 1e-8


def _grad(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 2 * (w @ x - y) @ x.T  # d/dW ‖Wx − y‖²: the gradient follows the weights


def _oracle_basis(projector: str, g: torch.Tensor, side: str, ours: torch.Tensor) -> torch.Tensor:
    """The subspace as the oracle chooses it: the SVD's top-r (FRUGAL's GaLore projection, the
    reference's ``torch.linalg.svd``), Grass's top-r rows; a seeded random draw is read from ours
    (it does not depend on the gradient)."""
    if projector == "svd":
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        return vh[:RANK] if side == "right" else u[:, :RANK]
    if projector == "grass":
        d = g.shape[1] if side == "right" else g.shape[0]
        return oracles.grass_basis(oracles.grass_top_indices(g, RANK, side), None, d, side)
    return ours


def _run(projector: str, side: str, moment_policy: str = "keep", scale: float = 0.7, residual: float = 0.5):
    start, data = regression_problem(*SHAPES[side], STEPS, 12)
    w = torch.nn.Parameter(start.clone())
    opt = lrgrad.FRUGALAdamW([{"params": [w], "rank": RANK, "proj_type": side}], lr=LR, weight_decay=WD,
                             projector=projector, update_proj_gap=GAP, scale=scale, frugal_lr_scale=residual,
                             moment_policy=moment_policy, **({"svd": "exact"} if projector == "svd" else {}))
    expected, state, basis = start.clone(), {}, None
    diffs = []
    for t, (x, y) in enumerate(data, start=1):
        w.grad = _grad(w.detach(), x, y)
        g = _grad(expected, x, y)
        opt.step()
        if (t - 1) % GAP == 0:
            ours = opt.projector_for(w, opt.param_groups[0]).basis(opt.state[w])
            basis = _oracle_basis(projector, g, side, ours)
            if t > 1 and moment_policy == "reset":  # lrgrad's reset: zero moments, the step count goes on
                state = {}
        expected = oracles.frugal_step(expected, g, basis, side, state, t, LR, WD, scale, residual,
                                       {"betas": BETAS, "eps": EPS})
        diffs.append(float((w.detach() - expected).abs().max()))
    moved = float((expected - start).abs().max())
    return diffs, moved, opt, w


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("projector", ["svd", "random", "grass"])
def test_matches_the_paper(projector, side):
    diffs, moved, _, _ = _run(projector, side)
    assert moved > 0.05
    assert max(diffs) < 1e-12, diffs


@pytest.mark.parametrize("side", ["right", "left"])
def test_matches_the_paper_with_moment_reset(side):
    diffs, _, _, _ = _run("svd", side, moment_policy="reset")
    assert max(diffs) < 1e-12, diffs


def test_the_residual_moves_every_entry_and_keeps_no_state():
    """The subspace alone moves W only inside span(P); FRUGAL moves every entry (sign of the residual)
    and keeps only the rule's low-rank moments and the projector's basis (and the 0-d slot every
    ``full_rank`` mode allocates for the limiter, which FRUGAL leaves unused at −1)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(20, 9, dtype=torch.float64))
    opt = lrgrad.FRUGALAdamW([{"params": [w], "rank": RANK}], lr=LR, weight_decay=0.0)
    before = w.detach().clone()
    w.grad = torch.randn(20, 9, dtype=torch.float64)
    opt.step()
    assert bool(((w.detach() - before).abs() > 0).all())
    tensors = {k: tuple(v.shape) for k, v in opt.state[w].items() if isinstance(v, torch.Tensor)}
    assert tensors == {"exp_avg": (20, RANK), "exp_avg_sq": (20, RANK), "proj_basis": (RANK, 9), LIMITER_KEY: ()}
    assert float(opt.state[w][LIMITER_KEY]) == -1.0


def test_preset_has_the_reference_defaults():
    """fzmushko/FRUGAL: proj_params_lr_scale = inactive_lr_scale = 1, sign_sgd on the residual, no limiter."""
    group = lrgrad.FRUGALAdamW([torch.nn.Parameter(torch.zeros(4, 4))], rank=2).param_groups[0]
    assert (group["full_rank"], group["scale"], group["frugal_lr_scale"], group["norm_growth_limit"]) == \
        ("frugal", 1.0, 1.0, None)
    assert group["projector"] == "svd" and lrgrad.ALIASES["frugal"] == "FRUGALAdamW"


def test_bad_residual_scale_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="frugal_lr_scale"):
        lrgrad.FRUGALAdamW([torch.nn.Parameter(torch.zeros(4, 4))], rank=2, frugal_lr_scale=-1.0)


def test_estimator_counts_frugal_exactly():
    from tiny_model import TinyLM, train

    model = TinyLM()
    estimate = lrgrad.estimate_memory(model, "frugal", rank=8)
    opt = make_optimizer(model, "frugal", rank=8, lr=1e-3)
    train(model, opt, 1)
    assert estimate.optimizer_state + estimate.projector_state == lrgrad.optimizer_state_bytes(opt)
