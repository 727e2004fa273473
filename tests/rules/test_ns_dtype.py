"""The ``ns_dtype`` option of every Newton–Schulz rule (Muon, Hybrid-AuON, GaLoreMuon, ...): what
``"auto"`` resolves to on each kind of hardware (the detection), that the chosen precision is the
one the step uses, its state-dict round trip, and bad input."""

from __future__ import annotations

import io
import math
import platform
from pathlib import Path

import pytest
import torch
from polar_oracle import polar_map, relative_error

import lrgrad
from lrgrad.kernels import precision
from lrgrad.kernels.newton_schulz import newton_schulz_reference

X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512_bf16 avx512_vnni
"""
X86_OLD_CPUINFO = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\nflags\t\t: fpu sse avx2 avx512f\n"
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sha2 bf16 i8mm sve\n"
ARM_OLD_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes\n"


# ---------------------------------------------------------------- detection
def test_cpu_flags_parse_x86_and_arm_cpuinfo():
    assert {"avx512_bf16", "avx2"} <= precision.cpu_flags(X86_CPUINFO)
    assert {"bf16", "sve"} <= precision.cpu_flags(ARM_CPUINFO)
    assert precision.cpu_flags("") == frozenset()


@pytest.mark.parametrize("cpuinfo,machine,native", [
    (X86_CPUINFO, "x86_64", True),
    (X86_OLD_CPUINFO, "x86_64", False),  # AVX-512 without BF16: torch emulates bf16 dot products
    ("flags: fpu amx_bf16 amx_tile\n", "x86_64", True),  # AMX (Sapphire Rapids and later)
    (ARM_CPUINFO, "aarch64", True),
    (ARM_OLD_CPUINFO, "aarch64", False),
    (X86_CPUINFO, "ppc64le", False),  # unknown architecture: never assumed native
])
def test_native_bf16_from_the_cpu_flags(cpuinfo, machine, native):
    assert precision.cpu_has_native_bf16(precision.cpu_flags(cpuinfo), machine) is native


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="Linux only: /proc/cpuinfo is the independent source")
def test_this_cpu_detection_agrees_with_proc_cpuinfo():
    """torch's own probe (used when present) and the flags Linux lists give the same answer here."""
    flags = precision.cpu_flags()
    assert flags, "/proc/cpuinfo lists no flags"
    assert precision.cpu_has_native_bf16() == precision.cpu_has_native_bf16(flags, platform.machine())
    assert precision.native_bf16_matmul("cpu") == precision.cpu_has_native_bf16(flags, platform.machine())
    described = precision.describe_cpu()
    assert ("bf16 GEMMs native" in described) == precision.native_bf16_matmul("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_resolves_by_hardware(monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16_matmul", lambda device: native)
    fp32, fp64, bf16 = (torch.zeros(2, 2, dtype=d) for d in (torch.float32, torch.float64, torch.bfloat16))
    assert precision.resolve_ns_dtype("auto", fp32) == (torch.bfloat16 if native else torch.float32)
    assert precision.resolve_ns_dtype("auto", bf16) == (torch.bfloat16 if native else torch.float32)
    assert precision.resolve_ns_dtype("auto", fp64) == torch.float64  # fp64 params ask for exact arithmetic
    # explicit choices ignore the hardware
    assert precision.resolve_ns_dtype("bf16", fp32) == torch.bfloat16
    assert precision.resolve_ns_dtype("bf16", fp64) == torch.bfloat16
    assert precision.resolve_ns_dtype(torch.bfloat16, fp32) == torch.bfloat16
    assert precision.resolve_ns_dtype("fp32", fp32) == torch.float32
    assert precision.resolve_ns_dtype(torch.float32, bf16) == torch.float32
    assert precision.resolve_ns_dtype("fp32", fp64) == torch.float64


