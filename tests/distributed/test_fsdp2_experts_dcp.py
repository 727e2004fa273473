"""Distributed checkpoints (DCP) of FSDP2-sharded MoE expert stacks (``lrgrad.experts``), through both routes:
lrgrad's ``save_checkpoint`` / ``load_checkpoint`` and torch's ``get_optimizer_state_dict`` /
``set_optimizer_state_dict`` + ``dcp.save`` / ``dcp.load`` (the route of Accelerate and the HF Trainer).

* 2 -> 2 ranks: a save after step 3 of 5, loaded into a fresh FSDP2 run, resumes bit-identically (weights and
  every expert's state) for E = 4, 3 (uneven) and 1 (rank 1 holds no expert), GaLore / Flora / APOLLO.
* 2 -> 1 and 1 -> 2: the resumed run equals the uninterrupted one to 1e-10 (fp64; the FSDP2 run sums the half
  batches' gradients in another order than one process).
* An expert that received no token before the save (no subspace yet) resumes bit-identically through both
  routes, 2 -> 2, and to 1e-10 in one process (2 -> 1): the template torch's DCP loads into comes from a
  zero-gradient step that refreshes every expert (``lrgrad.experts``: refresh placeholders).
"""

from __future__ import annotations

import os

import pytest
import torch
from dcp_routes import load, save
from harness import full_state, run_distributed
from test_fsdp2_experts import (
    OPTIMIZERS,
    SAVE_AT,
    STEPS,
    TinyMoE,
    batch,
    expert_states,
    make_optimizer,
    same_tree,
    sharded,
    train,
)

EXPERT_COUNTS = (4, 3, 1)
ROUTES = ("lrgrad", "torch", "torch-flat")
#: the routes that load a checkpoint saved without flatten_optimizer_state_dict (a flattened template asks for
#: param_groups.<param>.<key>, which such a checkpoint keeps as param_groups.<group index>.<key>)
LIST_FORM_ROUTES = ("lrgrad", "torch")
#: the expert that receives no token before the save in the idle case (rank 1 holds it with E = 4)
NEVER = 3








def train_idle(model, opt, start: int, stop: int, rank: int = 0, world: int = 1) -> None:
    """``train``, except that expert ``NEVER`` receives no token before step ``SAVE_AT`` (its rows go to expert 0)."""
    for i in range(start, stop):
        x, y, choice = batch(i, model.experts.num_experts)
        if i < SAVE_AT:
            choice[choice == NEVER] = 0
        rows = x.shape[0] // world
        sl = slice(rank * rows, (rank + 1) * rows)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[sl], choice[sl]), y[sl]).backward()
        opt.step()


def gathered_experts(per_rank: list[dict]) -> dict:
    """``{stack: {expert: state}}`` merged over the ranks' ``expert_states``."""
    return {stack: {e: s for r in per_rank for e, s in r[stack].items()} for stack in per_rank[0]}


def close_tree(got, want, what) -> None:
    """Weights or expert states equal to 1e-10 (tensors) or exactly (counters, seeds)."""
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype, what
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0, msg=lambda m: f"{what}: {m}")
    elif isinstance(want, dict):
        assert set(got) == set(want), (what, sorted(got), sorted(want))
        for key in want:
            close_tree(got[key], want[key], (*what, key))
    else:
        assert got == want, (what, got, want)


def dcp_worker(rank: int, world: int, folder: str) -> dict:
    out = {}
    for num_experts in EXPERT_COUNTS:
        for name in OPTIMIZERS:
            case = f"{num_experts}-{name}"
            model = sharded(num_experts)
            opt = make_optimizer(name, model)
            train(model, opt, 0, SAVE_AT, rank, world)
            for route in ROUTES:  # neither save changes the state
                save(route, os.path.join(folder, f"{case}-{route}"), model, opt)
            train(model, opt, SAVE_AT, STEPS, rank, world)
            out[case] = {"weights": full_state(model), "experts": expert_states(model, opt)}
            for route in ROUTES:
                for source in ("2", "1"):  # saved by this 2-rank run / by one process (the test, beforehand)
                    model = sharded(num_experts)
                    opt = make_optimizer(name, model)
                    load(route, os.path.join(folder, f"{case}-{route}" if source == "2" else f"single-{case}-{route}"),
                         model, opt)
                    train(model, opt, SAVE_AT, STEPS, rank, world)
                    out[case][route, source] = {"weights": full_state(model), "experts": expert_states(model, opt)}

    out.update(idle_worker(rank, world, folder))
    out.update(list_form_worker(rank, world, folder))
    return out


