"""FSDP2 refuses a projector that declares ``supports_sharding = False`` (every built-in one runs on row
shards; the flag is for third-party projectors that need G whole every step): a ``ValueError`` that
names the projector and FSDP2, on every rank, before the step writes anything - for ``opt.step()``
(``check_projectable``) and for per-layer updates (``LayerwiseOptimizer`` checks at construction;
``ShardedProjector`` refuses to wrap it as a backstop). The same projector trains in one process."""

from __future__ import annotations

import torch
from harness import GAP, full_state, make_model, run_distributed, train_steps

import lrgrad
from lrgrad.distributed import setup_parallel

NAME = "test_whole_gradient"


def register_unshardable() -> None:
    """A test-local projector (registered in the spawned workers only): GaLore's SVD, declared unshardable."""
    from lrgrad.projectors import PROJECTORS, register_projector
    from lrgrad.projectors.svd import SVDProjector

    class WholeGradientProjector(SVDProjector):
        name = NAME
        supports_sharding = False

    if NAME not in PROJECTORS:
        register_projector(WholeGradientProjector)


def make_optimizer(model):
    return lrgrad.LowRankOptimizer(lrgrad.param_groups(model, rank=8, update_proj_gap=GAP), lr=1e-2,
                                   projector=NAME)


def refusal_worker(rank: int, world: int) -> dict:
    register_unshardable()
    results = {}
    for how in ("step", "layerwise"):
        model = setup_parallel(make_model(), "fsdp2")
        before = full_state(model)
        opt = make_optimizer(model)
        try:
            stepper = lrgrad.LayerwiseOptimizer(opt) if how == "layerwise" else opt
            train_steps(model, stepper, 0, 1, rank, world)
            results[how] = None
        except ValueError as exc:
            changed = [k for k, v in full_state(model).items() if not torch.equal(v, before[k])]
            results[how] = (str(exc), changed)
    model = make_model()  # one process: the flag changes nothing
    before = full_state(model)
    train_steps(model, make_optimizer(model), 0, 2)
    results["one_process_trained"] = any(not torch.equal(v, before[k]) for k, v in full_state(model).items())
    return results


def test_fsdp2_refuses_an_unshardable_projector_before_any_write():
    for rank_results in run_distributed(refusal_worker):
        for how in ("step", "layerwise"):
            refused = rank_results[how]
            assert refused is not None, f"{how}: stepped on FSDP2-sharded params"
            message, changed = refused
            assert message.startswith("Invalid params") and "FSDP2" in message and NAME in message, message
            assert "supports_sharding=False" in message
            assert changed == [], f"{how}: the refused step wrote {changed}"
        assert rank_results["one_process_trained"]


class StackedExperts(torch.nn.Module):
    """A fused MoE experts module: (num_experts, out, in) stacks."""

    def __init__(self):
        super().__init__()
        self.num_experts = 4
        self.gate_up_proj = torch.nn.Parameter(torch.randn(4, 24, 16, dtype=torch.float64))
        self.down_proj = torch.nn.Parameter(torch.randn(4, 16, 12, dtype=torch.float64))


class TinyMoE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16, dtype=torch.float64)
        self.experts = StackedExperts()
        self.out = torch.nn.Linear(16, 4, dtype=torch.float64)


def expert_stack_worker(rank: int, world: int) -> dict:
    """FSDP2's Shard(0) gives each rank whole experts (tests/distributed/test_fsdp2_experts.py); a stack
    sharded along another dim splits every expert: a ValueError naming the stack, at construction (params
    sharded first) and at the first step (params swapped for DTensors after construction, as Accelerate
    does)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    def by_columns(p):
        return Shard(1) if p.dim() == 3 else Shard(0)

    results = {}
    torch.manual_seed(0)
    model = fully_shard(TinyMoE(), shard_placement_fn=by_columns)
    try:
        lrgrad.GaLoreAdamW(model.named_parameters(), rank=4)
        results["construction"] = None
    except ValueError as exc:
        results["construction"] = str(exc)
    model = TinyMoE()
    opt = lrgrad.GaLoreAdamW(model.named_parameters(), rank=4)
    fully_shard(model, shard_placement_fn=by_columns)
    for group in opt.param_groups:  # Accelerate's prepare: the same positions, now DTensors
        group["params"] = [dict(model.named_parameters())[n] for n in group["param_names"]]
    before = full_state(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    try:
        opt.step()
        results["step"] = None
    except ValueError as exc:
        results["step"] = str(exc)
    results["changed"] = [k for k, v in full_state(model).items() if not torch.equal(v, before[k])]
    return results


def test_fsdp2_refuses_expert_stacks_sharded_across_experts_by_name():
    for rank_results in run_distributed(expert_stack_worker):
        for when in ("construction", "step"):
            message = rank_results[when]
            assert message is not None and "expert stack 'experts." in message and "Shard(dim=1)" in message, (
                when, message)
        assert rank_results["changed"] == []
