"""No silent full-rank fallback: a group asking for a rank that can project nothing says so.

DeepSpeed ZeRO replaces a group's params by one flattened 1-D partition after the
optimizer is built (stages 1-2: ``param_group["params"] = [flat_fp32_partition]``;
stage 3 partitions the model params themselves and tags them with ``ds_id``/``ds_numel``).
DeepSpeed is not installed in CI, so both are simulated exactly as DeepSpeed does them.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_model import TinyLM, lm_loss, make_batch, train

import lrgrad


def step_once(opt, model):
    opt.zero_grad()
    lm_loss(model, make_batch()).backward()
    opt.step()


def test_rank_larger_than_every_matrix_warns_once_naming_the_routes():
    model = TinyLM()
    opt = lrgrad.GaLoreAdamW(lrgrad.param_groups(model, rank=64), lr=1e-3)  # every min(m, n) is 32
    with pytest.warns(UserWarning, match=r"rank=64 can be projected.*DeepSpeed ZeRO.*FSDP2.*setup_parallel"):
        step_once(opt, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step_once(opt, model)  # once per group, not every step


def test_projectable_groups_and_rankless_groups_stay_silent():
    model = TinyLM()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, lrgrad.GaLoreAdamW(lrgrad.param_groups(model, rank=8), lr=1e-3), steps=2)
        train(model, lrgrad.GaLoreAdamW(model.parameters(), lr=1e-3), steps=2)  # rank=None: full-rank by request


def deepspeed_zero12_flatten(opt):
    """What DeepSpeed ZeRO-1/2 does to the client optimizer: one flat fp32 partition per group."""
    for group in opt.param_groups:
        flat = torch.cat([p.detach().reshape(-1) for p in group["params"]]).float().requires_grad_(True)
        flat.grad = torch.cat([p.grad.reshape(-1) for p in group["params"]]).float()
        group["params"] = [flat]


def test_params_flattened_after_construction_raise_naming_deepspeed():
    model = TinyLM()
    opt = lrgrad.GaLoreAdamW(lrgrad.param_groups(model, rank=8), lr=1e-3)
    lm_loss(model, make_batch()).backward()
    deepspeed_zero12_flatten(opt)
    with pytest.raises(ValueError, match=r"Invalid params: .*flattened 1-D.*DeepSpeed ZeRO.*FSDP2"):
        opt.step()


def test_zero3_partitioned_params_are_refused_at_construction():
    model = TinyLM()
    for i, p in enumerate(model.parameters()):  # deepspeed.zero.Init tags every param it partitions
        p.ds_id, p.ds_numel, p.ds_shape = i, p.numel(), p.shape
    with pytest.raises(ValueError, match=r"Invalid params: .*ZeRO-3.*ds_id.*FSDP2"):
        lrgrad.GaLoreAdamW(lrgrad.param_groups(model, rank=8), lr=1e-3)
    lrgrad.GaLoreAdamW(model.parameters(), lr=1e-3)  # no rank asked: full-rank AdamW is what the user gets


def test_seeds_follow_positions_when_params_are_swapped_after_construction():
    """Accelerate's FSDP2 prepare swaps the optimizer's params for new (sharded) tensors; the
    seeded random projector must give each param the seed of its position, as if built on them."""
    torch.manual_seed(0)
    model = TinyLM().double()
    twin = TinyLM().double()
    twin.load_state_dict(model.state_dict())
    swapped = lrgrad.FloraAdamW(lrgrad.param_groups(model, rank=8), lr=1e-2)
    for group in swapped.param_groups:  # the swap, as fsdp2_switch_optimizer_parameters does it
        by_id = {id(p): q for p, q in zip(model.parameters(), twin.parameters())}
        group["params"] = [by_id[id(p)] for p in group["params"]]
    direct = lrgrad.FloraAdamW(lrgrad.param_groups(twin, rank=8), lr=1e-2)
    seeds = {}
    for name, opt in (("swapped", swapped), ("direct", direct)):
        twin.zero_grad()
        lm_loss(twin, make_batch()).backward()
        opt.step(); opt.zero_grad()  # noqa: E702
        seeds[name] = [opt.state[p]["proj_seed"] for p in opt.param_groups[0]["params"]]
    assert seeds["swapped"] == seeds["direct"]
    assert len(set(seeds["direct"])) == len(seeds["direct"])  # distinct per param


def test_a_no_decay_group_of_vectors_beside_projected_matrices_stays_silent():
    """The usual fine-tuning split (matrices decay; biases and norms do not) with the constructor's
    rank: the vectors' group projects nothing by nature, which is not a flattened-params setup."""
    model = TinyLM()
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt = lrgrad.GaLoreAdamW(groups, rank=8, lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step_once(opt, model)


def test_params_flattened_before_construction_still_warn():
    """FSDP1 without use_orig_params hands the optimizer flat 1-D params: every group is vectors only."""
    model = TinyLM()
    flat = [torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))]
    opt = lrgrad.GaLoreAdamW([{"params": flat, "weight_decay": 0.1}, {"params": [torch.nn.Parameter(torch.ones(4))]}],
                             rank=8, lr=1e-3)
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    with pytest.warns(UserWarning, match=r"rank=8 can be projected.*DeepSpeed ZeRO"):
        opt.step()


def test_the_unprojectable_group_warning_names_the_users_step_line():
    # the warning is raised several frames deep (torch's step wrappers, the pipeline): it must point at
    # the line that called opt.step(), not at torch's or lrgrad's internals
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = lrgrad.GaLoreAdamW([p], rank=8, lr=1e-3)  # min(m, n) = 4 <= rank
    p.grad = torch.randn(6, 4)
    with pytest.warns(UserWarning, match="can be projected") as record:
        opt.step()
    hits = [w for w in record if "can be projected" in str(w.message)]
    assert [w.filename for w in hits] == [__file__]
