"""DDP: every lrgrad optimizer keeps identical state on every rank and matches one process.

Two gloo processes each take half of the global batch; DDP averages the
gradients, so weights after N steps (with subspace refreshes) must equal the
single-process run on the whole batch, and every rank's projector state must
be identical (bases, seeds, counters).
"""

from __future__ import annotations

import pytest
import torch
from harness import GAP, STEPS, available, full_state, make_model, make_optimizer, run_distributed, train_steps

import lrgrad

NAMES = available()


def ddp_worker(rank: int, world: int, names: list[str]) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lrgrad.distributed import ddp_layerwise

    results = {}
    for name in names:
        model = make_model()
        ddp = DDP(model)
        opt = make_optimizer(name, model)
        train_steps(ddp, opt, 0, STEPS, rank, world)
        names_by_id = {id(p): n for n, p in model.named_parameters()}
        results[name] = {"weights": full_state(model),
                         "state": {names_by_id[id(p)]: dict(s) for p, s in opt.state.items()}}
    # per-layer updates: the step runs in DDP's comm hook, after each bucket's all-reduce
    model = make_model()
    ddp = DDP(model, bucket_cap_mb=0.01)  # several buckets: updates overlap the backward
    lw = lrgrad.LayerwiseOptimizer(make_optimizer("GaLoreAdamW", model))
    ddp_layerwise(ddp, lw)
    train_steps(ddp, lw, 0, STEPS, rank, world)
    results["layerwise"] = {"weights": full_state(model)}
    return results


@pytest.fixture(scope="module")
def ddp_results():
    return run_distributed(ddp_worker, NAMES)


def single_process(name: str) -> tuple[dict, torch.optim.Optimizer]:
    model = make_model()
    opt = make_optimizer(name, model)
    train_steps(model, opt, 0, STEPS)
    return full_state(model), opt


def assert_same_weights(got: dict, want: dict, atol: float = 1e-10) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_ddp_weights_match_single_process(ddp_results, name):
    want, opt = single_process(name)
    # the run did refresh the subspace more than once
    refreshes = [s["proj_refreshes"] for s in opt.state.values() if "proj_refreshes" in s]
    assert refreshes and max(refreshes) == (STEPS - 1) // GAP + 1
    for rank_result in ddp_results:
        assert_same_weights(rank_result[name]["weights"], want)


@pytest.mark.parametrize("name", NAMES)
def test_ddp_projector_state_identical_across_ranks(ddp_results, name):
    a, b = ddp_results[0][name]["state"], ddp_results[1][name]["state"]
    assert a.keys() == b.keys()
    projected = 0
    for pname in a:
        assert a[pname].keys() == b[pname].keys()
        for key, value in a[pname].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[pname][key]), f"{pname}.{key} differs across ranks"
            else:
                assert value == b[pname][key], f"{pname}.{key} differs across ranks"
        projected += any(k.startswith("proj_") for k in a[pname])
    assert projected == 14  # 7 projected matrices per block, 2 blocks


def test_ddp_layerwise_matches_single_process(ddp_results):
    model = make_model()
    lw = lrgrad.LayerwiseOptimizer(make_optimizer("GaLoreAdamW", model))
    train_steps(model, lw, 0, STEPS)
    want, _ = single_process("GaLoreAdamW")
    assert_same_weights(full_state(model), want)  # layerwise == plain step (single process)
    for rank_result in ddp_results:
        assert_same_weights(rank_result["layerwise"]["weights"], want)


def test_layerwise_without_comm_hook_would_differ():
    """The reason for ``ddp_layerwise``: stepping from un-reduced (per-rank) gradients
    diverges from the global-batch run, so the test above can tell the designs apart."""
    from harness import make_batch_half_run

    want, _ = single_process("GaLoreAdamW")
    got = make_batch_half_run()
    diff = max((got[k] - want[k]).abs().max().item() for k in want)
    assert diff > 1e-6


def layerwise_without_comm_hook_worker(rank: int, world: int) -> dict:
    """DDP + LayerwiseOptimizer without ``ddp_layerwise``: the hooks step on the local gradient."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for label, options in {"plain": {}, "accumulate_and_clip": {"accumulation_steps": 2, "max_grad_norm": 1.0}}.items():
        model = make_model()
        ddp = DDP(model)
        lw = lrgrad.LayerwiseOptimizer(make_optimizer("GaLoreAdamW", model), **options)
        try:
            train_steps(ddp, lw, 0, 2, rank, world)
            out[label] = "no error"
        except ValueError as exc:
            out[label] = str(exc)
        out[label + "_micro_step"] = lw.micro_step
    return out


def test_layerwise_under_ddp_without_the_comm_hook_is_refused_at_the_first_step():
    """The ranks would silently train apart: each stepped on its own half batch before DDP's all-reduce."""
    for result in run_distributed(layerwise_without_comm_hook_worker):
        for label, micro_steps in (("plain", 0), ("accumulate_and_clip", 1)):
            assert "ddp_layerwise(ddp_model, layerwise)" in result[label], result[label]
            assert "DistributedDataParallel" in result[label]
            assert result[label + "_micro_step"] == micro_steps  # raised in the first window's step()


WINDOWS, MICRO = 3, 2  # Flora resamples P on windows 1 and 3 (GAP = 2)


def compressed_windows(model, run_backward, acc_step) -> None:
    """WINDOWS windows of MICRO micro-batches, each micro-batch's loss divided by MICRO."""
    from tiny_model import lm_loss, make_batch

    for w in range(WINDOWS):
        for j in range(MICRO):
            tokens = make_batch(seed=100 * w + j)
            run_backward(lambda rows, t=tokens: (lm_loss(model, t[rows]) / MICRO).backward(), tokens.shape[0])
        acc_step()


