"""Kernel tests run the Triton kernels through the CPU interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before triton is imported) with LRGRAD_KERNELS=triton forced."""

import os

import pytest
import torch

from lrgrad.kernels import dispatch


@pytest.fixture(autouse=True)
def _triton_backend(request, monkeypatch):
    if request.node.get_closest_marker("cuda") is not None:
        # GPU-only tests (test_kernels_cuda.py): compiled kernels on a CUDA device, real routing rule
        if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1":
            pytest.skip("GPU-only: needs CUDA and TRITON_INTERPRET unset (make gpu-check runs it)")
        monkeypatch.setenv("LRGRAD_KERNELS", "triton")
        yield
        return
    # These tests must never silently test the reference against itself.
    assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py must set TRITON_INTERPRET=1"
    assert dispatch.triton_available(), "triton is a test dependency (pip install -e '.[dev]')"
    monkeypatch.setenv("LRGRAD_KERNELS", "triton")
    # on a GPU all-fp32 GEMMs stay on cuBLAS; here the fp32 Triton kernels must be checked too
    monkeypatch.setattr(dispatch, "fp32_gemm_prefers_cublas", lambda *tensors: False)
    yield


@pytest.fixture
def forbid(monkeypatch):
    """``forbid(module, "name", ...)``: calling any of these raises (proves which path ran)."""

    def _forbid(module, *names):
        for name in names:
            def _raise(*args, _name=name, **kwargs):
                raise AssertionError(f"{module.__name__}.{_name} must not be called on this path")
            monkeypatch.setattr(module, name, _raise)

    return _forbid
