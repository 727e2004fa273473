"""Newton–Schulz with bf16 and fp32 iterates (``dtype=``) against the fp64 polar-map oracle, on the
torch path and on the Triton kernel (interpreter), each at its own precision's tolerance.

Tolerances (relative Frobenius error against ``polar_oracle.polar_map``):

* fp32 iterates: every product is an fp32 GEMM whose sums have up to k terms, so the classical
  bound is ``steps · k · u32`` (measured: about 1/80 of it on these matrices);
* bf16 iterates: each step rounds X, A = XXᵀ, B and the new X to bf16, products accumulate in
  fp32; the error is a few bf16 roundings per step (the quintic amplifies a perturbation by at most
  ~4 per step), ``4 · steps · u_bf16`` (measured: 1/5 of it). It must also *exceed* u_bf16 / 8 —
  an fp32 computation is 1000× closer — so a dropped ``dtype`` cannot pass.
"""

from __future__ import annotations

import sys

import pytest
import torch
from kernel_tolerances import U32, unit_roundoff
from polar_oracle import polar_map, relative_error, scalar_map
from spectra import spectrum_matrix

from lrgrad.kernels import newton_schulz
from lrgrad.kernels.newton_schulz import newton_schulz_reference

SHAPES = [(48, 112), (112, 48), (64, 64)]  # wide, tall, square
DTYPES = [torch.float32, torch.bfloat16]


def tolerance(dtype: torch.dtype, steps: int, k: int) -> float:
    if dtype == torch.float32:
        return steps * k * U32
    return 4 * steps * unit_roundoff(torch.bfloat16)


def gradient(shape, seed=0) -> torch.Tensor:
    """A gradient's spectrum (σᵢ ∝ 1/i) in a random subspace, fp32, at a gradient's scale."""
    return 1e-3 * spectrum_matrix(*shape, decay=1.0, seed=seed)


def check_against_oracle(got: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, steps: int) -> None:
    assert got.dtype == x.dtype and got.shape == x.shape
    err = relative_error(got, polar_map(x, steps))
    assert err <= tolerance(dtype, steps, max(x.shape)), (dtype, err)
    if dtype == torch.bfloat16:
        assert err >= unit_roundoff(torch.bfloat16) / 8, f"bf16 iterates were not used (error {err:.2e})"
    # the singular values stay in the exact map's band, widened by the same tolerance
    band = scalar_map(torch.linalg.svdvals(x.double()), steps)
    sv = torch.linalg.svdvals(got.double())
    slack = 2 * tolerance(dtype, steps, max(x.shape))
    assert band.min() - slack <= sv.min() and sv.max() <= band.max() + slack


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("steps", [5, 1])  # Muon, Hybrid-AuON
def test_torch_path_matches_the_polar_oracle(shape, dtype, steps, monkeypatch):
    monkeypatch.setenv("LRGRAD_KERNELS", "torch")
    x = gradient(shape, seed=sum(shape) + steps)
    got = newton_schulz(x, steps=steps, dtype=dtype)
    check_against_oracle(got, x, dtype, steps)
    assert torch.equal(got, newton_schulz_reference(x, steps=steps, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(48, 112), (112, 48), (33, 33)])
def test_triton_kernel_matches_the_polar_oracle(shape, dtype, forbid):
    """The interpreter runs the kernel (the reference is forbidden) with iterates in ``dtype``."""
    x = gradient(shape, seed=7 + sum(shape))
    forbid(sys.modules["lrgrad.kernels.newton_schulz"], "newton_schulz_reference")
    got = newton_schulz(x, steps=5, dtype=dtype)
    check_against_oracle(got, x, dtype, 5)


def test_triton_kernel_stores_iterates_in_the_requested_dtype(monkeypatch):
    """The kernel's buffers are bf16 when asked (not an fp32 computation cast at the end)."""
    from lrgrad.kernels import triton_matmul, triton_newton_schulz

    seen = []
    original = triton_matmul.syrk

    def spy(a, out, *args, **kwargs):
        seen.append((a.dtype, out.dtype))
        return original(a, out, *args, **kwargs)

    monkeypatch.setattr(triton_newton_schulz, "syrk", spy)
    x = gradient((20, 36))
    newton_schulz(x, steps=1, dtype=torch.bfloat16)
    assert seen and all(d == (torch.bfloat16, torch.bfloat16) for d in seen)
    seen.clear()
    newton_schulz(x, steps=1, dtype=torch.float32)
    assert seen and all(d == (torch.float32, torch.float32) for d in seen)


def test_default_dtype_is_the_input_dtype(monkeypatch):
    monkeypatch.setenv("LRGRAD_KERNELS", "torch")
    x = gradient((24, 40))
    assert torch.equal(newton_schulz(x), newton_schulz_reference(x, dtype=torch.float32))
    assert torch.equal(newton_schulz(x.double()), newton_schulz_reference(x.double(), dtype=torch.float64))


def test_bad_dtype_names_the_parameter():
    with pytest.raises(ValueError, match="dtype"):
        newton_schulz(torch.randn(4, 6), dtype=torch.int32)


def test_galore_muon_bf16_triton_backend_follows_torch_backend(monkeypatch):
    """GaLoreMuon with bf16 iterates: the Triton kernel (interpreter) and the torch path give the same two
    steps to the bf16 Newton–Schulz tolerance: |Δp| ≤ 2 paths · steps · lr · 4·5·u_bf16 · max|O| · Muon's
    shape factor (max|O| ≤ 1.25; the factor of an m×r or r×n low-rank R is at most √(max(m, n)/r))."""
    import copy

    from tiny_model import TinyLM, train

    import lrgrad
    from lrgrad.kernels import triton_newton_schulz

    torch.manual_seed(0)
    model = TinyLM()
    twin = copy.deepcopy(model)
    calls = []
    kernel = triton_newton_schulz.newton_schulz
    monkeypatch.setattr(triton_newton_schulz, "newton_schulz",
                        lambda *a, **k: (calls.append(k.get("dtype")), kernel(*a, **k))[1])

    def run(m, backend):
        monkeypatch.setenv("LRGRAD_KERNELS", backend)
        opt = lrgrad.GaLoreMuon(lrgrad.param_groups(m, rank=8, update_proj_gap=2), lr=1e-2, ns_dtype="bf16")
        return train(m, opt, steps=2)

    losses_torch = run(model, "torch")
    assert not calls
    losses_triton = run(twin, "triton")
    assert calls and set(calls) == {torch.bfloat16}, "the Triton kernel must have run with bf16 iterates"
    assert losses_triton == pytest.approx(losses_torch, rel=1e-3)
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        factor = (max(a.shape) / 8) ** 0.5 if a.dim() == 2 else 1.0
        bound = 2 * 2 * 1e-2 * 4 * 5 * unit_roundoff(torch.bfloat16) * 1.25 * factor
        assert (a - b).abs().max().item() <= bound, n
