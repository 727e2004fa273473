"""Per-layer updates equal the ordinary loop: accumulation, exact global-norm clipping, one scheduler clock."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_model import TinyLM, lm_loss, make_batch, run_windows

import lrgrad


@pytest.mark.parametrize("max_norm", [None, 0.05])
@pytest.mark.parametrize("name", ["GaLoreAdamW", "GaLoreAdafactor", "APOLLOAdamW", "FiraAdamW"])
def test_layerwise_equals_ordinary_with_accumulation(max_norm, name):
    torch.manual_seed(0)
    base = TinyLM().double()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    opt_a, _ = run_windows(a, name, layerwise=False, windows=3, accumulation=4, max_norm=max_norm, scheduler=True)
    opt_b, lw = run_windows(b, name, layerwise=True, windows=3, accumulation=4, max_norm=max_norm, scheduler=True)
    for (key, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-10, msg=key)
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"] == 0.02 * 0.5**3
    if max_norm is not None:
        assert lw.last_grad_norm > max_norm  # the clip was active
    assert all(p.grad is None for p in b.parameters())


def test_layerwise_frees_projected_grads_during_backward():
    model = TinyLM()
    opt = lrgrad.GaLoreAdamW(lrgrad.param_groups(model, rank=8), lr=0.01)
    lw = lrgrad.LayerwiseOptimizer(opt, accumulation_steps=2, max_grad_norm=1.0)
    lm_loss(model, make_batch()).backward()
    lw.step()
    assert all(p.grad is not None for p in model.parameters())  # first micro-batch: accumulate only
    lm_loss(model, make_batch(seed=1)).backward()
    projected = [p for g in opt.param_groups for p in g["params"] if opt.is_projected(p, g)]
    assert projected and all(p.grad is None for p in projected)  # freed in the hook
    lw.step()
    assert all(p.grad is None for p in model.parameters())


def test_layerwise_apollo_keeps_full_grads_only_when_clipping():
    """APOLLO's update reads all of G: with clipping it is held until the global norm is known
    (then stepped exactly as the ordinary loop); without clipping it is stepped and freed in its hook."""
    for max_norm, held in ((1.0, True), (None, False)):
        model = TinyLM()
        opt = lrgrad.APOLLOAdamW(lrgrad.param_groups(model, rank=8), lr=0.01)
        lw = lrgrad.LayerwiseOptimizer(opt, accumulation_steps=1, max_grad_norm=max_norm)
        lm_loss(model, make_batch()).backward()
        projected = [(p, g) for g in opt.param_groups for p in g["params"] if opt.is_projected(p, g)]
        assert projected and all((p.grad is not None) == held for p, _ in projected)
        assert all(opt.needs_full_grad(p, g) for p, g in projected)
        lw.step()
        assert all(p.grad is None for p in model.parameters())
        assert all(opt.state[p]["step"] == 1 for p, _ in projected)


def test_compressed_accumulation_leaves_apollo_params_in_grad():
    model = TinyLM()
    groups = lrgrad.param_groups(model, rank=8)
    flora = lrgrad.FloraAdamW([groups[0]], lr=0.01)
    assert lrgrad.CompressedAccumulator(flora).compressed_params
    with pytest.raises(ValueError, match="optimizer"):  # APOLLO needs G: nothing to compress
        lrgrad.CompressedAccumulator(lrgrad.APOLLOAdamW(lrgrad.param_groups(model, rank=8), lr=0.01))


def test_layerwise_nonfinite_norm_skips_the_step():
    model = TinyLM()
    opt = lrgrad.GaLoreAdamW(lrgrad.param_groups(model, rank=8), lr=0.01)
    lw = lrgrad.LayerwiseOptimizer(opt, max_grad_norm=1.0)
    before = copy.deepcopy(model.state_dict())
    (lm_loss(model, make_batch()) * float("inf")).backward()
    lw.step()
    assert lw.skipped_steps == 1
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) or not torch.isfinite(value).all(), key


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"accumulation_steps": 0}, ValueError, "accumulation_steps"),
        ({"accumulation_steps": 2.0}, TypeError, "accumulation_steps"),
        ({"max_grad_norm": -1.0}, ValueError, "max_grad_norm"),
    ],
)
def test_layerwise_bad_input(kwargs, error, match):
    opt = lrgrad.GaLoreAdamW(TinyLM().parameters())
    with pytest.raises(error, match=match):
        lrgrad.LayerwiseOptimizer(opt, **kwargs)
    with pytest.raises(TypeError, match="optimizer"):
        lrgrad.LayerwiseOptimizer(torch.optim.AdamW(TinyLM().parameters()))


@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_layers_unfrozen_midway_with_add_param_group_step_as_in_the_ordinary_loop(max_norm):
    """Fine-tuning that unfreezes layers midway (``requires_grad_(True)`` + ``add_param_group``) under
    per-layer updates: the new params get their hooks (stepped and freed during backward) and the
    weights equal the ordinary loop's."""
    torch.manual_seed(0)
    base = TinyLM().double()
    models = [copy.deepcopy(base), copy.deepcopy(base)]
    opts, lws = [], []
    for i, model in enumerate(models):
        frozen = list(model.layers[0].parameters())
        for p in frozen:
            p.requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = lrgrad.GaLoreAdamW(trainable, lr=0.01, rank=8, update_proj_gap=2)
        opts.append(opt)
        lws.append(lrgrad.LayerwiseOptimizer(opt, max_grad_norm=max_norm) if i else None)
    for step in range(4):
        for model, opt, lw in zip(models, opts, lws):
            if step == 2:
                for p in model.layers[0].parameters():
                    p.requires_grad_(True)
                opt.add_param_group({"params": list(model.layers[0].parameters())})
            lm_loss(model, make_batch(seed=step)).backward()
            if lw is None:
                if max_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                opt.step()
                opt.zero_grad()
            else:
                if step == 3 and max_norm is None:  # the unfrozen matrices were stepped in their hooks
                    assert model.layers[0].q_proj.weight.grad is None
                lw.step()
    for (key, x), y in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-10, msg=key)
    assert not torch.equal(models[1].layers[0].q_proj.weight, base.layers[0].q_proj.weight)


def test_optimizer_loaded_directly_after_the_wrapper_is_built_follows_the_schedule():
    """A resume that calls ``opt.load_state_dict`` (not the wrapper's) after building the wrapper: torch
    replaces the group dicts, and the hooks must step with the new ones, which the scheduler updates."""
    torch.manual_seed(0)
    base = TinyLM().double()
    models = [copy.deepcopy(base), copy.deepcopy(base)]
    opts = [lrgrad.GaLoreAdamW(lrgrad.param_groups(m, rank=8), lr=0.01) for m in models]
    lw = lrgrad.LayerwiseOptimizer(opts[1])
    for opt in opts:
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 0.5**step) for o in opts]
    for step in range(3):
        for model in models:
            lm_loss(model, make_batch(seed=step)).backward()
        opts[0].step()
        opts[0].zero_grad()
        lw.step()
        for sched in scheds:
            sched.step()
    for (key, x), y in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-10, msg=key)
