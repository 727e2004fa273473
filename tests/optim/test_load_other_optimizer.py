"""Loading a state dict never switches the algorithm (issue 29, item 2).

torch.optim's ``load_state_dict`` takes every group hyperparameter from the saved dict, so without a
check ``GaLoreAdamW.load_state_dict(FiraAdamW(...).state_dict())`` turns the GaLore optimizer into Fira.
Every key that chooses the algorithm must match (else a ``ValueError`` naming it), and a per-parameter
state key the optimizer does not keep is refused.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import lrgrad

NAMES = sorted(lrgrad.OPTIMIZERS)


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(16, 12)), torch.nn.Parameter(torch.randn(12))]
    opt = lrgrad.OPTIMIZERS[name](params, rank=4, update_proj_gap=2)
    return params, opt


def run(params, opt, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


@pytest.mark.parametrize("saved, loader", [("FiraAdamW", "GaLoreAdamW"), ("APOLLOAdamW", "FloraAdamW"),
                                           ("GaLoreAdamW", "FiraAdamW"), ("FloraAdamW", "APOLLOAdamW")])
def test_another_full_rank_mode_is_refused_by_name(saved, loader):
    params, source = build(saved)
    run(params, source, 3, seed=1)
    _, target = build(loader)
    before = [dict(g) for g in target.param_groups]
    with pytest.raises(ValueError, match="full_rank"):
        target.load_state_dict(source.state_dict())
    assert [g["full_rank"] for g in target.param_groups] == [g["full_rank"] for g in before]


def test_channel_and_tensor_scaling_are_different_algorithms():
    params, mini = build("APOLLOMiniAdamW")
    run(params, mini, 1, seed=1)
    _, apollo = build("APOLLOAdamW")
    with pytest.raises(ValueError, match="scale_type"):
        apollo.load_state_dict(mini.state_dict())


def test_an_unknown_per_param_state_key_is_refused_by_name():
    params, opt = build("GaLoreAdamW")
    run(params, opt, 2, seed=1)
    sd = opt.state_dict()
    sd["state"][0]["exp_avg_sq_row"] = torch.zeros(16)  # an Adafactor key in an AdamW state
    _, fresh = build("GaLoreAdamW")
    with pytest.raises(ValueError, match="exp_avg_sq_row"):
        fresh.load_state_dict(sd)


@pytest.mark.parametrize("saved, loader", list(itertools.product(NAMES, NAMES)))
def test_loading_never_changes_what_runs(saved, loader):
    """For every pair of presets (each at its defaults, rank 4): loading either raises ValueError, or it
    changes no group setting of the loader (the presets were the same algorithm) and the loaded optimizer
    then steps exactly as the one that saved the state, bit for bit."""
    params_a, a = build(saved)
    run(params_a, a, 3, seed=1)  # refreshes on steps 1 and 3
    params_b, b = build(loader)
    with torch.no_grad():
        for pb, pa in zip(params_b, params_a):
            pb.copy_(pa)
    settings = [{k: v for k, v in g.items() if k != "params"} for g in b.param_groups]
    try:
        b.load_state_dict(a.state_dict())
    except ValueError:
        return
    assert [{k: v for k, v in g.items() if k != "params"} for g in b.param_groups] == settings
    run(params_a, a, 3, seed=2)
    run(params_b, b, 3, seed=2)
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa, pb), f"{loader} loaded {saved}'s state and then ran something else"


@pytest.mark.parametrize("name", NAMES)
def test_a_checkpoint_written_before_a_group_key_existed_resumes_exactly(name):
    """A state dict saved by an older lrgrad lacks the group keys added since (``experts``,
    ``limiter_input``, ...). torch takes the saved groups as they are, so the next step used to raise
    KeyError. It must resume bit for bit as if the key had been saved with its value."""
    params_a, a = build(name)
    run(params_a, a, 3, seed=1)
    saved = a.state_dict()
    for group in saved["param_groups"]:
        for key in ("experts", "limiter_input"):
            group.pop(key, None)
    params_b, b = build(name)
    with torch.no_grad():
        for pb, pa in zip(params_b, params_a):
            pb.copy_(pa)
    settings = [{k: v for k, v in g.items() if k != "params"} for g in b.param_groups]
    b.load_state_dict(saved)
    assert [{k: v for k, v in g.items() if k != "params"} for g in b.param_groups] == settings
    run(params_a, a, 3, seed=2)
    run(params_b, b, 3, seed=2)
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa, pb), f"{name} resumed from an older checkpoint and ran something else"
