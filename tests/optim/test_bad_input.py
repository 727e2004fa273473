"""Misuse gets a clear ValueError/TypeError naming the argument; exact state bytes."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from state_utils import assert_states_equal

import lrgrad
from lrgrad.optim.lowrank import LowRankOptimizer

# ---------------------------------------------------------------- bad input


def _param():
    return [torch.nn.Parameter(torch.randn(10, 10))]


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"rank": 0}, ValueError, "rank"),
        ({"rank": -3}, ValueError, "rank"),
        ({"rank": 2.5}, TypeError, "rank"),
        ({"rank": True}, TypeError, "rank"),
        ({"rank": "8"}, TypeError, "rank"),
        ({"lr": -1.0}, ValueError, "learning rate"),
        ({"eps": -1e-8}, ValueError, "epsilon"),
        ({"betas": (1.0, 0.999)}, ValueError, "beta"),
        ({"betas": (0.9, -0.1)}, ValueError, "beta"),
        ({"betas": (0.9,)}, TypeError, "betas"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay"),
        ({"proj_type": "diag"}, ValueError, "proj_type"),
        ({"moment_policy": "rotate"}, ValueError, "moment_policy"),
        ({"update_proj_gap": 0}, ValueError, "update_proj_gap"),
        ({"scale": "big"}, TypeError, "scale"),
        ({"svd": "qr"}, ValueError, "svd"),
        ({"maximize": "yes"}, TypeError, "maximize"),
        ({"not_an_option": 1}, TypeError, "not_an_option"),
        ({"lr": torch.tensor([1e-3, 1e-3])}, ValueError, "Invalid lr"),
        ({"fused": True, "foreach": True}, ValueError, "fused"),  # torch.optim.AdamW refuses the pair too
    ],
)
def test_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        lrgrad.GaLoreAdamW(_param(), **kwargs)


@pytest.mark.parametrize("name", [n for n in sorted(lrgrad.OPTIMIZERS)
                                  if lrgrad.optim.presets.preset_of(lrgrad.OPTIMIZERS[n]).matrix_only])
def test_a_tensor_lr_of_several_elements_is_refused_by_name_before_the_adamw_routing(name):
    """The matrix-only presets derive their embeddings' AdamW group from the lr before any group exists:
    a 2-element tensor lr reached a bare ``RuntimeError: Boolean value of Tensor ... ambiguous`` there."""
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 10))
    with pytest.raises(ValueError, match="Invalid lr: Tensor lr must be 1-element"):
        lrgrad.OPTIMIZERS[name](model.named_parameters(), lr=torch.tensor([1e-3, 1e-3]))


@pytest.mark.parametrize("rank,error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), ("8", TypeError)])
@pytest.mark.parametrize("name", sorted(lrgrad.OPTIMIZERS))
def test_a_bad_rank_is_refused_when_routing_projects_nothing(name, rank, error):
    # named params of a model with nothing to project (a convolution and its classifier head) all go to
    # the full-rank group, so no group takes the constructor's rank: it must still be checked
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    with pytest.raises(error, match="rank"):
        lrgrad.OPTIMIZERS[name](model.named_parameters(), rank=rank)


def test_bad_param_group_is_rejected_and_not_added():
    opt = lrgrad.GaLoreAdamW(_param(), rank=4)
    with pytest.raises(ValueError, match="rank"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(4, 4))], "rank": 0})
    assert len(opt.param_groups) == 1


def test_complex_params_rejected():
    with pytest.raises(ValueError, match="complex"):
        lrgrad.GaLoreAdamW([torch.nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))])


def test_unknown_rule_and_projector():
    with pytest.raises(ValueError, match="rule"):
        LowRankOptimizer(_param(), rule="sgdx")
    with pytest.raises(ValueError, match="projector"):
        LowRankOptimizer(_param(), projector="magic")


def test_sparse_grad_rejected():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = lrgrad.GaLoreAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


def test_state_dict_from_another_optimizer_or_rank_rejected():
    p = _param()
    torch_opt = torch.optim.AdamW(p)
    p[0].grad = torch.randn(10, 10)
    torch_opt.step()
    with pytest.raises(ValueError, match="lrgrad"):
        lrgrad.GaLoreAdamW(p, rank=4).load_state_dict(torch_opt.state_dict())
    ours = lrgrad.GaLoreAdamW(p, rank=4)
    ours.step()
    with pytest.raises(ValueError, match="rank"):
        lrgrad.GaLoreAdamW(p, rank=3).load_state_dict(ours.state_dict())
    with pytest.raises(ValueError, match="rule"):
        lrgrad.GaLoreAdafactor(p, rank=4).load_state_dict(ours.state_dict())
    # same config, but the state was saved for a differently shaped model
    other = [torch.nn.Parameter(torch.randn(12, 10))]
    with pytest.raises(ValueError, match="shape"):
        lrgrad.GaLoreAdamW(other, rank=4).load_state_dict(ours.state_dict())


@pytest.mark.parametrize("name", ["GaLoreAdamW", "FloraAdamW", "DCTAdamW", "GaLoreAdafactor"])
@pytest.mark.parametrize("key,value", [("rank", 16), ("rank", 4), ("proj_type", "reverse_std"),
                                       ("projector", "online_pca"), ("rule", "lion")])
def test_a_structural_key_changed_by_hand_after_the_first_step_is_refused(name, key, value):
    """The state's shapes and subspace belong to the group's rank, proj_type, projector and rule (the
    keys load_state_dict insists on): changed by hand mid-run, the step refuses with one ValueError
    naming the key and writes nothing, instead of a shape error deep in a projector, a KeyError, or
    moments of the old rank silently read by the new one. Before the first step the group may change."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 32))
    opt = getattr(lrgrad, name)([w], rank=8, update_proj_gap=2)
    opt.param_groups[0]["update_proj_gap"] = 3  # not structural: fine at any time
    w.grad = torch.randn(64, 32)
    opt.step()
    opt.param_groups[0][key] = value
    before = w.detach().clone()
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[w].items()}
    with pytest.raises(ValueError, match=rf"Invalid param group 0: {key} changed from .* to {value!r}"):
        opt.step()
    assert torch.equal(w, before)
    assert all(torch.equal(v, opt.state[w][k]) if isinstance(v, torch.Tensor) else v == opt.state[w][k]
               for k, v in state.items())
    if key in ("rank", "proj_type"):  # (another projector or rule would lack its options in the group)
        fresh = getattr(lrgrad, name)([w], rank=8)
        fresh.param_groups[0][key] = value  # no state yet: nothing to contradict
        fresh.step()
        assert not torch.equal(w, before)