def list_form_worker(rank: int, world: int, folder: str) -> dict:
    """A checkpoint written through torch's route with each rank's stacks in the list form (one slot per global
    expert, ``None`` for another rank's: what a per-rank state dict held before the mapping form) loads through
    both routes: the ``None`` slots are keys no template asks for."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = sharded(3)
    opt = make_optimizer("GaLoreAdamW", model)
    train(model, opt, 0, SAVE_AT, rank, world)
    optim = get_optimizer_state_dict(model, opt)
    for state in optim["state"].values():
        if "experts" in state:
            state["experts"] = [state["experts"].get(str(e)) for e in range(3)]
    path = os.path.join(folder, "list-form")
    dcp.save({"model": get_model_state_dict(model), "optim": optim}, checkpoint_id=path)
    train(model, opt, SAVE_AT, STEPS, rank, world)
    out = {"list-form": {"uninterrupted": {"weights": full_state(model), "experts": expert_states(model, opt)}}}
    for route in LIST_FORM_ROUTES:
        model = sharded(3)
        opt = make_optimizer("GaLoreAdamW", model)
        if route == "lrgrad":  # a folder written without lrgrad's manifest
            from lrgrad.distributed import load_checkpoint

            load_checkpoint(path, model, opt, verify=False)
        else:
            load(route, path, model, opt)
        train(model, opt, SAVE_AT, STEPS, rank, world)
        out["list-form"][route] = {"weights": full_state(model), "experts": expert_states(model, opt)}
    return out


def idle_worker(rank: int, world: int, folder: str) -> dict:
    """Expert ``NEVER`` receives no token before the save: the checkpoint has no subspace for it."""
    from torch.distributed.checkpoint.api import CheckpointException

    out = {}
    for name in OPTIMIZERS:
        case = f"idle-{name}"
        model = sharded(4)
        opt = make_optimizer(name, model)
        train_idle(model, opt, 0, SAVE_AT, rank, world)
        for route in ROUTES:
            save(route, os.path.join(folder, f"{case}-{route}"), model, opt)
        out[case] = {"never": expert_states(model, opt)["experts.gate_up_proj"].get(NEVER)}
        train_idle(model, opt, SAVE_AT, STEPS, rank, world)
        out[case]["uninterrupted"] = {"weights": full_state(model), "experts": expert_states(model, opt)}
        for route in ROUTES:
            model = sharded(4)
            opt = make_optimizer(name, model)
            before = full_state(model)
            try:
                load(route, os.path.join(folder, f"{case}-{route}"), model, opt)
            except CheckpointException as exc:  # DCP's (a BaseException) wrapping each failing rank's error
                out[case][route] = {"error": str(exc), "weights_same": same_tree(full_state(model), before)}
                continue
            train_idle(model, opt, SAVE_AT, STEPS, rank, world)
            out[case][route] = {"weights": full_state(model), "experts": expert_states(model, opt)}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process saves after step ``SAVE_AT`` (for 1 -> 2), then 2 ranks save, resume and load those."""
    folder = str(tmp_path_factory.mktemp("dcp-experts"))
    single = {}
    for num_experts in EXPERT_COUNTS:
        for name in OPTIMIZERS:
            case = f"{num_experts}-{name}"
            model = TinyMoE(num_experts)
            opt = make_optimizer(name, model)
            train(model, opt, 0, SAVE_AT)
            for route in ROUTES:
                save(route, os.path.join(folder, f"single-{case}-{route}"), model, opt)
            train(model, opt, SAVE_AT, STEPS)
            single[case] = {"weights": full_state(model), "experts": expert_states(model, opt)}
    return folder, single, run_distributed(dcp_worker, folder)


