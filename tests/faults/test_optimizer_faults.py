"""Optimizer-level faults (issue: "Nothing lost, nothing silent", items 7-11).

* a skipped step (non-finite gradient) leaves every state tensor and counter unchanged, for every
  projector - including one that refreshes on that very step (Flora's resample);
* a 1e30 gradient never turns weights into NaN (DCT's moment transfer indexes, it never multiplies
  an inf moment by a 0/1 matrix);
* empty parameters are a no-op in every optimizer;
* a corrupted optimizer state dict is refused at load time with one ValueError naming param and key;
* per-layer updates with clipping: a window skipped for a non-finite global norm moves no counter
  and refreshes no subspace.
"""

from __future__ import annotations

import copy

import pytest
import torch
from state_utils import assert_states_equal
from tiny_model import TinyLM, lm_loss, make_batch

import lrgrad
from lrgrad.projectors import PROJECTORS

NAMES = sorted(lrgrad.OPTIMIZERS)
PROJECTED = sorted(PROJECTORS)


def _model(hidden: int = 32, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyLM(hidden=hidden).to(dtype)


def _grads(model: torch.nn.Module, seed: int) -> list[torch.Tensor]:
    model.zero_grad()
    lm_loss(model, make_batch(seed=seed)).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _step_with(model, opt, grads) -> None:
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    opt.step()


def _poison(grads: list[torch.Tensor], value: float) -> list[torch.Tensor]:
    out = [g.clone() for g in grads]
    for g in out:
        if g.dim() == 2:
            g.view(-1)[0] = value
    return out


# ---------------------------------------------------------------- 7: a skipped step changes nothing
@pytest.mark.parametrize("projector", PROJECTED)
@pytest.mark.parametrize("policy", ["keep", "project", "reset"])
def test_skipped_step_on_a_refresh_step_leaves_state_unchanged(projector, policy):
    model = _model()
    groups = lrgrad.param_groups(model, rank=8, update_proj_gap=2, moment_policy=policy)
    opt = lrgrad.LowRankAdamW(groups, lr=1e-2, projector=projector, skip_nonfinite=True)
    clean = [_grads(model, seed) for seed in range(4)]
    _step_with(model, opt, clean[0])  # step 1 (refresh), step 2 would not refresh, step 3 does
    _step_with(model, opt, clean[1])
    before_state = copy.deepcopy(opt.state_dict())
    before_weights = [p.detach().clone() for p in model.parameters()]
    _step_with(model, opt, _poison(clean[2], float("nan")))  # step 3 is a refresh step: skipped
    after = opt.state_dict()
    order = [p for g in opt.param_groups for p in g["params"]]
    for index, saved in before_state["state"].items():
        if order[index].dim() != 2:
            continue  # clean gradient (1-D params were not poisoned): these stepped
        now = dict(after["state"][index])
        skips = now.pop("nonfinite_skips", 0)
        had = dict(saved)
        had_skips = had.pop("nonfinite_skips", 0)
        assert_states_equal(had, now)
        assert skips - had_skips in (0, 1)
    for a, b in zip(before_weights, model.parameters()):
        if a.dim() == 2:
            assert torch.equal(a, b.detach())
    # the redone step is exactly the step a run that never saw the bad gradient takes
    reference = _model()
    ref_opt = lrgrad.LowRankAdamW(lrgrad.param_groups(reference, rank=8, update_proj_gap=2, moment_policy=policy),
                                  lr=1e-2, projector=projector, skip_nonfinite=True)
    for g in (clean[0], clean[1], clean[2]):
        _step_with(reference, ref_opt, g)
    _step_with(model, opt, clean[2])
    for a, b in zip(reference.parameters(), model.parameters()):
        if a.dim() == 2:
            assert torch.equal(a.detach(), b.detach())


# ---------------------------------------------------------------- 8: a 1e30 gradient never makes NaN weights
ADAFACTOR = {n for n in NAMES if "Adafactor" in n}


@pytest.mark.parametrize("name", NAMES)
def test_huge_gradient_keeps_weights_finite(name):
    model = _model(dtype=torch.float32)  # fp32: the squared 1e30 gradient overflows the moments to inf
    cls = lrgrad.OPTIMIZERS[name]
    opt = cls(lrgrad.param_groups(model, rank=8, update_proj_gap=2), lr=1e-3)
    clean = [_grads(model, seed) for seed in range(4)]
    _step_with(model, opt, clean[0])
    huge = [g * 1e30 for g in clean[1]]
    _step_with(model, opt, huge)  # step 2
    _step_with(model, opt, clean[2])  # step 3: a refresh (moments carried across)
    _step_with(model, opt, clean[3])
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if name in ADAFACTOR:
        # Adafactor's relative step: the second-moment factors overflow exactly as in
        # torch.optim.Adafactor, which the docs record; the test pins what torch does.
        torch_model = _model(dtype=torch.float32)
        torch_opt = torch.optim.Adafactor(torch_model.parameters(), lr=1e-3)
        for g in (clean[0], huge, clean[2], clean[3]):
            _step_with(torch_model, torch_opt, g)
        torch_finite = all(bool(torch.isfinite(p).all()) for p in torch_model.parameters())
        assert finite or not torch_finite
    else:
        assert finite, name


def test_dct_reselection_carries_inf_moments_by_index():
    from lrgrad.subspace import apply_transition

    x = torch.tensor([[1.0, float("inf"), 3.0], [4.0, 5.0, float("inf")]])
    old, new = torch.tensor([2, 5, 9]), torch.tensor([5, 7, 9])
    t = (old.unsqueeze(1) == new.unsqueeze(0)).float()  # r_old x r_new: 5 -> 0, 9 -> 2, 7 is new
    moved = apply_transition(x, t, "right", quadratic=True)
    assert torch.equal(moved, torch.tensor([[float("inf"), 0.0, 3.0], [5.0, 0.0, float("inf")]]))
    left = apply_transition(x.T.contiguous(), t.T.contiguous(), "left")
    assert torch.equal(left, moved.T)
    # a rotation still goes through the matmul
    rot = torch.tensor([[0.6, 0.8], [-0.8, 0.6]])
    y = torch.randn(3, 2)
    assert torch.allclose(apply_transition(y, rot, "right"), y @ rot)


# ---------------------------------------------------------------- 9: empty params are a no-op
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0,)])
def test_empty_params_are_a_no_op(name, shape):
    empty = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    w = torch.nn.Parameter(torch.randn(12, 10, dtype=torch.float64))
    opt = lrgrad.OPTIMIZERS[name]([{"params": [empty, w], "rank": 4}], lr=1e-3)
    for _ in range(2):
        empty.grad = torch.zeros_like(empty)
        w.grad = torch.randn_like(w)
        opt.step()
    assert empty.shape == shape and torch.isfinite(w).all()


