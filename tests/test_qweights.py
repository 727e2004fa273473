"""INT8/INT4 weights with stochastic rounding (Q-GaLore, arXiv:2407.08296): lrgrad.quantize_weights."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from state_utils import roundtrip
from tiny_model import TinyLM, lm_loss, make_batch, train
from torch import nn

import lrgrad
from lrgrad.quant import dequantize_int4, dequantize_int8
from lrgrad.qweights import QuantizedLinear, QuantizedWeight, quantized_modules

GS = 32  # TinyLM rows are 32 or 64 long


def quantized_tiny(bits: int = 8, rounding: str = "stochastic", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return lrgrad.quantize_weights(TinyLM(), bits=bits, group_size=GS, rounding=rounding)



def codes_of(model: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for _, m in quantized_modules(model) for t in (m.codes, m.scale, m.zero)]


# ---------------------------------------------------------------------- rounding
def rounding_deviation(rounding: str, fraction: float, n: int = 4096) -> tuple[float, float]:
    """Round ``code + fraction`` (in units of the group's scale) n times; returns (|mean - fraction|, bound).

    The n values sit in one layer (n elements, same grid), each rounded independently.
    The mean of n Bernoulli(f) draws has std sqrt(f(1-f)/n): the bound is 5 of those.
    """
    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(nn.Linear(256, n // 256, bias=False), group_size=256, rounding=rounding)
    q_before = layer._q_from(layer.codes).clone()
    scale_before = layer.scale.clone()
    work = layer.dequantize_for_update()
    step = layer.scale.float().repeat_interleave(256).view_as(work)
    layer.requantize_(work + fraction * step)
    assert torch.equal(layer.scale, scale_before)  # the grid is kept: moves are in code units
    moved = layer._q_from(layer.codes) - q_before
    assert set(moved.unique().tolist()) <= {0.0, 1.0}  # floor or floor + 1, nothing else
    bound = 5 * math.sqrt(fraction * (1 - fraction) / n)
    return abs(moved.mean().item() - fraction), bound


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.62, 0.9])
def test_stochastic_rounding_is_unbiased_and_nearest_is_not(fraction):
    deviation, bound = rounding_deviation("stochastic", fraction)
    assert deviation <= bound
    # the same statistical test rejects round-to-nearest (its mean is 0 or 1)
    deviation, bound = rounding_deviation("nearest", fraction)
    assert deviation > bound


def test_codes_use_the_quant_module_layout():
    torch.manual_seed(1)
    linear = nn.Linear(64, 48)
    for bits, dequant in ((8, dequantize_int8), (4, dequantize_int4)):
        layer = QuantizedLinear.from_linear(linear, bits=bits, group_size=GS)
        reference = dequant(layer.codes, layer.scale, layer.zero, (48, 64), group_size=GS)
        assert torch.equal(layer.dequantize(torch.float32), reference)
        # round to nearest at conversion: error at most half a step of the stored scale
        step = layer.scale.float().repeat_interleave(GS).view(48, 64)
        assert ((layer.dequantize() - linear.weight).abs() <= step / 2 + 1e-7).all()
    assert layer.codes.dtype == torch.uint8 and layer.codes.numel() == 48 * 64 // 2  # packed INT4


def test_unchanged_weight_keeps_its_codes_exactly():
    layer = QuantizedLinear.from_linear(nn.Linear(64, 32), group_size=GS)
    before = codes_of(nn.Sequential(layer))
    for _ in range(3):
        layer.requantize_(layer.dequantize_for_update())
    assert all(torch.equal(a, b) for a, b in zip(before, codes_of(nn.Sequential(layer))))
    assert int(layer.rounding_step) == 3


def test_forward_and_gradients_equal_a_dense_linear_with_the_dequantized_weight():
    torch.manual_seed(2)
    layer = QuantizedLinear.from_linear(nn.Linear(64, 32), group_size=GS)
    dense = layer.to_linear()
    x = torch.randn(3, 5, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out, ref = layer(x), dense(x2)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    (out * torch.arange(32.0)).sum().backward()
    (ref * torch.arange(32.0)).sum().backward()
    assert isinstance(layer.weight, QuantizedWeight) and layer.weight.grad.dtype == torch.float32
    torch.testing.assert_close(layer.weight.grad, dense.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert layer.weight.untyped_storage().nbytes() == 4  # the handle holds one element


# ---------------------------------------------------------------------- training
def test_int8_training_with_qgalore_matches_fp32():
    """Tolerance: after 30 steps the INT8 run's loss is within 5% (relative) of the fp32 run's."""
    model = quantized_tiny()
    reference = lrgrad.dequantize_weights(copy.deepcopy(model))  # same starting weights, fp32
    options = {"rank": 8, "update_proj_gap": 10}
    losses_q = train(model, lrgrad.QGaLoreAdamW(lrgrad.param_groups(model, **options), lr=1e-2), 30)
    losses_f = train(reference, lrgrad.QGaLoreAdamW(lrgrad.param_groups(reference, **options), lr=1e-2), 30)
    assert losses_q[-1] < 0.5 * losses_q[0]
    assert abs(losses_q[-1] - losses_f[-1]) <= 0.05 * losses_f[-1]


def test_small_updates_stall_with_nearest_and_survive_stochastic_rounding():
    """lr 1e-4: every update is far below half a quantization step.

    Round-to-nearest: the codes never change (training stalls). Stochastic rounding:
    the quantized weights move, on average, like the fp32 weights do: the projection of
    the quantized displacement on the fp32 displacement is 1 within 25%.
    """
    steps, lr = 20, 1e-4
    options = {"rank": 8, "update_proj_gap": 100, "weight_decay": 0.0}
    nearest = quantized_tiny(rounding="nearest")
    before = codes_of(nearest)
    train(nearest, lrgrad.QGaLoreAdamW(lrgrad.param_groups(nearest, **options), lr=lr), steps)
    assert all(torch.equal(a, b) for a, b in zip(before, codes_of(nearest)))

    model = quantized_tiny()
    start = [m.dequantize().clone() for _, m in quantized_modules(model)]
    reference = lrgrad.dequantize_weights(copy.deepcopy(model))
    train(model, lrgrad.QGaLoreAdamW(lrgrad.param_groups(model, **options), lr=lr), steps)
    train(reference, lrgrad.QGaLoreAdamW(lrgrad.param_groups(reference, **options), lr=lr), steps)
    dq = torch.cat([(m.dequantize() - s).flatten() for (_, m), s in zip(quantized_modules(model), start)])
    names = [n for n, _ in quantized_modules(model)]
    df = torch.cat([(reference.get_submodule(n).weight.detach() - s).flatten() for n, s in zip(names, start)])
    ratio = (dq @ df / (df @ df)).item()
    assert 0.75 < ratio < 1.25
    assert dq.abs().max() > 0  # codes did move


def every_optimizer():
    return sorted(lrgrad.OPTIMIZERS)


@pytest.mark.parametrize("name", every_optimizer())
def test_every_lrgrad_optimizer_updates_quantized_weights(name):
    model = quantized_tiny()
    reference = lrgrad.dequantize_weights(copy.deepcopy(model))
    cls = lrgrad.OPTIMIZERS[name]
    lr = 5e-2 if "AuON" in name else 3e-3 if "Lion" in name else 2e-2 if "Muon" in name else 1e-2
    losses = train(model, cls(lrgrad.param_groups(model, rank=8, update_proj_gap=5), lr=lr), 12)
    ref_losses = train(reference, cls(lrgrad.param_groups(reference, rank=8, update_proj_gap=5), lr=lr), 12)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert abs(losses[-1] - ref_losses[-1]) <= 0.1 * ref_losses[0]
    assert all(int(m.rounding_step) == 12 for _, m in quantized_modules(model))


def test_layerwise_updates_equal_the_global_step():
    a, b = quantized_tiny(), quantized_tiny()
    opt_a = lrgrad.QGaLoreAdamW(lrgrad.param_groups(a, rank=8, update_proj_gap=2), lr=1e-2)
    opt_b = lrgrad.QGaLoreAdamW(lrgrad.param_groups(b, rank=8, update_proj_gap=2), lr=1e-2)
    layerwise = lrgrad.LayerwiseOptimizer(opt_b)
    train(a, opt_a, 4)
    for i in range(4):
        lm_loss(b, make_batch(seed=i)).backward()
        layerwise.step()
    assert all(torch.equal(x, y) for x, y in zip(codes_of(a), codes_of(b)))


def test_int4_weights_train():
    model = quantized_tiny(bits=4)
    losses = train(model, lrgrad.GaLoreAdamW(lrgrad.param_groups(model, rank=8, update_proj_gap=10), lr=1e-2), 30)
    assert losses[-1] < 0.6 * losses[0]


def test_torch_optimizers_cannot_silently_update_the_handle():
    model = quantized_tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lm_loss(model, make_batch()).backward()
    with pytest.raises(RuntimeError):
        opt.step()


# ---------------------------------------------------------------------- checkpoints
def test_state_dict_round_trip_and_dequantize_for_export():
    model = quantized_tiny()
    train(model, lrgrad.QGaLoreAdamW(lrgrad.param_groups(model, rank=8), lr=1e-2), 3)
    state = roundtrip(model.state_dict())
    assert "layers.0.q_proj.codes" in state and "layers.0.q_proj.weight" not in state
    assert state["layers.0.q_proj.codes"].dtype == torch.int8
    other = quantized_tiny(seed=5)
    names = [n for n, _ in other.named_parameters()]
    other.load_state_dict(state)
    assert [n for n, _ in other.named_parameters()] == names  # order kept (optimizers index by position)
    assert all(torch.equal(x, y) for x, y in zip(codes_of(model), codes_of(other)))
    tokens = make_batch(seed=9)
    with torch.no_grad():
        expected = model(tokens)
        assert torch.equal(other(tokens), expected)
        lrgrad.dequantize_weights(other)
        assert not quantized_modules(other)
        assert type(other.layers[0].q_proj) is nn.Linear
        torch.testing.assert_close(other(tokens), expected, rtol=1e-5, atol=1e-5)


def test_checkpoint_resumes_bit_identically():
    def run(model, opt, start, stop):
        for i in range(start, stop):
            opt.zero_grad()
            lm_loss(model, make_batch(seed=i)).backward()
            opt.step()

    def build():
        model = quantized_tiny()
        return model, lrgrad.QGaLoreAdamW(lrgrad.param_groups(model, rank=8, update_proj_gap=2), lr=1e-2)

    model, opt = build()
    run(model, opt, 0, 3)
    checkpoint = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    run(model, opt, 3, 6)

    resumed, resumed_opt = build()
    run(resumed, resumed_opt, 0, 1)  # a different trajectory, overwritten by the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["opt"])
    run(resumed, resumed_opt, 3, 6)
    assert all(torch.equal(x, y) for x, y in zip(codes_of(model), codes_of(resumed)))
    for (_, x), (_, y) in zip(model.named_parameters(), resumed.named_parameters()):
        if not isinstance(x, QuantizedWeight):
            assert torch.equal(x, y)


def test_deepcopy_and_device_dtype_moves_keep_the_handle_light():
    model = quantized_tiny()
    clone = copy.deepcopy(model)
    layer = clone.layers[0].q_proj
    assert isinstance(layer.weight, QuantizedWeight) and layer.weight.lrgrad_codec is layer
    assert layer.weight.untyped_storage().nbytes() == 4
    assert torch.equal(layer.codes, model.layers[0].q_proj.codes)
    handle = layer.weight
    clone.to(torch.bfloat16)
    assert layer.weight is handle and handle.dtype == torch.bfloat16  # same Parameter object
    assert layer.scale.dtype == torch.float16 and layer.codes.dtype == torch.int8  # codes and grid untouched
    assert clone(make_batch()).dtype == torch.bfloat16


# ---------------------------------------------------------------------- bad input
def test_bad_input():
    model = TinyLM()
    with pytest.raises(ValueError, match="bits"):
        lrgrad.quantize_weights(model, bits=3, group_size=GS)
    with pytest.raises(TypeError, match="bits"):
        lrgrad.quantize_weights(model, bits=8.0, group_size=GS)
    # (group_size=24 on rows of 32 is a ragged last group, supported: tests/test_qweights_ragged.py)
    with pytest.raises(ValueError, match="group_size"):
        lrgrad.quantize_weights(model, group_size=0)
    with pytest.raises(TypeError, match="target_modules"):
        lrgrad.quantize_weights(model, group_size=GS, target_modules=["attn_norm"])
    with pytest.raises(TypeError, match="target_modules"):
        lrgrad.quantize_weights(model, group_size=GS, target_modules=["embed_tokens"], exclude=())
    with pytest.raises(ValueError, match="target_modules"):
        lrgrad.quantize_weights(model, group_size=GS, target_modules=["no_such_layer"])
    with pytest.raises(ValueError, match="rounding"):
        lrgrad.quantize_weights(model, group_size=GS, rounding="up")
    with pytest.raises(TypeError, match="model"):
        lrgrad.quantize_weights(nn.Linear(4, 4).weight)
    assert not quantized_modules(model)  # nothing was converted by a failed call
    tied = TinyLM(dim=32, vocab=64)
    tied.lm_head.weight = tied.embed_tokens.weight
    with pytest.raises(ValueError, match="tied"):
        lrgrad.quantize_weights(tied, group_size=GS, target_modules=["lm_head"], exclude=())
    lrgrad.quantize_weights(tied, group_size=GS, exclude=())  # "all-linear" skips the tied head
    assert type(tied.lm_head) is nn.Linear and isinstance(tied.layers[0].q_proj, QuantizedLinear)