@pytest.mark.parametrize("route", ROUTES)
def test_dcp_resume_two_ranks_is_bit_identical(runs, route):
    _, _, results = runs
    for num_experts in EXPERT_COUNTS:
        for name in OPTIMIZERS:
            case = f"{num_experts}-{name}"
            for rank, result in enumerate(results):
                resumed, uninterrupted = result[case][route, "2"], result[case]
                assert same_tree(resumed["weights"], uninterrupted["weights"]), (route, case, rank)
                first = -(-num_experts // 2)  # torch.chunk: rank 0 the first ceil(E / 2) experts (E = 1: rank 1 none)
                held = list(range(first)) if rank == 0 else list(range(first, num_experts))
                assert sorted(resumed["experts"]["experts.gate_up_proj"]) == held, (route, case, rank)
                assert same_tree(resumed["experts"], uninterrupted["experts"]), (route, case, rank)


@pytest.mark.parametrize("route", ROUTES)
def test_dcp_two_ranks_to_one_process(runs, route):
    folder, _, results = runs
    for num_experts in EXPERT_COUNTS:
        for name in OPTIMIZERS:
            case = f"{num_experts}-{name}"
            model = TinyMoE(num_experts)
            opt = make_optimizer(name, model)
            load(route, os.path.join(folder, f"{case}-{route}"), model, opt)
            train(model, opt, SAVE_AT, STEPS)
            close_tree(full_state(model), results[0][case]["weights"], (route, case, "weights"))
            close_tree(expert_states(model, opt), gathered_experts([r[case]["experts"] for r in results]),
                       (route, case, "experts"))


@pytest.mark.parametrize("route", ROUTES)
def test_dcp_one_process_to_two_ranks(runs, route):
    _, single, results = runs
    for num_experts in EXPERT_COUNTS:
        for name in OPTIMIZERS:
            case = f"{num_experts}-{name}"
            resumed = [r[case][route, "1"] for r in results]
            for rank, result in enumerate(resumed):
                close_tree(result["weights"], single[case]["weights"], (route, case, rank, "weights"))
            close_tree(gathered_experts([r["experts"] for r in resumed]), single[case]["experts"],
                       (route, case, "experts"))


@pytest.mark.parametrize("route", ROUTES)
def test_dcp_expert_without_token_before_the_save(runs, route):
    folder, _, results = runs
    for name in OPTIMIZERS:
        case = f"idle-{name}"
        # the checkpoint holds expert NEVER as initialized: never stepped, never refreshed
        never = results[1][case]["never"]
        assert never["step"] == 0 and never["proj_refreshes"] == 0, (case, never)
        for rank, result in enumerate(results):
            resumed = result[case][route]
            assert "error" not in resumed, (route, case, rank, resumed)
            assert same_tree(resumed, result[case]["uninterrupted"]), (route, case, rank)
        # 2 -> 1
        model = TinyMoE(4)
        opt = make_optimizer(name, model)
        load(route, os.path.join(folder, f"{case}-{route}"), model, opt)
        train_idle(model, opt, SAVE_AT, STEPS)
        uninterrupted = [r[case]["uninterrupted"] for r in results]
        close_tree(full_state(model), uninterrupted[0]["weights"], (route, case, "weights"))
        close_tree(expert_states(model, opt), gathered_experts([u["experts"] for u in uninterrupted]),
                   (route, case, "experts"))


@pytest.mark.parametrize("route", LIST_FORM_ROUTES)
def test_dcp_list_form_checkpoint_loads(runs, route):
    _, _, results = runs
    for rank, result in enumerate(results):
        assert same_tree(result["list-form"][route], result["list-form"]["uninterrupted"]), (route, rank)


def full_state_dict_worker(rank: int, world: int) -> dict:
    """Accelerate's ``FULL_STATE_DICT`` route by hand: rank 0's full optimizer state (``cpu_offload``: on rank 0
    only), broadcast into a fresh run (``broadcast_from_rank0``). Each rank's state holds its own experts only, so
    rank 0's file lacks rank 1's: torch leaves rank 1's expert the state of its zero-gradient template."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    out = {}
    for name in ("GaLoreAdamW", "FloraAdamW"):
        model = sharded(3)
        opt = make_optimizer(name, model)
        train(model, opt, 0, SAVE_AT, rank, world)
        full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        fresh = sharded(3)
        fresh_opt = make_optimizer(name, fresh)
        try:
            set_optimizer_state_dict(fresh, fresh_opt, full if rank == 0 else {},
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
            out[name] = {"error": None, "experts": expert_states(fresh, fresh_opt), "saved": expert_states(model, opt)}
        except ValueError as exc:
            out[name] = {"error": str(exc)}
    return out


def test_a_full_state_dict_without_a_held_experts_state_is_refused():
    """Rank 0 (experts 0-1) loads its own experts exactly; rank 1 (expert 2) refuses the template state it would
    otherwise train on (its step count 1 instead of SAVE_AT), naming the expert and the routes that work."""
    results = run_distributed(full_state_dict_worker)
    for name in ("GaLoreAdamW", "FloraAdamW"):
        rank0, rank1 = results[0][name], results[1][name]
        assert rank0["error"] is None, (name, rank0["error"])
        assert all(sorted(experts) == [0, 1] for experts in rank0["experts"].values())
        assert same_tree(rank0["experts"], rank0["saved"]), name
        assert rank1["error"] is not None, name
        assert "no state for expert 2" in rank1["error"] and "SHARDED_STATE_DICT" in rank1["error"], rank1["error"]
