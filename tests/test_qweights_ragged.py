"""INT8/INT4 weights with a ragged last group per row (issue 29, item 11).

``quantize_weights(model, bits=8, group_size=256)`` must build what ``estimate_memory(weight_bits=8)``
counts: a row length that 256 does not divide (the GaLore paper's LLaMA-1B ``down_proj`` rows of 5461)
ends in a shorter group. Checked on every paper config's linear shapes (60M ... 7B): small row slices
(the row length is what matters) for values, meta tensors for the full shapes' bytes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrgrad
from lrgrad.estimate import LLAMA_CONFIGS, quantized_weight_bytes
from lrgrad.quant import dequantize_int4, dequantize_int8
from lrgrad.qweights import QuantizedLinear

GS = 256


def linear_shapes() -> dict[str, set[tuple[int, int]]]:
    """(out_features, in_features) of each config's attention and MLP linears."""
    return {name: {(c["d"], c["d"]), (c["ffn"], c["d"]), (c["d"], c["ffn"])} for name, c in LLAMA_CONFIGS.items()}


ROW_LENGTHS = sorted({i for shapes in linear_shapes().values() for _, i in shapes})


def rows_of(layer: QuantizedLinear) -> torch.Tensor:
    """Each INT8 row dequantized on its own by lrgrad.quant's flat layout (groups of GS, the last one shorter)."""
    per_row = layer.groups_per_row
    return torch.stack([
        dequantize_int8(layer.codes[r], layer.scale[r * per_row:(r + 1) * per_row],
                        layer.zero[r * per_row:(r + 1) * per_row], group_size=GS)
        for r in range(layer.out_features)])


@pytest.mark.parametrize("in_features", ROW_LENGTHS)
@pytest.mark.parametrize("bits", [8, 4])
def test_paper_row_lengths_quantize_within_half_a_step(in_features, bits):
    torch.manual_seed(in_features)
    linear = nn.Linear(in_features, 3)  # three rows of the paper's length
    model = nn.Sequential(linear)
    lrgrad.quantize_weights(model, bits=bits, group_size=GS, exclude=())
    layer = model[0]
    assert isinstance(layer, QuantizedLinear)
    per_row = -(-in_features // GS)
    assert layer.scale.shape == layer.zero.shape == (3 * per_row,)
    w = layer.dequantize(torch.float32)
    assert w.shape == (3, in_features)
    # every element within half a step of its own group's stored scale, the short last group included
    step = layer.scale.float().view(3, per_row).repeat_interleave(GS, dim=1)[:, :in_features]
    assert ((w - linear.weight).abs() <= step / 2 + 1e-7).all()
    if bits == 8:  # the layout is lrgrad.quant's, row by row
        assert torch.equal(rows_of(layer), w)
    else:
        assert layer.codes.numel() == -(-3 * in_features // 2)


def test_int4_ragged_layout_matches_the_flat_reference_for_one_row():
    torch.manual_seed(0)
    linear = nn.Linear(5461, 1)
    layer = QuantizedLinear.from_linear(linear, bits=4, group_size=GS)
    reference = dequantize_int4(layer.codes, layer.scale, layer.zero, (1, 5461), group_size=GS)
    assert torch.equal(layer.dequantize(torch.float32), reference)


@pytest.mark.parametrize("config", list(LLAMA_CONFIGS))
def test_full_shapes_store_exactly_what_the_estimator_counts(config):
    for out_features, in_features in sorted(linear_shapes()[config]):
        for bits in (8, 4):
            layer = QuantizedLinear(in_features, out_features, bias=False, bits=bits, group_size=GS, device="meta")
            # codes, scale, zero and the two rounding counters, plus the one-element float handle
            stored = sum(b.numel() * b.element_size() for b in layer.buffers()) + layer.weight.element_size()
            groups = out_features * -(-in_features // GS)
            counted = quantized_weight_bytes(out_features * in_features, bits, GS, torch.float32, groups)
            assert stored == counted, (config, out_features, in_features, bits)
            assert layer.scale.numel() == groups


def test_a_ragged_layer_trains_and_unchanged_elements_keep_their_codes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5461, 4, bias=False))
    lrgrad.quantize_weights(model, bits=8, group_size=GS, exclude=())
    layer = model[0]
    codes = layer.codes.clone()
    work = layer.dequantize_for_update()
    work[:, -1] += 0.5 * layer.scale.float().view(4, -1)[:, -1]  # move only the last (short) group's last element
    layer.requantize_(work)
    changed = layer.codes != codes
    assert not changed[:, :-1].any()  # every other element, and every other group, keeps its code
    opt = lrgrad.QGaLoreAdamW([layer.weight], lr=1e-2, rank=2)
    x = torch.randn(8, 5461)
    before = layer.dequantize(torch.float32).clone()
    for _ in range(3):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    after = layer.dequantize(torch.float32)
    assert after.shape == (4, 5461) and torch.isfinite(after).all() and not torch.equal(before, after)
