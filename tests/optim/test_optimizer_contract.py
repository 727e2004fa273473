"""The torch.optim contract, checked for every optimizer lrgrad exports.

Parametrized over ``lrgrad.OPTIMIZERS``: an optimizer added to the package is
covered here without touching this file.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from state_utils import assert_states_equal, roundtrip
from tiny_model import TinyLM, lm_loss, make_batch, train

import lrgrad
from lrgrad.optim.lowrank import LowRankOptimizer

NAMES = sorted(lrgrad.OPTIMIZERS)


def lr_for(cls: type) -> float:
    """A learning rate at which each family trains the tiny model in a few steps."""
    rule = cls.__name__.lower()
    if "lion" in rule:
        return 3e-3
    if "auon" in rule:
        return 5e-2
    if "muon" in rule:
        return 2e-2
    if "adafactor" in rule:
        return 3e-2
    return 1e-2


def make(name: str, model: torch.nn.Module, *, grouped: bool = True, **overrides):
    cls = lrgrad.OPTIMIZERS[name]
    options = {"lr": lr_for(cls), "update_proj_gap": 3}
    options.update(overrides)
    if grouped:
        params = lrgrad.param_groups(model, rank=options.pop("rank", 8))
    else:
        params = model.parameters()
        options.setdefault("rank", 8)
    return cls(params, **options)





def test_every_export_is_an_lrgrad_optimizer():
    assert NAMES, "no optimizers exported"
    for name in NAMES:
        assert issubclass(lrgrad.OPTIMIZERS[name], LowRankOptimizer)
        assert hasattr(lrgrad, name)


@pytest.mark.parametrize("name", NAMES)
def test_loss_decreases(name):
    model = TinyLM()
    losses = train(model, make(name, model), steps=25)
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", NAMES)
def test_model_parameters_directly(name):
    """``Opt(model.parameters(), rank=8)`` projects every matrix whose smaller side exceeds 8."""
    model = TinyLM()
    opt = make(name, model, grouped=False)
    losses = train(model, opt, steps=25)
    # embeddings and head are projected too here, so progress is slower than with param_groups
    assert sum(losses[-5:]) / 5 < 0.95 * losses[0], losses
    group = opt.param_groups[0]
    projected = [p for p in group["params"] if opt.is_projected(p, group)]
    expected = [p for p in model.parameters() if p.dim() == 2 and min(p.shape) > 8]
    assert {id(p) for p in projected} == {id(p) for p in expected}


#: param dtypes of the checkpoint tests: low-precision params keep fp32 (int, fp16 ...) state, and
#: torch.optim's load_state_dict would cast it to the param dtype (lrgrad must not)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_weights_only_roundtrip(name, dtype):
    """Every state tensor comes back with its saved dtype, shape and value."""
    model = TinyLM().to(dtype)
    opt = make(name, model)
    train(model, opt, steps=4)
    saved = roundtrip(opt.state_dict())
    fresh = make(name, model)
    fresh.load_state_dict(saved)
    assert_states_equal(opt.state_dict()["state"], fresh.state_dict()["state"])
    assert opt.state_dict()["param_groups"] == fresh.state_dict()["param_groups"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_resume_is_bit_identical(name, dtype):
    """6 steps straight == 3 steps + save/load (weights_only) + 3 steps, across refreshes (gap 2)."""
    torch.manual_seed(1)
    reference = TinyLM().to(dtype)
    start = copy.deepcopy(reference.state_dict())
    opt = make(name, reference, update_proj_gap=2)
    train(reference, opt, steps=6)

    first = TinyLM().to(dtype)
    first.load_state_dict(start)
    opt_first = make(name, first, update_proj_gap=2)
    train(first, opt_first, steps=3)
    checkpoint = roundtrip({"model": first.state_dict(), "opt": opt_first.state_dict()})

    resumed = TinyLM().to(dtype)
    resumed.load_state_dict(checkpoint["model"])
    opt_resumed = make(name, resumed, update_proj_gap=2)
    opt_resumed.load_state_dict(checkpoint["opt"])
    train(resumed, opt_resumed, steps=3, batch_seed=3)
    for (key, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_with_different_lr_and_rank(name):
    model = TinyLM()
    cls = lrgrad.OPTIMIZERS[name]
    attn = [p for n, p in model.named_parameters() if "q_proj" in n or "k_proj" in n]
    mlp = [p for n, p in model.named_parameters() if "gate_proj" in n]
    frozen_lr = [p for n, p in model.named_parameters() if "v_proj" in n]
    opt = cls([{"params": attn, "rank": 4}, {"params": mlp, "rank": 16}, {"params": frozen_lr, "lr": 0.0}],
              lr=lr_for(cls), rank=8, update_proj_gap=3, weight_decay=0.0)
    before = [p.clone() for p in frozen_lr]
    train(model, opt, steps=2)
    for b, p in zip(before, frozen_lr):
        assert torch.equal(b, p)
    for group, rank in zip(opt.param_groups, (4, 16, 8)):
        assert group["rank"] == rank
    for p in attn + mlp:
        state = opt.state[p]
        low = [v for k, v in state.items()
               if isinstance(v, torch.Tensor) and v.dim() == 2 and not k.startswith("proj_")]
        rank = 4 if any(p is q for q in attn) else 16
        for v in low:
            assert rank in v.shape, (name, v.shape)


@pytest.mark.parametrize("name", NAMES)
def test_lr_scheduler_drives_the_step(name):
    model = TinyLM()
    opt = make(name, model, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step == 0 else 0.0)
    train(model, opt, steps=1)
    sched.step()
    assert all(g["lr"] == 0.0 for g in opt.param_groups)
    snapshot = copy.deepcopy(model.state_dict())
    train(model, opt, steps=2, batch_seed=1)
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshot[key]), key


@pytest.mark.parametrize("name", NAMES)
def test_closure_runs_under_grad_and_returns_loss(name):
    model = TinyLM()
    opt = make(name, model)
    tokens = make_batch()
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = lm_loss(model, tokens)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [True]
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", NAMES)
def test_maximize_equals_minimizing_the_negation(name):
    torch.manual_seed(3)
    a = TinyLM()
    b = copy.deepcopy(a)
    opt_a = make(name, a)
    opt_b = make(name, b, maximize=True)
    for i in range(4):
        for model, opt, sign in ((a, opt_a, 1.0), (b, opt_b, -1.0)):
            opt.zero_grad()
            (sign * lm_loss(model, make_batch(seed=i))).backward()
            opt.step()
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_step_never_modifies_grad(name):
    model = TinyLM()
    opt = make(name, model, maximize=True)
    lm_loss(model, make_batch()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for g, p in zip(grads, model.parameters()):
        assert torch.equal(g, p.grad)


@pytest.mark.parametrize("name", NAMES)
def test_grad_none_zero_size_and_frozen_params(name):
    model = TinyLM()
    empty = torch.nn.Parameter(torch.zeros(0, 5))
    frozen = torch.nn.Parameter(torch.randn(40, 40), requires_grad=False)
    unused = torch.nn.Parameter(torch.randn(40, 40))
    cls = lrgrad.OPTIMIZERS[name]
    opt = cls([{"params": list(model.parameters()) + [empty, frozen, unused]}], lr=lr_for(cls), rank=8)
    empty.grad = torch.zeros(0, 5)
    before = unused.clone(), frozen.clone()
    train(model, opt, steps=2)
    assert torch.equal(unused, before[0]) and torch.equal(frozen, before[1])
    assert len(opt.state[unused]) == 0 and len(opt.state[frozen]) == 0


@pytest.mark.parametrize("name", NAMES)
def test_bf16_params_keep_fp32_state(name):
    model = TinyLM().to(torch.bfloat16)
    opt = make(name, model)
    before = [p.clone() for p in model.parameters()]
    losses = train(model, opt, steps=6)
    assert all(torch.isfinite(torch.tensor(losses)))
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        assert torch.isfinite(p).all()
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 1:
                assert value.dtype in (torch.float32, torch.float16), (key, value.dtype)


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_and_repr(name):
    model = TinyLM()
    opt = make(name, model)
    train(model, opt, steps=2)
    clone = copy.deepcopy(opt)
    assert_states_equal(
        {i: s for i, s in enumerate(opt.state.values())}, {i: s for i, s in enumerate(clone.state.values())}
    )
    assert type(opt).__name__ in repr(opt)


@pytest.mark.parametrize("name", NAMES)
def test_hooks_zero_grad_and_add_param_group(name):
    model = TinyLM()
    opt = make(name, model)
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    train(model, opt, steps=1)
    assert seen == ["pre", "post"]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    extra = torch.nn.Parameter(torch.randn(48, 48))
    opt.add_param_group({"params": [("extra", extra)], "rank": 4})  # groups are named (param_groups)
    extra.grad = torch.randn(48, 48)
    opt.step()
    assert opt.state[extra]["step"] == 1


@pytest.mark.parametrize("name", NAMES)
def test_constructor_signature_is_torch_like(name):
    params = inspect.signature(lrgrad.OPTIMIZERS[name]).parameters
    assert list(params)[0] == "params" and "lr" in params


@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler_skips_an_overflowed_step_without_touching_weights_or_state(name):
    """``scaler.unscale_`` + ``clip_grad_norm_`` + ``scaler.step``: an inf loss scale overflow makes the
    scaler skip ``step()``, so weights and every state entry stay; the next finite step trains."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = make(name, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    def scaled_step(seed, factor=1.0):
        opt.zero_grad()
        scaler.scale(lm_loss(model, make_batch(seed=seed)) * factor).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()

    for seed in range(3):
        scaled_step(seed)
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    scaled_step(3, factor=float("inf"))
    assert scaler.get_scale() == 2.0**7  # the overflow was seen and the scale backed off
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert_states_equal(opt.state_dict()["state"], state["state"])
    scaled_step(4)
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


