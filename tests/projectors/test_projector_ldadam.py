"""LDAdam (arXiv:2410.16103): a subspace re-estimated every step, projection-aware moment transport
and generalized error feedback, against the paper's equations (tests/oracles.py) in fp64."""

from __future__ import annotations

import oracles
import pytest
import torch
from state_utils import regression_problem

import lrgrad

STEPS, RANK, LR, WD = 8, 4, 0.02, 0.1
SHAPES = {"right": (20, 12), "left": (12, 20)}
BETAS, EPS, RHO = (0.908, 0.99), 1e-8, 0.908


def _grad(w, x, y):
    return 2 * (w @ x - y) @ x.T


@pytest.mark.parametrize("error_feedback", [True, False])
@pytest.mark.parametrize("basis", ["power", "svd"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_matches_the_paper(side, basis, error_feedback):
    start, data = regression_problem(*SHAPES[side], STEPS, 8)
    w = torch.nn.Parameter(start.clone())
    opt = lrgrad.LDAdamW([{"params": [w], "rank": RANK, "proj_type": side}], lr=LR, weight_decay=WD,
                         ldadam_basis=basis, ldadam_error_feedback=error_feedback, scale=1.5)
    expected, state = start.clone(), {}
    for t, (x, y) in enumerate(data, start=1):
        w.grad = _grad(w.detach(), x, y)
        expected = oracles.ldadam_step(expected, _grad(expected, x, y), state, t, LR, WD, 1.5, RANK, side, BETAS,
                                       EPS, RHO, basis, error_feedback)
        opt.step()
        torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-10)
    assert opt.state[w]["proj_refreshes"] == STEPS  # a new subspace every step
    assert ("proj_error" in opt.state[w]) == error_feedback
    assert float((expected - start).abs().max()) > 0.05


def test_error_feedback_changes_the_trajectory():
    """The buffer really feeds back: with it off the same run ends elsewhere."""
    def run(error_feedback):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(20, 12, dtype=torch.float64))
        opt = lrgrad.LDAdamW([{"params": [w], "rank": 3}], lr=0.02, ldadam_error_feedback=error_feedback)
        gen = torch.Generator().manual_seed(1)
        for _ in range(6):
            w.grad = torch.randn(20, 12, generator=gen, dtype=torch.float64)
            opt.step()
        return w.detach()

    assert float((run(True) - run(False)).abs().max()) > 1e-3


def test_preset_has_the_reference_defaults():
    """IST-DASLab/LDAdam ``LDAdamW``: betas (0.908, 0.99), rho 0.908, power iteration, error feedback."""
    group = lrgrad.LDAdamW([torch.nn.Parameter(torch.zeros(4, 4))], rank=2).param_groups[0]
    assert (group["betas"], group["ldadam_rho"], group["ldadam_basis"], group["ldadam_error_feedback"]) == \
        ((0.908, 0.99), 0.908, "power", True)
    assert (group["update_proj_gap"], group["moment_policy"], group["scale"]) == (1, "project", 1.0)


def test_bad_options_are_value_errors_naming_them():
    for key, value in (("ldadam_rho", 1.5), ("ldadam_basis", "qr")):
        with pytest.raises(ValueError, match=key):
            lrgrad.LDAdamW([torch.nn.Parameter(torch.zeros(4, 4))], rank=2, **{key: value})


def test_randomized_svd_option_is_validated_and_changes_only_the_svds():
    """``ldadam_svd``: ``"exact"`` (``torch.linalg.svd``) or ``"randomized"`` (the seeded sketch FSDP2 runs);
    with the power iteration only step 1 takes an SVD, so the two runs differ yet both train."""
    with pytest.raises(ValueError, match="ldadam_svd"):
        lrgrad.LDAdamW([torch.nn.Parameter(torch.zeros(4, 4))], rank=2, ldadam_svd="qr")
    start, data = regression_problem(*SHAPES["right"], STEPS, 8)
    weights = {}
    for svd in ("exact", "randomized"):
        w = torch.nn.Parameter(start.clone())
        opt = lrgrad.LDAdamW([{"params": [w], "rank": RANK}], lr=LR, ldadam_svd=svd)
        for x, y in data:
            w.grad = _grad(w.detach(), x, y)
            opt.step()
        weights[svd] = w.detach()
    assert float((weights["exact"] - start).abs().max()) > 0.05
    assert not torch.equal(weights["exact"], weights["randomized"])
    torch.testing.assert_close(weights["randomized"], weights["exact"], rtol=0, atol=0.05)