# ---------------------------------------------------------------- the option in the rules
def _grads(shape, count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [1e-2 * torch.randn(*shape, generator=gen) for _ in range(count)]


@pytest.mark.parametrize("ns_dtype,iterate", [("bf16", torch.bfloat16), ("fp32", torch.float32),
                                              (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("cls,steps", [(lrgrad.Muon, 5), (lrgrad.HybridAuON, 1)])
def test_step_uses_the_chosen_precision(cls, steps, ns_dtype, iterate, monkeypatch):
    """A step's Newton–Schulz equals the reference run with iterates in the chosen dtype, bit for bit."""
    monkeypatch.setenv("LRGRAD_KERNELS", "torch")
    p = torch.nn.Parameter(torch.randn(24, 40))
    opt = cls([p], lr=0.1, ns_dtype=ns_dtype, momentum=0.0, nesterov=False)
    assert opt.param_groups[0]["ns_dtype"] == ns_dtype
    seen = []
    import lrgrad.rules.auon as auon_module
    import lrgrad.rules.muon as muon_module
    module = muon_module if cls is lrgrad.Muon else auon_module
    original = module.newton_schulz

    def spy(x, **kwargs):
        out = original(x, **kwargs)
        seen.append(kwargs["dtype"])
        assert torch.equal(out, newton_schulz_reference(x, steps=steps, dtype=iterate))
        return out

    monkeypatch.setattr(module, "newton_schulz", spy)
    (g,) = _grads((24, 40), 1)
    p.grad = g
    opt.step()
    assert seen == [iterate]


@pytest.mark.parametrize("native,iterate", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_default_follows_the_hardware_in_muon_and_galore_muon(native, iterate, monkeypatch):
    monkeypatch.setattr(precision, "native_bf16_matmul", lambda device: native)
    monkeypatch.setenv("LRGRAD_KERNELS", "torch")
    import lrgrad.rules.muon as muon_module

    seen = []
    original = muon_module.newton_schulz
    monkeypatch.setattr(muon_module, "newton_schulz", lambda x, **kw: (seen.append(kw["dtype"]), original(x, **kw))[1])
    for opt_cls, kwargs in ((lrgrad.Muon, {}), (lrgrad.GaLoreMuon, {"rank": 4})):
        p = torch.nn.Parameter(torch.randn(16, 24))
        opt = opt_cls([p], lr=0.02, **kwargs)
        assert opt.defaults["ns_dtype"] == "auto" and opt.param_groups[0]["ns_dtype"] == "auto"
        p.grad = torch.randn(16, 24)
        opt.step()
    assert seen == [iterate, iterate]


@pytest.mark.parametrize("ns_dtype", ["bf16", "fp32"])
def test_muon_direction_against_the_polar_oracle(ns_dtype, monkeypatch):
    """First step (momentum 0.95, Nesterov: V = (1 − β²)·g): −lr·√max(1, m/n)·NS₅(g) to the dtype's accuracy."""
    monkeypatch.setenv("LRGRAD_KERNELS", "torch")
    shape = (64, 40)
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = lrgrad.Muon([p], lr=1.0, ns_dtype=ns_dtype)
    (g,) = _grads(shape, 1, seed=3)
    p.grad = g
    opt.step()
    exact = -math.sqrt(64 / 40) * polar_map(g, 5)
    err = relative_error(p.detach(), exact)
    assert err <= (4 * 5 * 2**-8 if ns_dtype == "bf16" else 5 * 64 * 2**-24), err


@pytest.mark.parametrize("cls", [lrgrad.Muon, lrgrad.HybridAuON, lrgrad.GaLoreMuon])
@pytest.mark.parametrize("value", ["fp32", "bf16", torch.bfloat16])
def test_ns_dtype_round_trips_through_a_state_dict(cls, value, monkeypatch):
    """Saved (weights_only) and loaded into an optimizer built with the default: the group keeps the
    saved value, and the two optimizers then step bit-identically."""
    monkeypatch.setenv("LRGRAD_KERNELS", "torch")
    extra = {"rank": 4, "update_proj_gap": 3} if cls is lrgrad.GaLoreMuon else {}
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(12, 20))
    opt = cls([p], lr=0.02, ns_dtype=value, **extra)
    grads = _grads((12, 20), 6, seed=5)
    for g in grads[:3]:
        p.grad = g
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    q = torch.nn.Parameter(p.detach().clone())
    other = cls([q], lr=0.02, **extra)
    other.load_state_dict(saved)
    assert other.param_groups[0]["ns_dtype"] == value
    for g in grads[3:]:
        p.grad, q.grad = g, g.clone()
        opt.step()
        other.step()
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [lrgrad.Muon, lrgrad.HybridAuON, lrgrad.GaLoreMuon])
@pytest.mark.parametrize("value,error", [("fp16", ValueError), ("float32", ValueError), (torch.float16, ValueError),
                                         (32, TypeError), (None, TypeError)])
def test_bad_ns_dtype_names_the_parameter(cls, value, error):
    p = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(error, match="ns_dtype"):
        cls([p], lr=0.02, ns_dtype=value)
