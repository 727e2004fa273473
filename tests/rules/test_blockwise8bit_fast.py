"""The eager fast path of the 8-bit AdamW rule equals its reference bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from lrgrad import quant
from lrgrad.rules import AdamW8bitRule
from lrgrad.rules.blockwise8bit import code_table, dequantize_blocks, quantize_blocks

GROUP = {"betas": (0.9, 0.999), "eps": 1e-8, "fused": None, "moment_block_size": 64, "moment_min_size": 256}


@pytest.mark.parametrize("signed", [True, False])
def test_code_table_is_the_reference_value_of_every_byte(signed):
    byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes = byte.view(torch.int8) if signed else byte
    table = code_table(signed, torch.device("cpu"))
    # one block per code, absmax 3: the reference multiplies value(c) by the block's absmax
    ref = quant.dequantize_blockwise_8bit(codes, torch.full((256,), 3.0), block_size=1, signed=signed)
    assert torch.equal(table * 3.0, ref)


@pytest.mark.parametrize("signed", [True, False])
def test_block_quantize_and_dequantize_equal_the_reference(signed):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64 * 37, generator=g) * torch.logspace(-6, 1, 64 * 37)
    x[64:128] = 0.0  # an all-zero block: absmax 0 must not divide by zero
    if not signed:
        x = x.square()
    ref_codes, ref_absmax = quant.quantize_blockwise_8bit(x, 64, signed=signed)
    codes = torch.empty_like(ref_codes)
    absmax = torch.empty_like(ref_absmax)
    quantize_blocks(x.clone(), 64, signed, codes, absmax)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
    out = torch.empty(x.numel())
    dequantize_blocks(codes, absmax, 64, signed, out)
    assert torch.equal(out, quant.dequantize_blockwise_8bit(codes, absmax, block_size=64, signed=signed))


@pytest.mark.parametrize("shape", [(96, 64), (50, 33), (7, 40)])  # whole blocks, a partial last block
def test_eager_fast_update_is_bit_identical_to_the_reference(shape, monkeypatch):
    import lrgrad.rules.adamw8bit as module

    monkeypatch.setattr(module, "UPDATE_CHUNK", 1024)  # several chunks, one partial
    rule = AdamW8bitRule(dict(GROUP))
    slow: dict = {}
    rule.init_state(slow, torch.zeros(shape))
    fast = copy.deepcopy(slow)
    g = torch.Generator().manual_seed(2)
    for step in range(1, 5):
        grad = torch.randn(shape, generator=g) * 10.0 ** -step
        expected = rule.update_reference(slow, grad, step)
        got = rule.update_eager_fast(fast, grad, step)
        assert torch.equal(got, expected)
        for key in slow:
            assert torch.equal(fast[key], slow[key]), key


def test_cpu_fp32_update_takes_the_fast_path(monkeypatch):
    rule = AdamW8bitRule(dict(GROUP))
    state: dict = {}
    rule.init_state(state, torch.zeros(32, 32))
    calls = []
    monkeypatch.setattr(AdamW8bitRule, "update_reference", lambda self, *a: calls.append("reference"))
    monkeypatch.setattr(AdamW8bitRule, "update_eager_fast", lambda self, *a: calls.append("fast"))
    rule.update(state, torch.randn(32, 32), 1)
    rule.update(state, torch.randn(32, 32, dtype=torch.float64), 1)  # fp64: the reference
    assert calls == ["fast", "reference"]