# ---------------------------------------------------------------- 10: corrupted state dicts are refused
def _trained(name: str = "GaLoreAdamW", **options):
    model = _model()
    opt = lrgrad.OPTIMIZERS[name](lrgrad.param_groups(model, rank=8, update_proj_gap=2, **options), lr=1e-3)
    for seed in range(3):
        _step_with(model, opt, _grads(model, seed))
    return model, opt


def _projected_index(opt) -> int:
    sd = opt.state_dict()
    return next(i for i, s in sd["state"].items() if "proj_refreshes" in s)


CORRUPTIONS = [
    ("GaLoreAdamW", {}, "proj_basis", "drop", "is missing"),
    ("DCTAdamW", {}, "proj_indices", "drop", "is missing"),
    ("QGaLoreAdamW", {}, "proj_codes", "drop", "is missing"),
    ("GaLoreAdamW", {}, "exp_avg", "drop", "is missing"),
    ("GaLoreAdamW", {}, "exp_avg_sq", "half", "dtype"),
    ("GaLoreAdamW", {}, "step", "negative", "int >= 0"),
    ("GaLoreAdamW", {}, "proj_basis", "transpose", "shape"),
    ("QGaLoreAdamW", {}, "proj_rows", "swap_rows_cols", "proj_rows"),
    ("FloraAdamW", {}, "proj_dim", "plus_one", "proj_dim"),
    ("OnlineSubspaceAdamW", {}, "proj_exp_avg", "drop", "is missing"),
]


