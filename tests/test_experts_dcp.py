"""Expert stacks in distributed checkpoints (DCP), one process; the FSDP2 cases are in
``tests/distributed/test_fsdp2_experts_dcp.py``.

* Every projector family: an expert that received no token before the save (never refreshed) resumes
  bit-identically through torch's ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` + ``dcp`` (whose
  template step refreshes every expert) and through ``lrgrad.distributed.save_checkpoint`` / ``load_checkpoint``.
* ``state_dict()`` keys a stack's experts by global index (strings); ``load_state_dict`` takes that, int keys
  or the in-memory list, and refuses, naming the expert, one that is missing, unknown or given twice.
* ``load_checkpoint`` keeps an expert's key that the template lacks (``nonfinite_skips``), and refuses a
  checkpoint without a stack's expert states, naming the stack and the expert,
  before anything is loaded.
"""

from __future__ import annotations

import pytest
import torch
from dcp_routes import load, save
from torch import nn

from lrgrad.optim.lowrank import LowRankOptimizer

E = 3
SHAPE = (E, 20, 12)
GAP = 2
SAVE_AT, STEPS = 3, 6
PROJECTORS = ("svd", "qgalore", "random", "dct", "online_pca", "grass", "golore", "conda", "ldadam")


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gate_up_proj = nn.Parameter(torch.randn(SHAPE, dtype=torch.float64))


def make(projector: str, **options) -> tuple[Stack, LowRankOptimizer]:
    model = Stack()
    opt = LowRankOptimizer([{"params": [model.gate_up_proj], "experts": True}], lr=1e-2, rank=4,
                           update_proj_gap=GAP, projector=projector, **options)
    return model, opt


def train(model: Stack, opt: LowRankOptimizer, start: int, stop: int, nan_at: int | None = None) -> None:
    """Expert 2 gets no token before the save (a zero gradient slice: skipped, never refreshed); expert 0 a NaN
    on step ``nan_at``."""
    for t in range(start, stop):
        grad = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        if t < SAVE_AT:
            grad[2] = 0
        if t == nan_at:
            grad[0, 1, 2] = float("nan")
        model.gate_up_proj.grad = grad
        opt.step()








def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("route", ["torch", "torch-flat", "lrgrad"])
@pytest.mark.parametrize("projector", PROJECTORS)
def test_expert_without_token_before_the_save_resumes_bit_identically(tmp_path, projector, route):
    model, opt = make(projector)
    train(model, opt, 0, SAVE_AT)
    idle = opt.state[model.gate_up_proj]["experts"][2]
    assert idle["step"] == 0 and idle["proj_refreshes"] == 0
    saved_keys = [set(s) for s in opt.state[model.gate_up_proj]["experts"]]
    save(route, str(tmp_path / "ckpt"), model, opt)
    train(model, opt, SAVE_AT, STEPS)

    resumed, resumed_opt = make(projector)
    load(route, str(tmp_path / "ckpt"), resumed, resumed_opt)
    # the placeholders of the never-refreshed expert are gone again: the state as it was saved
    assert [set(s) for s in resumed_opt.state[resumed.gate_up_proj]["experts"]] == saved_keys
    train(resumed, resumed_opt, SAVE_AT, STEPS)
    assert torch.equal(resumed.gate_up_proj.detach(), model.gate_up_proj.detach())
    assert same(resumed_opt.state[resumed.gate_up_proj], opt.state[model.gate_up_proj])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_load_checkpoint_keeps_a_key_the_template_lacks(tmp_path):
    """``nonfinite_skips`` appears on an expert's first skipped NaN step; the template's zero-gradient step never
    makes it, so ``load_checkpoint`` takes the expert's keys from the checkpoint, not from the template."""
    from lrgrad.distributed import load_checkpoint, save_checkpoint

    model, opt = make("svd", skip_nonfinite=True)
    train(model, opt, 0, SAVE_AT, nan_at=1)
    assert opt.state[model.gate_up_proj]["experts"][0]["nonfinite_skips"] == 1
    save_checkpoint(str(tmp_path / "ckpt"), model, opt)
    resumed, resumed_opt = make("svd", skip_nonfinite=True)
    load_checkpoint(str(tmp_path / "ckpt"), resumed, resumed_opt)
    assert same(resumed_opt.state[resumed.gate_up_proj], opt.state[model.gate_up_proj])
    train(model, opt, SAVE_AT, STEPS)
    train(resumed, resumed_opt, SAVE_AT, STEPS)
    assert torch.equal(resumed.gate_up_proj.detach(), model.gate_up_proj.detach())


def test_state_dict_marks_a_never_refreshed_expert_with_placeholders():
    model, opt = make("svd")
    train(model, opt, 0, SAVE_AT)
    experts = opt.state_dict()["state"][0]["experts"]
    assert list(experts) == ["0", "1", "2"]  # keyed by global index, as strings
    assert experts["2"]["proj_refreshes"] == 0 and not experts["2"]["proj_basis"].any()
    assert "proj_basis" not in opt.state[model.gate_up_proj]["experts"][2]  # only in the saved form
    assert experts["0"]["proj_basis"] is opt.state[model.gate_up_proj]["experts"][0]["proj_basis"]


def test_load_state_dict_takes_experts_by_global_index():
    model, opt = make("svd")
    train(model, opt, 0, STEPS)
    saved = opt.state_dict()
    as_list = list(saved["state"][0]["experts"].values())

    def with_experts(experts):
        return {**saved, "state": {0: {"experts": experts}}}

    for experts in (as_list, dict(enumerate(as_list))):  # the in-memory list, int keys
        other_model, other = make("svd")
        other.load_state_dict(with_experts(experts))
        assert same(other.state_dict(), saved)
    refusals = {"no state for expert 1": {"0": as_list[0], "2": as_list[2]},
                r"entry '3', which is no expert of a stack of 3": {**dict(enumerate(as_list)), "3": as_list[0]},
                "entry 'x'": {"x": as_list[0]},
                "holds expert 0 twice": {0: as_list[0], "0": as_list[0], "1": as_list[1], "2": as_list[2]}}
    for message, experts in refusals.items():
        _, other = make("svd")
        with pytest.raises(ValueError, match=message):
            other.load_state_dict(with_experts(experts))
        assert not other.state


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_load_checkpoint_refuses_a_checkpoint_without_the_experts_states(tmp_path):
    from lrgrad.distributed import load_checkpoint, save_checkpoint

    model = Stack()  # the same stack stepped as one (E, m * n) matrix: its state has no experts
    opt = LowRankOptimizer([{"params": [model.gate_up_proj]}], lr=1e-2, rank=2)
    model.gate_up_proj.grad = torch.randn(SHAPE, dtype=torch.float64)
    opt.step()
    save_checkpoint(str(tmp_path / "ckpt"), model, opt)
    resumed, resumed_opt = make("svd")
    before = resumed.gate_up_proj.detach().clone()
    with pytest.raises(ValueError, match="no optimizer state for expert 0 of the expert stack 'gate_up_proj'"):
        load_checkpoint(str(tmp_path / "ckpt"), resumed, resumed_opt)
    assert torch.equal(resumed.gate_up_proj.detach(), before)
