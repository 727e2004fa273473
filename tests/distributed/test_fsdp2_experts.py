"""FSDP2-sharded Mixture-of-Experts expert stacks (``lrgrad.experts``): ``Shard(0)`` gives each rank whole
experts, which it steps alone, as the one-process run steps them.

* E = 4 (2 experts a rank), E = 3 (2 + 1: uneven shards) and E = 1 (an empty shard on rank 1), top-1
  routing in which some expert gets no token on some steps: the weights and every expert's state (gathered from
  the rank that holds it) equal the one-process run's to 1e-10 (fp64; the gradients differ only by the
  order FSDP2's reduce-scatter sums the half batches), over 5 steps with refreshes on steps 1, 3, 5, for
  GaLore (SVD), Flora (random) and APOLLO.
* Per-layer updates (``LayerwiseOptimizer``: each stack steps in its post-accumulate-grad hook) give the
  same weights and states.
* The per-rank checkpoint path (each rank's ``optimizer.state_dict()`` and sharded model state, torch.save)
  round-trips exactly and resumes bit-identically; a rank's state loaded on another rank, or into one
  process, is refused naming the expert. Distributed checkpoints (DCP): ``test_fsdp2_experts_dcp.py``.
"""

from __future__ import annotations

import os

import torch
from harness import full_state, run_distributed

import lrgrad

STEPS = 5
GAP = 2  # refreshes on steps 1, 3, 5
SAVE_AT = 3
EXPERT_COUNTS = (4, 3, 1)
#: GaLore (SVD refresh from the gradient), Flora (seeded random subspace), APOLLO (full-rank update)
OPTIMIZERS = ("GaLoreAdamW", "FloraAdamW", "APOLLOAdamW")
HIDDEN, FFN = 16, 24
#: rows of a global batch
BATCH = 64


class Experts(torch.nn.Module):
    """transformers 5's fused layout: ``gate_up_proj`` (E, 2 * ffn, hidden), ``down_proj`` (E, hidden, ffn)."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = torch.nn.Parameter(torch.randn(num_experts, 2 * FFN, HIDDEN, dtype=torch.float64) / 4)
        self.down_proj = torch.nn.Parameter(torch.randn(num_experts, HIDDEN, FFN, dtype=torch.float64) / 5)

    def forward(self, x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in range(self.num_experts):  # an expert with no token gets an exactly zero gradient slice
            rows = choice == e
            gate, up = (x[rows] @ self.gate_up_proj[e].T).chunk(2, dim=-1)
            out[rows] = (torch.nn.functional.silu(gate) * up) @ self.down_proj[e].T
        return out


class TinyMoE(torch.nn.Module):
    def __init__(self, num_experts: int):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(HIDDEN, HIDDEN, dtype=torch.float64)
        self.experts = Experts(num_experts)
        self.out = torch.nn.Linear(HIDDEN, HIDDEN, dtype=torch.float64)

    def forward(self, x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return self.out(h + self.experts(h, choice))


def batch(step: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, targets and each row's expert: round robin over the global batch, so every expert gets
    ``BATCH / E`` tokens (a gradient of rank > 4: one of lower rank leaves the rest of its subspace to
    rounding noise, which no two summation orders agree on). On steps 2 and 4 expert 1, resp. 2 (mod E)
    gets no token (an exactly zero slice, skipped): with E = 3 on step 4 rank 1's whole shard is zero
    while rank 0's is not, so rank 1 must skip its expert, not step it as a zero-everywhere stack."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, HIDDEN, generator=g, dtype=torch.float64)
    y = torch.randn(BATCH, HIDDEN, generator=g, dtype=torch.float64)
    choice = torch.arange(BATCH) % num_experts
    if step % 2 and num_experts > 1:
        idle = (step // 2 + 1) % num_experts
        choice[choice == idle] = (idle + 1) % num_experts
    return x, y, choice


def train(model, opt, start: int, stop: int, rank: int = 0, world: int = 1) -> None:
    """Global batches of ``BATCH`` rows, each rank its share (FSDP2 averages: the full batch's mean loss)."""
    for i in range(start, stop):
        x, y, choice = batch(i, model.experts.num_experts)
        rows = x.shape[0] // world
        sl = slice(rank * rows, (rank + 1) * rows)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[sl], choice[sl]), y[sl]).backward()
        opt.step()


