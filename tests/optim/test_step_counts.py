"""The step-count tensors of the fused Adam calls: the reference's values, and no host sync on a GPU."""

from __future__ import annotations

import pytest
import torch

import lrgrad
from lrgrad.step_counts import step_counts, step_counts_reference

CASES = [[1], [3, 3, 3], [1, 2, 7, 7], [2**24, 5], []]


@pytest.mark.parametrize("steps", CASES)
def test_cpu_counts_are_the_reference(steps):
    got, want = step_counts(steps, "cpu"), step_counts_reference(steps, "cpu")
    assert len(got) == len(want) == len(steps)
    for g, w, s in zip(got, want, steps):
        assert g.dim() == 0 and g.dtype == torch.float32 and g.device.type == "cpu"
        assert torch.equal(g, w) and g.item() == float(s)


@pytest.mark.parametrize("steps", CASES)
def test_device_paths_give_one_fp32_scalar_per_count(steps):
    """The non-CPU branches (a device fill when all counts are equal, a non-blocking copy otherwise) run
    on the meta device here: one 0-d fp32 tensor per count on the asked device."""
    got = step_counts(steps, "meta")
    assert len(got) == len(steps)
    assert all(t.dim() == 0 and t.dtype == torch.float32 and t.device.type == "meta" for t in got)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: make gpu-check runs it")
@pytest.mark.parametrize("steps", CASES)
def test_cuda_counts_equal_the_reference_without_a_sync(steps):
    torch.cuda.set_sync_debug_mode("error")  # a blocking copy or .item() raises
    try:
        got = step_counts(steps, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for g, w in zip(got, step_counts_reference(steps, "cuda")):
        assert g.dim() == 0 and torch.equal(g, w)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: make gpu-check runs it")
def test_cuda_galore_steady_step_issues_no_host_sync():
    """A steady-state GaLoreAdamW step (no refresh, default ``skip_nonfinite=False``) queues its work and
    returns without waiting for the GPU, so the host runs ahead as with torch's fused AdamW."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 48, device="cuda")),
              torch.nn.Parameter(torch.randn(48, device="cuda"))]
    opt = lrgrad.GaLoreAdamW(params, lr=1e-3, rank=8, update_proj_gap=1000)
    for _ in range(2):  # the first step refreshes (an SVD may sync); the second is steady
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in params)