def compressed_accumulation_worker(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    def half(n: int) -> slice:
        return slice(rank * n // world, (rank + 1) * n // world)

    out = {}
    # the documented recipe: every micro-batch under no_sync, all_reduce, step
    model = make_model()
    ddp = DDP(model)
    acc = lrgrad.CompressedAccumulator(make_optimizer("FloraAdamW", model))

    def no_sync_backward(backward, n):
        with ddp.no_sync():
            backward(half(n))

    def reduce_and_step():
        acc.all_reduce()
        acc.step()
        acc.zero_grad()

    compressed_windows(ddp, no_sync_backward, reduce_and_step)
    out["recipe"] = full_state(model)
    # without no_sync: DDP writes its averaged gradient into params the hooks already compressed
    model = make_model()
    ddp = DDP(model)
    acc = lrgrad.CompressedAccumulator(make_optimizer("FloraAdamW", model))
    before = full_state(model)
    try:
        compressed_windows(ddp, lambda backward, n: backward(half(n)), acc.step)
        out["without_no_sync"] = "no error"
    except ValueError as exc:
        out["without_no_sync"] = str(exc)
    out["unchanged"] = all(torch.equal(v, before[k]) for k, v in full_state(model).items())
    # no_sync without all_reduce: each replica would step on its own half of the batch
    def no_sync_windows(acc_step, ddp):
        compressed_windows(ddp, lambda backward, n: no_sync_backward_of(ddp, backward, n), acc_step)

    def no_sync_backward_of(ddp, backward, n):
        with ddp.no_sync():
            backward(half(n))

    model = make_model()
    ddp = DDP(model)
    acc = lrgrad.CompressedAccumulator(make_optimizer("FloraAdamW", model))
    try:
        no_sync_windows(acc.step, ddp)
        out["without_all_reduce"] = "no error"
    except ValueError as exc:
        out["without_all_reduce"] = str(exc)
    out["unchanged_without_all_reduce"] = all(torch.equal(v, before[k]) for k, v in full_state(model).items())
    # ... unless told the processes are independent runs: then they do drift apart (what the check prevents)
    model = make_model()
    ddp = DDP(model)
    acc = lrgrad.CompressedAccumulator(make_optimizer("FloraAdamW", model), check_replicas=False)
    no_sync_windows(lambda: (acc.step(), acc.zero_grad()), ddp)
    out["unchecked"] = full_state(model)
    # processes that hold different weights (not replicas, no DDP) step without any refusal
    model = make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * rank)
    acc = lrgrad.CompressedAccumulator(make_optimizer("FloraAdamW", model))
    compressed_windows(model, lambda backward, n: backward(half(n)), lambda: (acc.step(), acc.zero_grad()))
    out["independent_stepped"] = not all(torch.equal(v, before[k]) for k, v in full_state(model).items())
    return out


def test_compressed_accumulation_under_ddp():
    """``no_sync`` + ``all_reduce`` equals one process accumulating the full batch in ``.grad``; without
    ``no_sync`` the step is refused before it writes (it used to step the compressed params twice,
    from each rank's local sum and again from DDP's gradient, and the ranks drifted apart)."""
    model = make_model()
    opt = make_optimizer("FloraAdamW", model)

    def step():
        opt.step()
        opt.zero_grad()

    compressed_windows(model, lambda backward, n: backward(slice(0, n)), step)
    want = full_state(model)
    assert max(s["proj_refreshes"] for s in opt.state.values() if "proj_refreshes" in s) == 2
    results = run_distributed(compressed_accumulation_worker)
    for result in results:
        assert_same_weights(result["recipe"], want)
        assert "ddp_model.no_sync()" in result["without_no_sync"] and "acc.all_reduce()" in result["without_no_sync"]
        assert result["unchanged"]
        # no_sync without all_reduce is refused at the first step, before anything is written
        assert "acc.all_reduce()" in result["without_all_reduce"] and "check_replicas" in result["without_all_reduce"]
        assert result["unchanged_without_all_reduce"]
        assert result["independent_stepped"]
    rank0, rank1 = (r["unchecked"] for r in results)
    assert any(not torch.equal(rank0[k], rank1[k]) for k in rank0)  # the drift the check refuses


#: optimizers that draw random numbers (projections, sketches, selections, stochastic rounding)
RANDOMIZED = {"FloraAdamW": {}, "GoLoreAdamW": {}, "GrassAdamW": {}, "APOLLOAdamW": {}, "APOLLOMiniAdamW": {},
              "QGaLoreAdamW": {}, "FRUGALAdamW": {}, "LDAdamW": {}, "GaLoreAdamW": {"svd": "randomized"},
              "OnlineSubspaceAdamW": {"pca_init": "randomized"}}


def per_rank_seed_worker(rank: int, world: int) -> dict:
    """Users seed each rank differently (data order, dropout): no draw may come from the global RNG."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for name, options in RANDOMIZED.items():
        model = make_model()
        ddp = DDP(model)
        torch.manual_seed(1000 + rank)
        opt = make_optimizer(name, model, **options)
        train_steps(ddp, opt, 0, STEPS, rank, world)
        out[name] = full_state(model)
    return out


def test_randomized_projectors_ignore_per_rank_global_seeds():
    """Bases, sketches and draws come from per-param seeds: the ranks agree and match one process."""
    results = run_distributed(per_rank_seed_worker)
    for name, options in RANDOMIZED.items():
        model = make_model()
        torch.manual_seed(7)
        opt = make_optimizer(name, model, **options)
        train_steps(model, opt, 0, STEPS)
        for result in results:
            assert_same_weights(result[name], full_state(model))
