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