@pytest.mark.parametrize("name", NAMES)
def test_a_tensor_lr_under_a_scheduler_steps_as_the_float_lr(name):
    """``lr=torch.tensor(...)`` (torch's capturable / tensor-lr convention) with an LR scheduler: the same
    weights, bit for bit, as the float lr; the group keeps a tensor, and its state dict loads back."""
    torch.manual_seed(0)
    a = TinyLM()
    b = copy.deepcopy(a)
    lr = torch.tensor(lr_for(lrgrad.OPTIMIZERS[name]))
    opt_a = make(name, a, lr=float(lr))  # the float32 value the tensor holds
    opt_b = make(name, b, lr=lr)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt_a, opt_b)]
    for i in range(3):
        for model, opt, sched in ((a, opt_a, scheds[0]), (b, opt_b, scheds[1])):
            opt.zero_grad()
            lm_loss(model, make_batch(seed=i)).backward()
            opt.step()
            sched.step()
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert isinstance(opt_b.param_groups[0]["lr"], torch.Tensor)
    make(name, copy.deepcopy(b), lr=torch.tensor(1.0)).load_state_dict(roundtrip(opt_b.state_dict()))


@pytest.mark.parametrize("name", NAMES)
def test_pickle_and_a_state_dict_saved_before_the_first_step_resume_exactly(name):
    """``pickle.dumps(opt)`` (what multiprocessing and some checkpointers do) continues bit-identically, and
    a state dict saved before any step loads into a fresh optimizer that then runs as the original."""
    import pickle

    torch.manual_seed(0)
    model = TinyLM()
    twin = copy.deepcopy(model)
    opt = make(name, model)
    early = make(name, twin)
    early.load_state_dict(roundtrip(opt.state_dict()))  # nothing stepped yet
    train(model, opt, steps=3)
    train(twin, early, steps=3)
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), twin.parameters()))
    clone = pickle.loads(pickle.dumps(opt))
    params = [p for g in opt.param_groups for p in g["params"]]
    copies = [p for g in clone.param_groups for p in g["params"]]
    for p, q in zip(params, copies):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt.step()
    clone.step()
    assert all(torch.equal(p, q) for p, q in zip(params, copies))


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_and_load_state_dict_hooks_are_honoured(name):
    """torch's ``register_state_dict_pre/post_hook`` and ``register_load_state_dict_pre/post_hook``: called
    in order, and what the post hook returns / the load pre hook rewrites is what is saved / loaded."""
    model = TinyLM()
    opt = make(name, model)
    train(model, opt, steps=1)
    seen = []

    def saved_post(optimizer, state_dict):
        seen.append("post")
        state_dict["note"] = "kept"
        return state_dict

    def load_pre(optimizer, state_dict):
        seen.append("load_pre")
        state_dict = {k: v for k, v in state_dict.items() if k != "note"}
        state_dict["param_groups"] = [{**g, "lr": 0.125} for g in state_dict["param_groups"]]
        return state_dict

    opt.register_state_dict_pre_hook(lambda optimizer: seen.append("pre"))
    opt.register_state_dict_post_hook(saved_post)
    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda optimizer: seen.append("load_post"))
    saved = opt.state_dict()
    assert saved["note"] == "kept"
    opt.load_state_dict(saved)
    assert seen == ["pre", "post", "load_pre", "load_post"]
    assert all(g["lr"] == 0.125 for g in opt.param_groups)