#: the sharded proj.weight refreshes from the gathered gradient, as one process does (the default sharded
#: SVD is a sketch, which one process runs only with svd="randomized"); the experts are local either way
OPTIONS = {"GaLoreAdamW": {"svd_sharded": "gather"}}
#: estimate_memory's names of OPTIMIZERS
ESTIMATED = {"GaLoreAdamW": "galore", "FloraAdamW": "flora", "APOLLOAdamW": "apollo"}


def make_optimizer(name: str, model):
    return lrgrad.OPTIMIZERS[name](lrgrad.param_groups(model, rank=4, update_proj_gap=GAP, **OPTIONS.get(name, {})),
                                   lr=1e-2)


def sharded(num_experts: int):
    from torch.distributed.fsdp import fully_shard

    model = TinyMoE(num_experts)
    fully_shard(model)
    return model


def expert_states(model, opt) -> dict[str, dict[int, dict]]:
    """``{stack name: {global expert index: its state}}`` for the experts this process holds."""
    out = {}
    for name, p in model.named_parameters():
        experts = opt.state[p].get("experts") if p in opt.state else None
        if experts is not None:
            out[name] = {e: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in sub.items()}
                         for e, sub in enumerate(experts) if sub is not None}
    return out


def same_tree(a, b) -> bool:
    """Exactly the same nested state (tensors: same dtype and bits)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    return a == b


def equivalence_worker(rank: int, world: int) -> dict:
    out = {}
    for num_experts in EXPERT_COUNTS:
        for name in OPTIMIZERS:
            model = sharded(num_experts)
            opt = make_optimizer(name, model)
            train(model, opt, 0, STEPS, rank, world)
            out[num_experts, name] = {"weights": full_state(model), "experts": expert_states(model, opt),
                                      "state_bytes": lrgrad.optimizer_state_bytes(opt)}
            # per-layer updates: FSDP2 runs each stack's post-accumulate-grad hook on its reduced local
            # experts, in the same backward order on every rank (the stack's one all-reduce lines up)
            model = sharded(num_experts)
            opt = make_optimizer(name, model)
            train(model, lrgrad.LayerwiseOptimizer(opt), 0, STEPS, rank, world)
            out[num_experts, name, "layerwise"] = {"weights": full_state(model), "experts": expert_states(model, opt)}
    return out


def single_process(num_experts: int, name: str) -> dict:
    model = TinyMoE(num_experts)
    opt = make_optimizer(name, model)
    train(model, opt, 0, STEPS)
    return {"weights": full_state(model), "experts": expert_states(model, opt)}


def test_fsdp2_expert_stacks_step_as_one_process():
    results = run_distributed(equivalence_worker)
    for num_experts in EXPERT_COUNTS:
        for name in OPTIMIZERS:
            want = single_process(num_experts, name)
            for case in ((num_experts, name), (num_experts, name, "layerwise")):
                check_against_one_process(results, case, want, num_experts)
            # estimate_memory(world_size=2) counts rank 0's bytes: its experts whole, the other params' row shards
            estimate = lrgrad.estimate_memory(TinyMoE(num_experts), ESTIMATED[name], rank=4, world_size=2,
                                              **OPTIONS.get(name, {}))
            case = (num_experts, name)
            assert estimate.optimizer_state + estimate.projector_state == results[0][case]["state_bytes"], case


def check_against_one_process(results: list[dict], case: tuple, want: dict, num_experts: int) -> None:
    """Every rank's weights and the experts' state (each from the rank that holds it) equal ``want``'s."""
    for rank_result in results:
        got = rank_result[case]["weights"]
        assert set(got) == set(want["weights"])
        for key, value in want["weights"].items():
            torch.testing.assert_close(got[key], value, atol=1e-10, rtol=0,
                                       msg=lambda m, c=(case, key): f"{c}: {m}")
    for stack, experts in want["experts"].items():
        held = [r[case]["experts"][stack] for r in results]
        # each expert on exactly one rank: rank 0 the first ceil(E / 2), rank 1 the rest (torch.chunk)
        first = -(-num_experts // 2)
        assert sorted(held[0]) == list(range(first)), (case, stack, sorted(held[0]))
        assert sorted(held[1]) == list(range(first, num_experts)), (case, stack, sorted(held[1]))
        merged = {**held[0], **held[1]}
        assert len(experts) == num_experts
        for e, state in experts.items():
            assert set(merged[e]) == set(state), (case, stack, e)
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    assert merged[e][key].dtype == value.dtype
                    torch.testing.assert_close(merged[e][key], value, atol=1e-10, rtol=0,
                                               msg=lambda m, c=(case, stack, e, key): f"{c}: {m}")
                else:
                    assert merged[e][key] == value, (case, stack, e, key, merged[e][key], value)
        # the routing left some expert idle on some step (its step count behind): the skip ran
        if num_experts > 1:
            assert min(s["step"] for s in experts.values()) < STEPS, (case, stack)


def checkpoint_worker(rank: int, world: int, folder: str) -> dict:
    import torch.distributed as dist

    out = {}
    for num_experts in (4, 3):
        for name in OPTIMIZERS:
            case = f"{num_experts}-{name}"
            model = sharded(num_experts)
            opt = make_optimizer(name, model)
            train(model, opt, 0, SAVE_AT, rank, world)
            path = os.path.join(folder, f"{case}-rank{rank}.pt")
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
            train(model, opt, SAVE_AT, STEPS, rank, world)
            uninterrupted = full_state(model)

            model = sharded(num_experts)
            opt = make_optimizer(name, model)
            saved = torch.load(path, weights_only=False)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optim"])
            round_trip = same_tree(opt.state_dict(), saved["optim"])
            train(model, opt, SAVE_AT, STEPS, rank, world)
            out[case] = {"round_trip": round_trip, "resumed_equal": same_tree(full_state(model), uninterrupted),
                         # each stack's experts in the saved form: {global index: state}, this rank's only
                         "saved_experts": [list(s["experts"]) for s in saved["optim"]["state"].values()
                                           if "experts" in s]}

            dist.barrier()  # every rank's file is written
            other = torch.load(os.path.join(folder, f"{case}-rank{1 - rank}.pt"), weights_only=False)
            fresh = make_optimizer(name, sharded(num_experts))
            try:
                fresh.load_state_dict(other["optim"])
                out[case]["other_rank"] = None
            except ValueError as exc:
                out[case]["other_rank"] = (str(exc), len(fresh.state))

    return out


def test_fsdp2_expert_stacks_checkpoint_per_rank(tmp_path):
    results = run_distributed(checkpoint_worker, str(tmp_path))
    for rank, rank_result in enumerate(results):
        for num_experts in (4, 3):
            for name in OPTIMIZERS:
                case = f"{num_experts}-{name}"
                got = rank_result[case]
                assert got["round_trip"], (rank, case)
                assert got["resumed_equal"], (rank, case)
                first = -(-num_experts // 2)  # torch.chunk: rank 0 the first ceil(E / 2) experts
                held = range(first) if rank == 0 else range(first, num_experts)
                assert got["saved_experts"] == [[str(e) for e in held]] * 2, (rank, case, got["saved_experts"])
                refused = got["other_rank"]
                assert refused is not None, (rank, case, "loaded another rank's experts")
                message, state_count = refused
                assert message.startswith("Invalid state_dict") and "expert" in message and "rank" in message, message
                assert state_count == 0, (rank, case)

    # one process: a rank's state dict holds only that rank's experts, refused naming the first missing one
    saved = torch.load(tmp_path / "3-GaLoreAdamW-rank1.pt", weights_only=False)
    opt = make_optimizer("GaLoreAdamW", TinyMoE(3))
    try:
        opt.load_state_dict(saved["optim"])
        raise AssertionError("one process loaded a rank's partial expert state")
    except ValueError as exc:
        assert "no state for expert 0" in str(exc), str(exc)
