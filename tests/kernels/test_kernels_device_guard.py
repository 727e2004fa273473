"""Every Triton launch runs under ``device_guard(tensor)``: a tensor on cuda:1 must launch on
cuda:1, not on whichever device is current. No GPU here: the guard's choice is checked on device
objects, and every launch of every entry point is checked to happen inside a guard."""

from __future__ import annotations

import contextlib
import types

import torch
from lrgrad_experiments.tools import aot
from triton.runtime.interpreter import InterpretedFunction

from lrgrad import kernels
from lrgrad.kernels import (
    triton_channel_scale,
    triton_matmul,
    triton_normalize,
    triton_projection,
    triton_quant,
    triton_utils,
)


def test_guard_selects_the_tensors_cuda_device_and_is_a_no_op_on_cpu():
    on_gpu1 = types.SimpleNamespace(device=torch.device("cuda", 1))  # stands in for a cuda:1 tensor
    guard = triton_utils.device_guard(on_gpu1)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # entering it would switch to cuda:1
    assert isinstance(triton_utils.device_guard(torch.zeros(1)), contextlib.nullcontext)


def test_every_launch_of_every_entry_point_is_guarded(monkeypatch):
    guarded: list[torch.device] = []
    launched: dict[str, list[torch.device]] = {}

    @contextlib.contextmanager
    def recording_guard(tensor):
        guarded.append(tensor.device)
        try:
            yield
        finally:
            guarded.pop()

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        assert guarded, f"{self.fn.__name__} launched outside device_guard"
        devices = {a.device for a in args if isinstance(a, torch.Tensor)}
        assert devices == {guarded[-1]}, f"{self.fn.__name__}: guard on {guarded[-1]}, tensors on {devices}"
        launched.setdefault(self.fn.__name__, []).append(guarded[-1])
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    for module in (triton_channel_scale, triton_matmul, triton_normalize, triton_projection, triton_quant):
        monkeypatch.setattr(module, "device_guard", recording_guard)

    kernels.lowrank_update_(torch.zeros(5, 7), torch.ones(5, 2), torch.ones(2, 7), "right", alpha=1.0, decay=0.5)
    kernels.newton_schulz(torch.randn(6, 9), steps=1)
    kernels.adam_direction_(torch.zeros(9), torch.zeros(9), torch.ones(9), 0.9, 0.999, 1e-8, 1)
    kernels.auon_normalize(torch.randn(4, 6))
    x = torch.randn(40)
    kernels.dequantize_int4(*kernels.quantize_int4(x, 8), x.shape, 8)
    kernels.dequantize_int8(*kernels.quantize_int8(x, 8, stochastic=True, seed=1), group_size=8)
    for signed in (True, False):
        codes, absmax = kernels.quantize_blockwise_8bit(x.abs(), 8, signed=signed)
        kernels.dequantize_blockwise_8bit(codes, absmax, None, 8, signed=signed)
    kernels.stochastic_round(x, seed=2)
    g = torch.randn(6, 5)
    kernels.channel_sumsq(g, torch.zeros(6, 5), channel_dim=1)
    kernels.channel_scale_update_(torch.zeros(6, 5), g, torch.ones(6), 0, alpha=1.0, decay=1.0)
    assert set(launched) == set(aot.all_kernels())  # every kernel was reached, each under a guard
