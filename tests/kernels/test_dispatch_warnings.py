"""LRGRAD_KERNELS=triton never falls back to torch silently: one warning per reason."""

from __future__ import annotations

import warnings

import pytest
import torch

from lrgrad import kernels
from lrgrad.kernels import dispatch


def step_once():
    p = torch.zeros(16, 8)
    kernels.lowrank_update_(p, torch.ones(16, 2), torch.ones(2, 8), "right", alpha=-1.0, decay=1.0)
    return p


def test_forced_triton_without_triton_warns_once_and_still_computes(monkeypatch):
    monkeypatch.setattr(dispatch, "_WARNED", set())
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.warns(UserWarning, match="LRGRAD_KERNELS=triton: triton is not installed"):
        p = step_once()
    torch.testing.assert_close(p, torch.full((16, 8), -2.0))  # the torch reference ran
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step_once()  # once per reason, not per call


def test_forced_triton_on_cpu_without_the_interpreter_warns(monkeypatch):
    monkeypatch.setattr(dispatch, "_WARNED", set())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.warns(UserWarning, match="need CUDA .*TRITON_INTERPRET=1"):
        assert dispatch.backend_for(torch.zeros(2)) == "torch"


def test_auto_and_torch_never_warn(monkeypatch):
    monkeypatch.setattr(dispatch, "_WARNED", set())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for backend in ("auto", "torch"):
            monkeypatch.setenv("LRGRAD_KERNELS", backend)
            assert dispatch.backend_for(torch.zeros(2)) == "torch"
