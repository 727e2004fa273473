"""FSDP2 (2 gloo processes, uneven row shards): Grass refreshes from all-reduced column scores
(right side) and all-gathered row scores (left side) — never from an all-gathered G — and trains
exactly as one process does, for the deterministic and the sampled selection."""

from __future__ import annotations

import pytest
import torch
from harness import STEPS, full_state, make_model, make_optimizer, run_distributed, train_steps

from lrgrad.distributed import setup_parallel

SELECTIONS = ("top", "norm")


def grass_worker(rank: int, world: int) -> dict:
    from lrgrad.projectors.grass import GrassProjector

    def must_not_gather(self, state, grad, step, group):
        raise AssertionError(f"{self.side}-side Grass refresh all-gathered G")

    GrassProjector.refresh = must_not_gather  # this process only: the sharded refresh must serve every call
    results = {}
    for select in SELECTIONS:
        model = setup_parallel(make_model(), "fsdp2")
        opt = make_optimizer("GrassAdamW", model, grass_select=select)
        train_steps(model, opt, 0, STEPS, rank, world)
        sides = {opt.projector_for(p, g).side for g in opt.param_groups for p in g["params"] if opt.is_projected(p, g)}
        results[select] = {"weights": full_state(model), "sides": sides}
    return results


@pytest.fixture(scope="module")
def grass_results():
    return run_distributed(grass_worker)


@pytest.mark.parametrize("select", SELECTIONS)
def test_fsdp2_grass_equals_one_process(grass_results, select):
    model = make_model()
    opt = make_optimizer("GrassAdamW", model, grass_select=select)
    train_steps(model, opt, 0, STEPS)
    expected = full_state(model)
    for rank_results in grass_results:
        assert rank_results[select]["sides"] == {"left", "right"}  # both sharded refreshes ran
        got = rank_results[select]["weights"]
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-10, msg=key)