@pytest.mark.parametrize(("name", "options", "key", "how", "match"), CORRUPTIONS)
def test_corrupted_state_dict_is_refused_at_load(name, options, key, how, match):
    model, opt = _trained(name, **options)
    sd = copy.deepcopy(opt.state_dict())
    index = _projected_index(opt)
    pstate = sd["state"][index]
    if how == "drop":
        del pstate[key]
    elif how == "half":
        pstate[key] = pstate[key].half()
    elif how == "negative":
        pstate[key] = -1
    elif how == "transpose":
        pstate[key] = pstate[key].T.contiguous()
    elif how == "swap_rows_cols":
        pstate["proj_rows"], pstate["proj_cols"] = pstate["proj_cols"], pstate["proj_rows"]
    elif how == "plus_one":
        pstate[key] += 1
    fresh = lrgrad.OPTIMIZERS[name](lrgrad.param_groups(model, rank=8, update_proj_gap=2, **options), lr=1e-3)
    with pytest.raises(ValueError, match=match) as info:
        fresh.load_state_dict(sd)
    assert f"param {index}" in str(info.value) and (key in str(info.value) or how == "swap_rows_cols")


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_accepts_its_own_state_dict(name):
    model, opt = _trained(name)
    fresh = lrgrad.OPTIMIZERS[name](lrgrad.param_groups(model, rank=8, update_proj_gap=2), lr=1e-3)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert_states_equal(fresh.state_dict()["state"], opt.state_dict()["state"])


# ---------------------------------------------------------------- 11: per-layer clipping skips consistently
class _Attention(torch.nn.Module):
    """Four same-shape projections, registered in the order given (a rebuilt model may differ)."""

    def __init__(self, order: tuple[str, ...]):
        super().__init__()
        for name in order:
            self.add_module(name, torch.nn.Linear(16, 16, bias=False))


def test_state_dict_of_the_same_params_in_another_order_is_refused():
    """A model rebuilt with its modules registered in another order has the same names and shapes, so
    torch maps the saved state by position onto the wrong tensors (q's moments on v) in silence. With
    ``param_names`` on both sides (``named_parameters()``) the reordering is refused by name; a renamed
    model (a ``module.`` / ``_orig_mod.`` prefix) still loads."""
    saved_model = _Attention(("q", "k", "v", "o"))
    opt = lrgrad.GaLoreAdamW(saved_model.named_parameters(), rank=4)
    for p in saved_model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state_dict()
    rebuilt = _Attention(("v", "k", "q", "o"))
    with pytest.raises(ValueError, match=r"group 0 holds the same params in another order.*'q.weight'.*'v.weight'"):
        lrgrad.GaLoreAdamW(rebuilt.named_parameters(), rank=4).load_state_dict(copy.deepcopy(state))
    same = _Attention(("q", "k", "v", "o"))
    lrgrad.GaLoreAdamW(same.named_parameters(), rank=4).load_state_dict(copy.deepcopy(state))
    wrapped = torch.nn.ModuleDict({"module": _Attention(("q", "k", "v", "o"))})
    lrgrad.GaLoreAdamW(wrapped.named_parameters(), rank=4).load_state_dict(copy.deepcopy(state))


def test_layerwise_skipped_window_moves_no_counter_and_refreshes_nothing():
    model = _model()
    opt = lrgrad.GaLoreAdamW(lrgrad.param_groups(model, rank=8, update_proj_gap=2), lr=1e-2)
    layerwise = lrgrad.LayerwiseOptimizer(opt, max_grad_norm=1.0)
    head = model.head.weight if hasattr(model, "head") else list(model.parameters())[-1]

    def window(poison: bool) -> None:
        opt.zero_grad()
        loss = lm_loss(model, make_batch(seed=0))
        # a NaN only in a full-rank param's gradient: the global norm is NaN
        handle = head.register_hook(lambda g: g * float("nan")) if poison else None
        loss.backward()
        if handle is not None:
            handle.remove()
        layerwise.step()

    window(False)
    before = copy.deepcopy(opt.state_dict())
    window(True)  # step 2 for every param: skipped
    after = opt.state_dict()
    assert layerwise.skipped_steps == 1
    for index, saved in before["state"].items():
        assert_states_equal(saved, after["state"][index])
