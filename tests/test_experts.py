"""Expert stacks (fused MoE weights, (E, m, n)) step as E separate (m, n) matrices (lrgrad/experts.py).

The reference of every equivalence here is the same optimizer over E separate (m, n) params holding the
experts' slices, given the same seeds (each expert's ``proj_seed``, read from the stack's state) and the
same gradients; an expert whose gradient slice is zero is matched by a separate param with no ``.grad``.
Both runs go through the same code on the same matrices in the same order, so the comparison is bit for bit.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import lrgrad
from lrgrad.optim.lowrank import LowRankOptimizer

E = 3
GAP = 3  # refreshes on steps 1, 4, 7
STEPS = 8


def _grads(shape: tuple[int, ...], steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Gradients of a stack; expert 1 gets none on step 2 and expert 2 none on step 4 (a refresh step)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        if t == 2:
            g[1] = 0
        if t == 3:
            g[2] = 0
        out.append(g)
    return out


def _stack_and_reference(shape: tuple[int, int, int], **options) -> tuple:
    torch.manual_seed(0)
    stack = nn.Parameter(torch.randn(shape, dtype=torch.float64))
    experts = [nn.Parameter(stack.detach()[e].clone()) for e in range(shape[0])]
    opt = LowRankOptimizer([{"params": [stack], "experts": True}], **options)
    ref = LowRankOptimizer([{"params": experts}], **options)
    # each reference param takes its expert's seed (the stack's state holds them once it has stepped)
    index = {id(p): e for e, p in enumerate(experts)}
    ref._param_seed = lambda p, group: opt.state[stack]["experts"][index[id(p)]]["proj_seed"]
    return stack, experts, opt, ref


def _step_both(stack, experts, opt, ref, grads) -> None:
    for g in grads:
        stack.grad = g.clone()
        for e, p in enumerate(experts):
            p.grad = g[e].clone() if g[e].any() else None  # a separate expert that got no token
        opt.step()
        ref.step()


def _assert_same(stack, experts, opt, ref) -> None:
    for e, p in enumerate(experts):
        assert torch.equal(stack.detach()[e], p.detach()), f"expert {e} differs"
        mine, theirs = opt.state[stack]["experts"][e], ref.state[p]
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(mine[key], value), (e, key)
            else:
                assert mine[key] == value, (e, key)


CASES = [
    ("svd", "adamw", None, {}),
    ("svd", "adamw", None, {"moment_policy": "project"}),
    ("svd", "adafactor", None, {}),
    ("svd", "lion", None, {}),
    ("svd", "muon", None, {}),
    ("svd", "adamw8bit", None, {"moment_min_size": 16}),
    ("svd", "adamw", "apollo", {}),
    ("svd", "adamw", "fira", {"norm_growth_limit": 1.01}),
    ("dct", "adamw", None, {}),
    ("random", "adamw", None, {}),
    ("random", "adamw", "apollo", {"scale_type": "tensor"}),
    ("online_pca", "adamw", None, {}),
    ("qgalore", "adamw", None, {}),
]


def test_bf16_stack_steps_like_separate_experts():
    shape = (E, 20, 12)
    stack, experts, opt, ref = _stack_and_reference(shape, lr=1e-2, rank=4, update_proj_gap=GAP)
    with torch.no_grad():
        stack.data = stack.data.to(torch.bfloat16)
        for e, p in enumerate(experts):
            p.data = stack.data[e].clone()
    _step_both(stack, experts, opt, ref, [g.to(torch.bfloat16) for g in _grads(shape, 5)])
    _assert_same(stack, experts, opt, ref)


@pytest.mark.parametrize("shape", [(E, 12, 20), (E, 20, 12)], ids=["m<n", "m>n"])
@pytest.mark.parametrize("projector,rule,full_rank,extra", CASES,
                         ids=[f"{p}-{r}-{f}-{'-'.join(x)}" for p, r, f, x in CASES])
def test_stack_steps_bit_for_bit_like_separate_experts(shape, projector, rule, full_rank, extra):
    stack, experts, opt, ref = _stack_and_reference(
        shape, lr=1e-2, rank=4, update_proj_gap=GAP, projector=projector, rule=rule, full_rank=full_rank,
        weight_decay=0.1, **extra)
    _step_both(stack, experts, opt, ref, _grads(shape, STEPS))
    _assert_same(stack, experts, opt, ref)
    # the refreshes ran per expert (3 refreshes in 8 steps; the experts that missed a step are a step behind)
    assert [s["step"] for s in opt.state[stack]["experts"]] == [STEPS, STEPS - 1, STEPS - 1]
    assert all(s["proj_refreshes"] >= 2 for s in opt.state[stack]["experts"])


@pytest.mark.parametrize("projector", ["svd", "random"])
def test_nonfinite_expert_is_skipped_alone(projector):
    """skip_nonfinite=True: a NaN in one expert's slice skips that expert (its state restored, counted), as it
    would skip a separate param; the other experts step."""
    shape = (E, 20, 12)
    stack, experts, opt, ref = _stack_and_reference(shape, lr=1e-2, rank=4, update_proj_gap=2, projector=projector,
                                                    skip_nonfinite=True)
    grads = _grads(shape, 5, seed=7)
    grads[3][0, 1, 2] = float("nan")  # step 4: a refresh step for expert 0 (gap 2)
    _step_both(stack, experts, opt, ref, grads)
    _assert_same(stack, experts, opt, ref)
    assert opt.state[stack]["experts"][0]["nonfinite_skips"] == 1 and torch.isfinite(stack.detach()).all()


def test_experts_have_their_own_subspaces_and_seeds():
    stack, _, opt, _ = _stack_and_reference((E, 12, 20), lr=1e-2, rank=4, projector="random")
    stack.grad = torch.randn(stack.shape, dtype=torch.float64)
    opt.step()
    seeds = [s["proj_seed"] for s in opt.state[stack]["experts"]]
    assert len(set(seeds)) == E
    # the low-rank moments are each expert's (r x n: the smaller side projected), not one (E, m*n) view's
    assert all(s["exp_avg"].shape == (4, 20) for s in opt.state[stack]["experts"])


@pytest.mark.filterwarnings("ignore:lrgrad. no param of a group")
def test_small_experts_run_full_rank_each():
    """Experts whose smaller side is <= rank are stepped full-rank, each with its own AdamW state, which
    is torch.optim.AdamW on the stack (elementwise) with the zero-gradient experts skipped."""
    shape = (E, 6, 5)
    stack, experts, opt, ref = _stack_and_reference(shape, lr=1e-2, rank=8)
    _step_both(stack, experts, opt, ref, _grads(shape, 4))
    _assert_same(stack, experts, opt, ref)
    assert opt.state[stack]["experts"][0]["exp_avg"].shape == (6, 5)


# ---------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("projector", ["svd", "random", "qgalore", "online_pca"])
def test_state_dict_round_trip_and_bit_identical_resume(projector):
    shape = (E, 20, 12)
    options = dict(lr=1e-2, rank=4, update_proj_gap=GAP, projector=projector)
    grads = _grads(shape, STEPS, seed=3)

    def run(stack, opt, gs):
        for g in gs:
            stack.grad = g.clone()
            opt.step()

    torch.manual_seed(0)
    start = torch.randn(shape, dtype=torch.float64)
    whole = nn.Parameter(start.clone())
    whole_opt = LowRankOptimizer([{"params": [whole], "experts": True}], **options)
    run(whole, whole_opt, grads)

    first = nn.Parameter(start.clone())
    first_opt = LowRankOptimizer([{"params": [first], "experts": True}], **options)
    run(first, first_opt, grads[:5])
    buffer = io.BytesIO()
    torch.save({"param": first.detach(), "opt": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = nn.Parameter(saved["param"].clone())
    resumed_opt = LowRankOptimizer([{"params": [resumed], "experts": True}], **options)
    resumed_opt.load_state_dict(saved["opt"])
    # the round trip: every expert's state, tensors with their dtypes, exactly
    for mine, theirs in zip(resumed_opt.state[resumed]["experts"], first_opt.state[first]["experts"]):
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            if isinstance(value, torch.Tensor):
                assert mine[key].dtype == value.dtype and torch.equal(mine[key], value), key
            else:
                assert mine[key] == value, key
    run(resumed, resumed_opt, grads[5:])
    assert torch.equal(resumed.detach(), whole.detach())


def test_load_refuses_a_state_of_another_layout():
    stack = nn.Parameter(torch.randn(E, 12, 20))
    opt = LowRankOptimizer([{"params": [stack], "experts": True}], rank=4)
    stack.grad = torch.randn(stack.shape)
    opt.step()
    saved = opt.state_dict()
    plain = LowRankOptimizer([{"params": [nn.Parameter(stack.detach().clone())]}], rank=4)
    with pytest.raises(ValueError, match="experts"):
        plain.load_state_dict(saved)  # the same tensor stepped as one (E, m*n) matrix
    # saved: {"experts": {"<global index>": state}}; the in-memory list (one slot per expert) loads too
    in_memory = list(saved["state"][0]["experts"].values())
    fewer = {**saved, "state": {0: {"experts": in_memory[:2]}}}
    other = LowRankOptimizer([{"params": [nn.Parameter(stack.detach().clone())], "experts": True}], rank=4)
    with pytest.raises(ValueError, match="expert stack of 3 experts"):
        other.load_state_dict(fewer)
    with pytest.raises(ValueError, match="no state for expert 2"):
        other.load_state_dict({**saved, "state": {0: {"experts": dict(enumerate(in_memory[:2]))}}})
    bad = {**saved, "state": {0: {"experts": [dict(s) for s in in_memory]}}}
    bad["state"][0]["experts"][1]["exp_avg"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"param 0 \(expert 1\)"):
        other.load_state_dict(bad)


# ---------------------------------------------------------------------- no gradient
def test_stack_without_grad_is_not_stepped():
    stack = nn.Parameter(torch.randn(E, 12, 20))
    other = nn.Parameter(torch.randn(12, 20))
    opt = LowRankOptimizer([{"params": [stack, other], "experts": True}], rank=4, weight_decay=0.1)
    before = stack.detach().clone()
    other.grad = torch.randn(12, 20)
    opt.step()
    assert torch.equal(stack.detach(), before) and not opt.state[stack]


def test_expert_with_zero_gradient_is_skipped_and_finite():
    """The router sent expert 1 no token: its slice of G is exactly zero. It keeps its weights and state
    (no decay, no moment step, no refresh from a zero gradient); the others step; nothing is NaN."""
    stack = nn.Parameter(torch.randn(E, 12, 20))
    opt = LowRankOptimizer([{"params": [stack], "experts": True}], rank=4, update_proj_gap=1, weight_decay=0.1)
    g = torch.randn(stack.shape)
    g[1] = 0
    stack.grad = g
    opt.step()
    skipped = opt.state[stack]["experts"][1]
    assert skipped["step"] == 0 and skipped["proj_refreshes"] == 0 and not skipped["exp_avg"].any()
    before = stack.detach().clone()
    stack.grad = g
    opt.step()
    assert torch.equal(stack.detach()[1], before[1])
    assert not torch.equal(stack.detach()[0], before[0])
    assert torch.isfinite(stack.detach()).all()
    assert [s["step"] for s in opt.state[stack]["experts"]] == [2, 0, 2]


def test_stack_zero_everywhere_steps_every_expert():
    """A gradient that is zero for every expert is no routing (some expert always gets a token) but a zero
    gradient: every expert steps on it, as any param does (torch's DCP state template relies on it)."""
    stack = nn.Parameter(torch.randn(E, 12, 20))
    opt = LowRankOptimizer([{"params": [stack], "experts": True}], rank=4, weight_decay=0.1)
    before = stack.detach().clone()
    stack.grad = torch.zeros(stack.shape)
    opt.step()
    assert [s["step"] for s in opt.state[stack]["experts"]] == [1] * E
    # a zero gradient names no subspace: each expert holds a provisional basis (the template's keys), uncounted
    assert all(s["proj_refreshes"] == 0 and "proj_basis" in s for s in opt.state[stack]["experts"])
    torch.testing.assert_close(stack.detach(), before * (1 - 1e-3 * 0.1), rtol=0, atol=1e-7)  # decay only


def test_empty_stacks_are_a_no_op():
    """As torch.optim steps an empty param: nothing to do, no error (no experts, or experts of no size)."""
    stacks = [nn.Parameter(torch.randn(0, 12, 20)), nn.Parameter(torch.randn(E, 0, 20))]
    full = nn.Parameter(torch.randn(E, 12, 20))
    opt = LowRankOptimizer([{"params": [*stacks, full], "experts": True}], rank=4)
    for p in (*stacks, full):
        p.grad = torch.randn(p.shape)
    opt.step()
    assert [s["step"] for s in opt.state[full]["experts"]] == [1] * E


# ---------------------------------------------------------------------- misuse
def test_more_than_three_dims_in_an_experts_group_is_refused_by_name():
    model = nn.Module()
    model.kernel = nn.Parameter(torch.randn(2, 3, 12, 20))
    with pytest.raises(ValueError, match="'kernel'.*experts=True"):
        LowRankOptimizer([{"params": list(model.named_parameters()), "experts": True}], rank=4)
    with pytest.raises(ValueError, match="param 0 of the group"):
        LowRankOptimizer([{"params": [model.kernel], "experts": True}], rank=4)


def test_four_dim_param_without_experts_keeps_its_matrix_view():
    """Outside an experts group nothing changes: a (E, m, n) or 4-D param is the matrix (shape[0], rest)."""
    p = nn.Parameter(torch.randn(6, 2, 3, 4))
    opt = LowRankOptimizer([p], rank=2)
    p.grad = torch.randn(p.shape)
    opt.step()
    assert opt.state[p]["exp_avg"].shape == (2, 24) and "experts" not in opt.state[p]  # (r, 2*3*4)


def test_experts_flag_must_be_a_bool():
    with pytest.raises((TypeError, ValueError), match="experts"):
        LowRankOptimizer([{"params": [nn.Parameter(torch.randn(E, 12, 20))], "experts": "yes"}], rank=4)


def test_layerwise_with_clipping_steps_stacks_like_the_ordinary_loop():
    """Per-layer updates with clipping keep an expert stack's gradient until the window's norm is known,
    then step it expert by expert: the same weights as optimizer.step() on the clipped gradient."""
    torch.manual_seed(0)
    start = torch.randn(E, 12, 20, dtype=torch.float64)
    grads = _grads((E, 12, 20), 3, seed=5)
    a, b = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    plain = LowRankOptimizer([{"params": [a], "experts": True}], rank=4, update_proj_gap=2)
    layered = lrgrad.LayerwiseOptimizer(
        LowRankOptimizer([{"params": [b], "experts": True}], rank=4, update_proj_gap=2), max_grad_norm=1.0)
    for g in grads:
        a.grad = g.clone()
        torch.nn.utils.clip_grad_norm_([a], 1.0)
        plain.step()
        (b * g).sum().backward()
        layered.step()
    # the clip factors differ in rounding (torch's norm vs the wrapper's sum of squares), as in test_layerwise
    torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-10)
    assert not torch.equal(a.detach(), start)
