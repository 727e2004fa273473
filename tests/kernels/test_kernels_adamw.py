"""``lrgrad.kernels.adamw``: torch's private fused AdamW kernel against its op-by-op reference, on every
dtype and device class lrgrad sends to it (fp32/fp64 moments; CPU, and CUDA when one is present). A
torch upgrade that changes the kernel's arithmetic, or the load-before-store order the aliased
directions rely on, fails here instead of training wrong."""

from __future__ import annotations

import pytest
import torch

from lrgrad import kernels

SHAPES = [(64, 16), (16, 96), (33, 7), (5,)]
#: the kernel scales by lr/(1-β1ᵗ) before dividing and may contract to FMAs: a few roundings
RTOL = {torch.float32: 2e-6, torch.float64: 1e-14}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _tensors(dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).to(device) for s in SHAPES]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / (b.abs() + torch.finfo(b.dtype).tiny)).max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_step_matches_the_reference(dtype, device, weight_decay):
    """20 steps, gradients over 7 decades, params at different step counts (bias corrections differ)."""
    assert kernels.fused_adamw_applies(_tensors(dtype, device, 0))
    fused = [_tensors(dtype, device, 1), [torch.zeros(s, dtype=dtype, device=device) for s in SHAPES],
             [torch.zeros(s, dtype=dtype, device=device) for s in SHAPES]]
    reference = [[t.clone() for t in ts] for ts in fused]
    for t in range(1, 21):
        grads = [g * 10.0 ** ((t % 7) - 5) for g in _tensors(dtype, device, 100 + t)]
        steps = [t, t + 3, t + 7, t + 100]
        options = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "weight_decay": weight_decay, "eps": 1e-8}
        kernels.adamw_step_(fused[0], grads, fused[1], fused[2], steps, **options)
        kernels.adamw_step_reference_(reference[0], grads, reference[1], reference[2], steps, **options)
        for a, b in zip(fused[0], reference[0]):  # params: a few roundings of the update, not of p
            assert float((a - b).abs().max()) <= 4 * RTOL[dtype] * 1e-3 * t + RTOL[dtype] * float(b.abs().max())
        for got, want in zip(fused[1:], reference[1:]):
            for a, b in zip(got, want):
                assert _rel(a, b) <= RTOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_directions_match_the_reference_and_aliasing_is_exact(dtype, device):
    """The directions read off the kernel (lr = -1, into a zeroed buffer; on CPU also into the gradients
    themselves) equal the op-by-op reference's, and the aliased ones equal the buffered ones bit for bit."""
    moments = {k: [[torch.zeros(s, dtype=dtype, device=device) for s in SHAPES] for _ in range(2)]
               for k in ("buffer", "aliased", "reference")}
    for t in range(1, 11):
        grads = [g * 10.0 ** ((t % 5) - 3) for g in _tensors(dtype, device, t)]
        steps = [t, t + 1, t + 5, t + 50]
        options = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
        buffered = kernels.adamw_directions_(grads, *moments["buffer"], steps, **options)
        own = [g.clone() for g in grads]
        aliased = kernels.adamw_directions_(own, *moments["aliased"], steps, into_grads=True, **options)
        assert aliased is not None and buffered is not None
        if device == "cpu":
            assert all(a is b for a, b in zip(aliased, own))  # written into the gradients
        reference = [torch.zeros_like(g) for g in grads]
        kernels.adamw_step_reference_(reference, grads, *moments["reference"], steps, lr=-1.0, weight_decay=0.0,
                                      **options)
        for a, b, r in zip(aliased, buffered, reference):
            assert torch.equal(a, b)
            assert _rel(b, r) <= RTOL[dtype]


def test_the_reference_is_chosen_where_the_kernel_does_not_apply():
    p32, p64 = torch.zeros(4), torch.zeros(4, dtype=torch.float64)
    assert not kernels.fused_adamw_applies([p32, p64])  # one dtype per call
    assert not kernels.fused_adamw_applies([torch.zeros(4, 4).T])  # not dense
    assert not kernels.fused_adamw_applies([torch.zeros(4, device="meta")])
    assert kernels.adamw_directions_([torch.ones(4, dtype=torch.bfloat16)], [torch.zeros(4)], [torch.zeros(4)], [1],
                                     beta1=0.9, beta2=0.999, eps=1e-8) is None
    # bf16 params with fp32 moments: the reference steps fp32 work copies and rounds once
    p = torch.randn(8, dtype=torch.bfloat16)
    g = torch.randn(8)
    m, v = torch.zeros(8), torch.zeros(8)
    kernels.adamw_step_([p.clone()], [g], [m.clone()], [v.clone()], [1], lr=0.1, beta1=0.9, beta2=0.999,
                        weight_decay=0.0, eps=1e-8)
    work = [p.float()]
    kernels.adamw_step_reference_(work, [g], [m], [v], [1], lr=0.1, beta1=0.9, beta2=0.999, weight_decay=0.0,
                                  eps=1e-8)
    out = p.clone()
    kernels.adamw_step_([out], [g], [torch.zeros(8)], [torch.zeros(8)], [1], lr=0.1, beta1=0.9, beta2=0.999,
                        weight_decay=0.0, eps=1e-8)
    assert torch.equal(out, work[0].to(torch.bfloat16))


@pytest.mark.parametrize("fused", [None, False])
def test_a_moment_of_another_shape_is_refused_before_the_kernel_runs(fused):
    """torch's CPU fused kernel walks every list by the param's size without checking the others: a
    moment of another shape (a group's rank changed by hand, a state of another model) would be read
    and written out of bounds (a smaller one corrupts the heap). One ValueError, nothing written."""
    p, g = torch.zeros(64, 8), torch.randn(64, 8)
    m, v = torch.zeros(64, 16), torch.zeros(64, 16)  # larger: the unchecked kernel stays in bounds
    with pytest.raises(ValueError, match=r"exp_avg .*\(64, 16\).*\(64, 8\)"):
        kernels.adamw_step_([p], [g], [m], [v], [1], lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0,
                            eps=1e-8, fused=fused)
    assert not m.any() and not v.any() and not p.any()
    with pytest.raises(ValueError, match=r"exp_avg .*\(64, 8\).*\(64, 4\)"):
        kernels.adamw_directions_([torch.randn(64, 4)], [torch.zeros(64, 8)], [torch.zeros(64, 8)], [1],
                                  beta1=0.9, beta2=0.999, eps=1e-8)
