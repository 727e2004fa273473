"""The optimizers through the Triton entry points (interpreter) follow the torch backend."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_model import TinyLM, train

import lrgrad


@pytest.mark.parametrize("name", ["GaLoreAdamW", "GaLoreMuon", "GaLoreAuON"])
def test_optimizer_triton_backend_matches_torch_backend(name, monkeypatch):
    torch.manual_seed(0)
    model = TinyLM()
    twin = copy.deepcopy(model)
    cls = lrgrad.OPTIMIZERS[name]

    def run(m, backend):
        monkeypatch.setenv("LRGRAD_KERNELS", backend)
        # fp32 Newton–Schulz iterates on both backends (bf16 ones: tests/kernels/test_newton_schulz_precision.py)
        extra = {"ns_dtype": "fp32"} if name == "GaLoreMuon" else {}
        opt = cls(lrgrad.param_groups(m, rank=8, update_proj_gap=2), lr=1e-2, weight_decay=0.1, **extra)
        return train(m, opt, steps=2)

    from lrgrad.kernels import triton_projection

    calls = {"lowrank_update_": 0}
    fused = triton_projection.lowrank_update_

    def counting(*args, **kwargs):
        calls["lowrank_update_"] += 1
        return fused(*args, **kwargs)

    monkeypatch.setattr(triton_projection, "lowrank_update_", counting)
    losses_torch = run(model, "torch")
    assert calls["lowrank_update_"] == 0
    losses_triton = run(twin, "triton")
    assert calls["lowrank_update_"] > 0, "the Triton fused update must have run"
    assert losses_triton == pytest.approx(losses_torch, rel=1e-4)
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        # two steps of fp32 kernels vs torch: agreement to a few fp32 roundings of O(1e-2) updates
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=n)
