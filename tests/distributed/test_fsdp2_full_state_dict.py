"""FSDP2 checkpoints through torch's own full state dicts, the route of torchtitan-style loops.

``get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))``
gathers every DTensor of the lrgrad state (row-sharded moments and Conda's momentum, replicated
left-side moments, bases, Python-int counters) into plain tensors; rank 0 saves them with
``torch.save``; a fresh FSDP2 run loads them with ``broadcast_from_rank0=True`` and must continue
bit-identically; a single process loads the same file and follows the sharded run to float rounding.
"""

from __future__ import annotations

import os

import pytest
import torch
from harness import STEPS, full_state, make_model, make_optimizer, run_distributed, train_steps

from lrgrad.distributed import setup_parallel

SAVE_AT = 3
#: one right+left-side projector, and one with full-size row state (Conda's momentum)
CASES = {"GaLoreAdamW": {"svd": "randomized", "moment_policy": "project"}, "CondaAdamW": {"svd": "randomized"}}


def full_options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **extra)


def full_state_dict_worker(rank: int, world: int, folder: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    results = {}
    for name, options in CASES.items():
        path = os.path.join(folder, f"{name}.pt")
        model = setup_parallel(make_model(), "fsdp2")
        opt = make_optimizer(name, model, **options)
        train_steps(model, opt, 0, SAVE_AT, rank, world)
        saved = {"model": get_model_state_dict(model, options=full_options()),
                 "optim": get_optimizer_state_dict(model, opt, options=full_options())}
        if rank == 0:
            torch.save(saved, path)
        dist.barrier()
        train_steps(model, opt, SAVE_AT, STEPS, rank, world)
        results[name] = {"uninterrupted": full_state(model)}

        model = setup_parallel(make_model(), "fsdp2")
        opt = make_optimizer(name, model, **options)
        loaded = torch.load(path, weights_only=False) if rank == 0 else {"model": {}, "optim": {}}
        set_model_state_dict(model, loaded["model"], options=full_options(broadcast_from_rank0=True))
        set_optimizer_state_dict(model, opt, loaded["optim"], options=full_options(broadcast_from_rank0=True))
        train_steps(model, opt, SAVE_AT, STEPS, rank, world)
        results[name]["resumed"] = full_state(model)
    return results


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("full_state_dict"))
    return run_distributed(full_state_dict_worker, folder), folder


@pytest.mark.parametrize("name", list(CASES))
def test_full_state_dict_broadcast_from_rank0_resumes_bit_identically(full_runs, name):
    results, _ = full_runs
    for result in results:
        got, want = result[name]["resumed"], result[name]["uninterrupted"]
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("name", list(CASES))
def test_full_state_dict_loads_into_one_process(full_runs, name):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    results, folder = full_runs
    saved = torch.load(os.path.join(folder, f"{name}.pt"), weights_only=False)
    model = make_model()
    opt = make_optimizer(name, model, **CASES[name])
    model.load_state_dict(saved["model"])
    set_optimizer_state_dict(model, opt, saved["optim"], options=StateDictOptions(full_state_dict=True))
    assert all(not hasattr(v, "full_tensor") for s in opt.state.values() for v in s.values())
    train_steps(model, opt, SAVE_AT, STEPS)
    want = results[0][name]["uninterrupted"]
    for key, value in full_state(model).items():
        torch.testing.assert_close(value, want[key], atol=1e-10, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
