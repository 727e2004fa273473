"""The non-finite guard's reduction (``lrgrad.optim.nonfinite.probe``): its GEMV fast path flags
exactly the tensors the reference ``sum`` flags, wherever the NaN/Inf sits (the folded rows and the
tail past the last full row alike)."""

from __future__ import annotations

import math

import pytest
import torch

from lrgrad.optim import nonfinite
from lrgrad.optim.nonfinite import GEMV_MIN_NUMEL, GEMV_WIDTH, probe, probe_reference

#: sizes at the threshold, a multiple of the row width, and with a tail past the last full row
SIZES = [GEMV_MIN_NUMEL, GEMV_MIN_NUMEL + 3 * GEMV_WIDTH, GEMV_MIN_NUMEL + 1, GEMV_MIN_NUMEL + GEMV_WIDTH - 1]


def _spy_mv(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = torch.mv

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(nonfinite.torch, "mv", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_single_nonfinite_entry_anywhere_is_flagged(monkeypatch, dtype, size, bad, where):
    calls = _spy_mv(monkeypatch)
    t = torch.randn(size, generator=torch.Generator().manual_seed(size), dtype=dtype)
    assert bool(probe(t).isfinite())
    index = {"first": 0, "middle": size // 2, "last": size - 1}[where]  # "last" is in the tail when there is one
    t[index] = bad
    assert not bool(probe(t).isfinite())
    assert not bool(probe_reference(t).isfinite())
    assert calls, "the GEMV path was not taken"


def test_opposite_infinities_are_flagged():
    t = torch.zeros(GEMV_MIN_NUMEL * 2)
    t[5], t[-5] = math.inf, -math.inf
    assert not bool(probe(t).isfinite())


def test_matrices_are_folded_whole_and_an_overflowing_sum_is_flagged_as_by_the_reference():
    t = torch.randn(1024, 1030, generator=torch.Generator().manual_seed(0))  # 2-D, not a multiple of the width
    torch.testing.assert_close(probe(t), probe_reference(t), rtol=1e-4, atol=1e-2)
    huge = torch.full((GEMV_MIN_NUMEL,), 3e38)
    assert not bool(probe(huge).isfinite()) and not bool(probe_reference(huge).isfinite())


@pytest.mark.parametrize("case", ["small", "bf16", "fp16", "transposed"])
def test_other_tensors_take_the_reference(monkeypatch, case):
    calls = _spy_mv(monkeypatch)
    t = {
        "small": torch.randn(GEMV_MIN_NUMEL - 1),
        "bf16": torch.randn(GEMV_MIN_NUMEL, dtype=torch.bfloat16),
        "fp16": torch.randn(GEMV_MIN_NUMEL, dtype=torch.float16),
        "transposed": torch.randn(1024, 1025).T,
    }[case]
    assert torch.equal(probe(t), probe_reference(t))
    assert not calls
    if t.dim() == 2:
        t[-1, 0] = math.nan
    else:
        t[0] = math.nan
    assert not bool(probe(t).isfinite())


def test_the_optimizer_guard_skips_a_large_full_rank_param_with_one_nan():
    """End to end: a full-rank param large enough for the GEMV path, one NaN in its gradient, is skipped
    (weights and moments unchanged) while the other param steps."""
    import lrgrad

    big = torch.nn.Parameter(torch.zeros(GEMV_MIN_NUMEL // 512, 512 + 1))
    small = torch.nn.Parameter(torch.zeros(8, 4))
    opt = lrgrad.GaLoreAdamW([big, small], lr=0.1, rank=None, skip_nonfinite=True)
    for step in range(2):
        big.grad = torch.ones_like(big)
        small.grad = torch.ones_like(small)
        if step == 1:
            big.grad[-1, -1] = math.nan
        before = big.detach().clone(), {k: v.clone() for k, v in opt.state[big].items() if torch.is_tensor(v)}
        small_before = small.detach().clone()
        opt.step()
        if step == 1:
            assert torch.equal(big.detach(), before[0])
            assert all(torch.equal(opt.state[big][k], v) for k, v in before[1].items())
            assert opt.state[big]["nonfinite_skips"] == 1
            assert not torch.equal(small.detach(), small_before)
