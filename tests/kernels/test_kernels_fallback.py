"""A Triton kernel that fails to compile on the device (e.g. an unsupported dot on ROCm) falls
back to the torch path with one warning instead of raising in the middle of training; the dot
precision never asks for TF32 where it cannot compile."""

from __future__ import annotations

import ast
import warnings

import pytest
import torch
from triton.compiler.errors import CompilationError

from lrgrad.kernels import (
    dispatch,
    lowrank_update_,
    quantize_int8,
    reference,
    triton_matmul,
    triton_projection,
    triton_quant,
)


@pytest.fixture
def fresh_failures(monkeypatch):
    monkeypatch.setattr(dispatch, "_COMPILE_FAILED", set())


def _compile_error() -> CompilationError:
    return CompilationError("def k(): ...", ast.parse("x").body[0],
                            "input_precision must be one of ('ieee', 'bf16x3', 'bf16x6'). Got tf32")


def test_compile_failure_falls_back_to_torch_with_one_warning(monkeypatch, fresh_failures):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise _compile_error()

    monkeypatch.setattr(triton_projection, "lowrank_update_", broken)
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(6, 5, generator=gen).bfloat16()
    update, basis = torch.randn(6, 2, generator=gen), torch.randn(2, 5, generator=gen)
    expected = reference.lowrank_update_(param.clone(), update, basis, "right", -0.1, 0.9)
    with pytest.warns(RuntimeWarning, match="lowrank_update_.*failed to compile.*torch path") as caught:
        out = lowrank_update_(param, update, basis, "right", alpha=-0.1, decay=0.9)
    assert len(caught) == 1 and out is param and torch.equal(param, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, and the broken kernel is not retried
        lowrank_update_(param, update, basis, "right", alpha=-0.1, decay=0.9)
    assert len(calls) == 1


def test_fallback_is_per_entry_point(monkeypatch, fresh_failures):
    monkeypatch.setattr(triton_quant, "minmax_quantize", lambda *a, **k: (_ for _ in ()).throw(_compile_error()))
    x = torch.randn(64)
    with pytest.warns(RuntimeWarning, match="quantize_int8"):
        codes, scale, zero = quantize_int8(x, 16)
    from lrgrad import quant

    expected = quant.quantize_int8(x, 16)
    assert torch.equal(codes, expected[0]) and torch.equal(scale, expected[1])
    assert dispatch._COMPILE_FAILED == {"quantize_int8"}


def test_runtime_errors_are_not_swallowed(monkeypatch, fresh_failures):
    def crash(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(triton_projection, "lowrank_update_", crash)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        lowrank_update_(torch.zeros(4, 3).bfloat16(), torch.zeros(4, 2), torch.zeros(2, 3), "right", 1.0, 1.0)
    assert not dispatch._COMPILE_FAILED


def test_dot_precision_never_asks_16bit_or_rocm_for_tf32(monkeypatch):
    bf16, fp16, fp32 = (torch.zeros(2, 2, dtype=d) for d in (torch.bfloat16, torch.float16, torch.float32))
    monkeypatch.setattr(triton_matmul, "interpreting", lambda: False)  # as on a GPU
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        monkeypatch.setattr(triton_matmul, "is_rocm", lambda: False)
        assert triton_matmul._precision(bf16, bf16) == "ieee"  # same native bf16 MMA on NVIDIA
        assert triton_matmul._precision(fp16, fp16) == "ieee"
        assert triton_matmul._precision(fp32, fp32) == "tf32"  # torch's setting allows it
        monkeypatch.setattr(triton_matmul, "is_rocm", lambda: True)
        assert triton_matmul._precision(fp32, fp32) == "ieee"  # AMD's backend has no TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        monkeypatch.setattr(triton_matmul, "is_rocm", lambda: False)
        assert triton_matmul._precision(fp32, fp32) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_mixed_operand_dtypes_are_cast_before_the_launch(monkeypatch):
    # fix 6: fp32 × bf16 operands reach the kernel as fp32 × fp32 (no in-kernel upcast on a GPU)
    seen = []
    original = triton_matmul._gemm_epilogue_kernel.run

    def run(*args, **kwargs):  # an instance attribute: no self
        seen.append((args[0].dtype, args[1].dtype))
        return original(*args, **kwargs)

    monkeypatch.setattr(triton_matmul._gemm_epilogue_kernel, "run", run)
    gen = torch.Generator().manual_seed(1)
    param = torch.randn(7, 9, generator=gen)
    update, basis = torch.randn(7, 3, generator=gen), torch.randn(3, 9, generator=gen).bfloat16()
    expected = param.double() * 0.5 + 2.0 * (update.double() @ basis.double())
    lowrank_update_(param, update, basis, "right", alpha=2.0, decay=0.5)
    assert seen == [(torch.float32, torch.float32)]
    torch.testing.assert_close(param.double(), expected, rtol=1e-5, atol=1e-5)