def _stepped(name, dtype=torch.float32, **options):
    """A tiny model (a projected block matrix and its bias, a full-rank embedding and head) after two steps."""
    torch.manual_seed(0)
    block = torch.nn.ModuleDict({"proj": torch.nn.Linear(24, 20)})
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(16, 24), "block": block,
                                 "head": torch.nn.Linear(20, 16)}).to(dtype)
    opt = lrgrad.OPTIMIZERS[name](model.named_parameters(), rank=4, update_proj_gap=2, lr=1e-2, **options)
    assert any(opt.is_projected(model["block"]["proj"].weight, g) for g in opt.param_groups)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    return model, opt


def _assert_refused_and_untouched(model, opt, match):
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    weights = [p.detach().clone() for p in model.parameters()]
    state = {k: copy.deepcopy(v) for k, v in opt.state_dict()["state"].items()}
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert_states_equal(opt.state_dict()["state"], state)


@pytest.mark.parametrize("name", sorted(lrgrad.OPTIMIZERS))
@pytest.mark.parametrize("target,shape", [("block.proj.weight", (20, 12)), ("block.proj.bias", (10,)),
                                          ("embed.weight", (8, 24))])
def test_a_param_replaced_by_another_shape_after_a_step_is_refused_by_name(name, target, shape):
    """``p.data = torch.randn(other shape)`` after the state was created: one ValueError naming the param
    and both shapes, before anything is written (torch.optim.AdamW fails in a broadcast, lrgrad's projectors
    in a matmul: "mat1 and mat2 shapes cannot be multiplied")."""
    model, opt = _stepped(name)
    model.get_parameter(target).data = torch.randn(shape)
    _assert_refused_and_untouched(model, opt, rf"'{re.escape(target)}'.* changed from shape .* to shape "
                                              rf"{re.escape(str(shape))}")


@pytest.mark.parametrize("name", sorted(lrgrad.OPTIMIZERS))
def test_a_cast_to_float64_after_a_step_is_refused_and_bf16_or_fp16_keep_training(name):
    """``model.double()`` after a step moves the compute dtype from fp32 to fp64, which the fp32 moments and
    bases were not built in: refused by name (torch.optim.AdamW fails with "expected dtype float"). A cast to
    bf16 or fp16 keeps fp32 math and state, so training goes on (as torch.optim.AdamW's)."""
    model, opt = _stepped(name)
    model.double()
    _assert_refused_and_untouched(model, opt, r"changed from shape .* with float32 state to .* with float64 state")
    for dtype in (torch.bfloat16, torch.float16):
        model, opt = _stepped(name)
        model.to(dtype)
        before = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())
        assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_state_dtype_param_refuses_a_cast_that_changes_the_moments_dtype():
    """With ``state_dtype="param"`` a full-rank param's moments take its dtype, so fp32 -> bf16 changes them."""
    model, opt = _stepped("GaLoreAdamW", state_dtype="param")
    model.to(torch.bfloat16)
    _assert_refused_and_untouched(model, opt, r"'embed.weight'.* float32 state to .* bfloat16 state")


