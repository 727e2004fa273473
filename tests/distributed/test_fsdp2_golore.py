"""FSDP2 (2 gloo processes, uneven row shards): GoLore's warm-up refreshes are the SVD projector's
sharded sketch, its random refreshes read no gradient (every rank draws the same seeded frame), so
the sharded run equals one process running the same sketch."""

from __future__ import annotations

import pytest
import torch
from harness import STEPS, full_state, make_model, make_optimizer, run_distributed, train_steps

from lrgrad.distributed import setup_parallel

SWITCH = 2  # gap 2: refreshes on 1 (SVD sketch), 3 and 5 (random)


def golore_worker(rank: int, world: int) -> dict:
    from lrgrad.projectors.golore import GoLoreProjector

    def must_not_gather(self, state, grad, step, group):
        raise AssertionError(f"{self.side}-side GoLore refresh all-gathered G")

    GoLoreProjector.refresh = must_not_gather  # this process only: every refresh must be the sharded one
    model = setup_parallel(make_model(), "fsdp2")
    opt = make_optimizer("GoLoreAdamW", model, golore_switch=SWITCH)
    train_steps(model, opt, 0, STEPS, rank, world)
    bases = {id(p): s["proj_basis"] for p, s in opt.state.items() if "proj_basis" in s}
    names = {id(p): n for n, p in model.named_parameters()}
    return {"weights": full_state(model), "bases": {names[k]: v for k, v in bases.items()}}


@pytest.fixture(scope="module")
def golore_results():
    return run_distributed(golore_worker)


def test_fsdp2_golore_equals_one_process(golore_results):
    model = make_model()
    opt = make_optimizer("GoLoreAdamW", model, golore_switch=SWITCH, svd="randomized")  # the sharded sketch
    train_steps(model, opt, 0, STEPS)
    expected = full_state(model)
    for rank_results in golore_results:
        for key, value in expected.items():
            torch.testing.assert_close(rank_results["weights"][key], value, rtol=0, atol=1e-10, msg=key)
    first, second = golore_results
    assert first["bases"].keys() == second["bases"].keys() and first["bases"]
    for key in first["bases"]:
        assert torch.equal(first["bases"][key], second["bases"][key]), key  # the same frame on every rank
