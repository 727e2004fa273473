"""FSDP2 (2 gloo processes, uneven row shards): FRUGAL's residual step is local to each shard (the
residual G − up(R) and its sign need only the shard's rows and the projector's maps), so the sharded
run equals one process in every projector, with no collective beyond the projector's own."""

from __future__ import annotations

import pytest
import torch
from harness import STEPS, full_state, make_model, make_optimizer, run_distributed, train_steps

from lrgrad.distributed import setup_parallel

PROJECTORS = ("svd", "grass", "random")


def frugal_worker(rank: int, world: int) -> dict:
    results = {}
    for projector in PROJECTORS:
        model = setup_parallel(make_model(), "fsdp2")
        opt = make_optimizer("FRUGALAdamW", model, projector=projector)
        train_steps(model, opt, 0, STEPS, rank, world)
        results[projector] = full_state(model)
    return results


@pytest.fixture(scope="module")
def frugal_results():
    return run_distributed(frugal_worker)


@pytest.mark.parametrize("projector", PROJECTORS)
def test_fsdp2_frugal_equals_one_process(frugal_results, projector):
    from lrgrad.projectors import PROJECTORS as REGISTRY

    model = make_model()
    # the one-process options that compute what the sharded refresh computes (the SVD's seeded sketch)
    opt = make_optimizer("FRUGALAdamW", model, projector=projector, **REGISTRY[projector].sharded_refresh_options)
    train_steps(model, opt, 0, STEPS)
    expected = full_state(model)
    for rank_results in frugal_results:
        for key, value in expected.items():
            torch.testing.assert_close(rank_results[projector][key], value, rtol=0, atol=1e-10, msg=key)
