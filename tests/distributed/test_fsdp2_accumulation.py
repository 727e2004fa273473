"""Flora's compressed accumulation (``CompressedAccumulator``) under FSDP2.

FSDP2 runs the post-accumulate-grad hooks on each rank's reduce-scattered row shard, so each
micro-batch is compressed from its reduced rows: the right side keeps its rows of ``G Pᵀ``, the left
side all-reduces ``Σ_i P_iᵀ G_i`` with the rows of the draw the step will use. The weights must
equal one process accumulating the whole batch in ``.grad``, across Flora's resamples.
"""

from __future__ import annotations

import pytest
import torch
from harness import full_state, make_model, make_optimizer, run_distributed

import lrgrad
from lrgrad.distributed import setup_parallel

WINDOWS, MICRO = 3, 2  # resamples on windows 1 and 3 (GAP = 2)


def windows(model, step, rank: int = 0, world: int = 1) -> None:
    from tiny_model import lm_loss, make_batch

    for w in range(WINDOWS):
        for j in range(MICRO):
            tokens = make_batch(seed=100 * w + j)
            rows = tokens.shape[0] // world
            (lm_loss(model, tokens[rank * rows:(rank + 1) * rows]) / MICRO).backward()
        step()


def fsdp2_accumulation_worker(rank: int, world: int) -> dict:
    from lrgrad.dtensor import is_dtensor

    model = setup_parallel(make_model(), "fsdp2")
    opt = make_optimizer("FloraAdamW", model)
    acc = lrgrad.CompressedAccumulator(opt)
    sides = {opt.projector_for(p, opt.group_of(p)).side for p in acc.compressed_params}

    def step():
        acc.step()
        acc.zero_grad()

    windows(model, step, rank, world)
    try:
        acc.all_reduce()
        refusal = "no error"
    except ValueError as exc:
        refusal = str(exc)
    return {"weights": full_state(model), "sides": sides, "refusal": refusal,
            "sharded": all(is_dtensor(p) for p in acc.compressed_params)}


@pytest.fixture(scope="module")
def fsdp2_runs():
    return run_distributed(fsdp2_accumulation_worker)


def test_fsdp2_compressed_accumulation_equals_one_process(fsdp2_runs):
    model = make_model()
    opt = make_optimizer("FloraAdamW", model)

    def step():
        opt.step()
        opt.zero_grad()

    windows(model, step)
    want = full_state(model)
    for result in fsdp2_runs:
        assert result["sharded"] and result["sides"] == {"left", "right"}
        for key, value in result["weights"].items():
            torch.testing.assert_close(value, want[key], atol=1e-10, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def test_fsdp2_all_reduce_is_refused(fsdp2_runs):
    for result in fsdp2_runs:
        assert "FSDP2" in result["refusal"] and "step() directly" in result["refusal"]
