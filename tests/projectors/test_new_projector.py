"""Adding a projector is one file + one registry line (tests/toy_projector.py): the memory
estimator, every update rule, checkpoints and FSDP2 reach it through the protocol alone."""

from __future__ import annotations

import pytest
import torch
from state_utils import assert_states_equal, roundtrip
from tiny_model import TinyLM, lm_loss, make_batch
from toy_projector import CoordinateProjector

import lrgrad
from lrgrad.projectors import PROJECTORS
from lrgrad.rules import RULES


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyLM(hidden=24).double()


def test_registered_under_its_name():
    assert PROJECTORS["toy_coordinates"] is CoordinateProjector


@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_rule_runs_in_the_new_projector(rule):
    model = _model()
    opt = lrgrad.LowRankOptimizer(lrgrad.param_groups(model, rank=4, update_proj_gap=2), lr=1e-2, rule=rule,
                                  projector="toy_coordinates")
    batch = make_batch()
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(4):
        opt.zero_grad()
        lm_loss(model, batch).backward()
        opt.step()
    projected = [p for g in opt.param_groups for p in g["params"] if opt.is_projected(p, g)]
    assert projected and all(opt.state[p]["proj_basis"].shape[0] in (4, p.shape[0]) for p in projected)
    changed = [not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters())]
    assert all(changed) and all(torch.isfinite(p).all() for p in model.parameters())
    # its state is tensors and numbers: a weights_only round trip restores it exactly
    fresh = lrgrad.LowRankOptimizer(lrgrad.param_groups(model, rank=4, update_proj_gap=2), lr=1e-2, rule=rule,
                                    projector="toy_coordinates")
    fresh.load_state_dict(roundtrip(opt.state_dict()))
    assert_states_equal(fresh.state_dict()["state"], opt.state_dict()["state"])


def test_the_update_lives_in_the_chosen_coordinates():
    w = torch.nn.Parameter(torch.zeros(6, 10, dtype=torch.float64))
    opt = lrgrad.LowRankOptimizer([{"params": [w], "rank": 3, "proj_type": "right"}], lr=0.1, rule="lion",
                                  projector="toy_coordinates",
                                  weight_decay=0.0, scale=1.0)
    g = torch.zeros(6, 10, dtype=torch.float64)
    g[:, [1, 4, 7]] = torch.randn(6, 3, dtype=torch.float64) + 5.0
    g[:, [0, 2]] = 0.1
    w.grad = g
    opt.step()
    moved = (w.detach().abs().sum(dim=0) > 0).nonzero().flatten().tolist()
    assert moved == [1, 4, 7]


def test_estimator_counts_the_new_projector_exactly():
    model = _model()
    estimate = lrgrad.estimate_memory(model, "LowRankAdamW", rank=4, projector="toy_coordinates")
    opt = lrgrad.LowRankAdamW(lrgrad.param_groups(model, rank=4), lr=1e-3, projector="toy_coordinates")
    lm_loss(model, make_batch()).backward()
    opt.step()
    measured = lrgrad.optimizer_state_bytes(opt)
    assert estimate.optimizer_state + estimate.projector_state == measured


def _sharded_step(rank: int, world: int) -> dict[str, torch.Tensor]:
    import toy_projector  # noqa: F401  (registers the projector in this process)
    from harness import make_model

    from lrgrad.distributed import setup_parallel

    model = setup_parallel(make_model(), "fsdp2")
    opt = lrgrad.LowRankAdamW(lrgrad.param_groups(model, rank=4, update_proj_gap=2), lr=1e-2,
                              projector="toy_coordinates")
    torch.manual_seed(1)
    batch = make_batch()
    for _ in range(3):
        opt.zero_grad()
        lm_loss(model, batch).backward()
        opt.step()
    return {n: p.full_tensor().detach() for n, p in model.named_parameters()}


def test_fsdp2_step_with_the_new_projector_equals_one_process():
    from harness import make_model, run_distributed

    results = run_distributed(_sharded_step)
    model = make_model()
    opt = lrgrad.LowRankAdamW(lrgrad.param_groups(model, rank=4, update_proj_gap=2), lr=1e-2,
                              projector="toy_coordinates")
    torch.manual_seed(1)
    batch = make_batch()
    for _ in range(3):
        opt.zero_grad()
        lm_loss(model, batch).backward()
        opt.step()
    for name, p in model.named_parameters():
        for result in results:
            torch.testing.assert_close(result[name], p.detach(), rtol=1e-6, atol=1e-8)