def test_a_replaced_param_is_refused_by_per_layer_updates():
    """LayerwiseOptimizer steps from backward hooks, without ``step()``'s checks: refused there too."""
    model, opt = _stepped("GaLoreAdamW")
    lw = lrgrad.LayerwiseOptimizer(opt)
    opt.zero_grad()
    model["block"]["proj"].weight.data = torch.randn(20, 12)
    with pytest.raises(ValueError, match=r"'block.proj.weight'.* changed from shape \(20, 24\)"):
        model["block"]["proj"](torch.randn(3, 12)).sum().backward()
    lw.remove_hooks()


def test_a_resumed_optimizer_checks_the_params_it_was_loaded_for():
    model, opt = _stepped("GaLoreAdamW")
    fresh_model, fresh = _stepped("GaLoreAdamW")
    fresh.load_state_dict(opt.state_dict())
    fresh_model["block"]["proj"].weight.data = torch.randn(20, 12)
    _assert_refused_and_untouched(fresh_model, fresh, r"'block.proj.weight'.* changed from shape \(20, 24\)")


@pytest.mark.parametrize("name", ["GaLoreAdamW", "Muon", "LowRankOptimizer"])
@pytest.mark.parametrize("model", [torch.nn.Linear(8, 8), torch.nn.Sequential(torch.nn.Linear(8, 8))])
def test_a_model_given_as_params_is_refused_naming_params(name, model):
    """``Opt(model)`` instead of ``Opt(model.parameters())``: torch says "'Linear' object is not iterable"
    (or complains about a submodule); the error should name ``params`` and the two routes that work."""
    cls = LowRankOptimizer if name == "LowRankOptimizer" else getattr(lrgrad, name)
    with pytest.raises(TypeError, match=r"Invalid params: .*nn\.Module.*named_parameters\(\).*param_groups"):
        cls(model, rank=4)


def test_state_bytes_are_what_plain_galore_needs():
    """Moments 2·max(m, n)·r + one r·min(m, n) basis per projected matrix, fp32; full-rank rest 2·numel."""
    shapes = [(64, 24), (24, 64), (40, 40)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes] + [torch.nn.Parameter(torch.randn(7))]
    opt = lrgrad.GaLoreAdamW(params, rank=4)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    expected = sum(4 * (2 * max(s) * 4 + min(s) * 4) for s in shapes) + 4 * 2 * 7
    assert lrgrad.optimizer_state_bytes(opt) == expected


def _meta_model():
    with torch.device("meta"):
        block = torch.nn.ModuleDict({"proj": torch.nn.Linear(24, 20)})
        return torch.nn.ModuleDict({"embed": torch.nn.Embedding(16, 24), "block": block,
                                    "head": torch.nn.Linear(20, 16)})


def _materialize(model):
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()


def _loss(model, seed):
    tokens = torch.randint(0, 16, (4, 6), generator=torch.Generator().manual_seed(seed))
    return model["head"](model["block"]["proj"](model["embed"](tokens))).square().mean()


@pytest.mark.parametrize("name", sorted(lrgrad.OPTIMIZERS))
def test_an_optimizer_built_before_to_empty_is_refused_at_step_and_after_it_trains(name):
    """The big-model path: build on the meta device, ``to_empty`` + ``reset_parameters``, then the optimizer.
    Built before ``to_empty``, the optimizer holds the old meta tensors (``to_empty`` swaps in new ones),
    which never get a gradient: every step silently did nothing. Refused by name at the first step (and
    by per-layer updates); built after, it trains."""
    model = _meta_model()
    early = lrgrad.OPTIMIZERS[name](model.named_parameters(), rank=4, lr=1e-2)
    _materialize(model)
    _loss(model, 0).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"'block.proj.weight' is on the meta device at step\(\)"):
        early.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="meta device"):
        lrgrad.LayerwiseOptimizer(early).step()
    opt = lrgrad.OPTIMIZERS[name](model.named_parameters(), rank=4, lr=1e-2)
    assert any(opt.is_projected(model["block"]["proj"].weight, g) for g in opt.param_groups)
    for seed in range(3):
        opt.zero_grad()
        _loss(model, seed).backward()
        opt.step()
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(model.parameters(), before))
