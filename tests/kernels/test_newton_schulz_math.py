"""Newton–Schulz (Muon's quintic iteration) and the AuON normalization kernels."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrgrad.kernels import auon_normalize, newton_schulz
from lrgrad.kernels.newton_schulz import MUON_COEFFICIENTS, newton_schulz_reference
from lrgrad.kernels.normalize import auon_normalize_reference

SHAPES = [(64, 24), (24, 64), (40, 40)]  # tall, wide, square


def spread_matrix(m: int, n: int, seed: int, lo: float = 1e-2, hi: float = 1.0):
    """A random m x n matrix with singular values log-spaced over [lo, hi]; returns (X, U, S, V)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    S = torch.logspace(math.log10(lo), math.log10(hi), k, dtype=torch.float64)
    return U @ torch.diag(S) @ V.T, U, S, V


def scalar_iteration(sigma: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
    """What the iteration does to each singular value: p(σ) = aσ + bσ³ + cσ⁵ after Frobenius scaling."""
    a, b, c = MUON_COEFFICIENTS
    s = sigma if eps < 0 else sigma / (torch.linalg.vector_norm(sigma) + eps)  # eps < 0: already normalized
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_singular_values_land_in_the_quintic_band(shape, seed):
    X, U, S, V = spread_matrix(*shape, seed)
    Y = newton_schulz(X)
    sv = torch.linalg.svdvals(Y)
    # The often-quoted band is "about [0.68, 1.13]"; the exact 5-step image of the normalized
    # range σ/‖S‖_F ∈ [3e-3, 1] (a dense scan of the scalar map) is [0.6818, 1.2024].
    scan = scalar_iteration(torch.logspace(math.log10(3e-3), 0, 100_001, dtype=torch.float64), 5, eps=-1.0)
    assert 0.68 <= scan.min() and scan.max() <= 1.21
    assert sv.min() >= scan.min() - 1e-9 and sv.max() <= scan.max() + 1e-9, (sv.min().item(), sv.max().item())
    assert sv.min() >= 0.68 and sv.max() <= 1.21
    assert sv.max() / sv.min() < 1.8  # was 100 on input
    # fp32 input gives the same band
    sv32 = torch.linalg.svdvals(newton_schulz(X.float()))
    torch.testing.assert_close(sv32.double(), sv, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_singular_vectors_are_the_input_ones(shape):
    """Y = U p(S) Vᵀ exactly: Uᵀ Y V is diagonal with the scalar map of S on it."""
    X, U, S, V = spread_matrix(*shape, seed=7)
    Y = newton_schulz(X)
    D = U.T @ Y @ V
    expected = scalar_iteration(S, 5)
    torch.testing.assert_close(D, torch.diag(expected), rtol=1e-9, atol=1e-9)
    # and the output is aligned with the polar factor U Vᵀ (cosine close to 1)
    polar = U @ V.T
    cosine = (Y * polar).sum() / (Y.norm() * polar.norm())
    assert cosine > 0.98, cosine.item()
    # nothing leaks outside the input's column/row spaces
    k = min(shape)
    assert torch.linalg.matrix_rank(Y, atol=1e-6) == k


def test_transpose_equivariance_and_batch():
    X, *_ = spread_matrix(48, 20, seed=3)
    torch.testing.assert_close(newton_schulz(X.T), newton_schulz(X).T, rtol=1e-10, atol=1e-12)
    batch = torch.stack([spread_matrix(20, 30, seed=s)[0] for s in range(3)])
    out = newton_schulz(batch)
    for i in range(3):
        torch.testing.assert_close(out[i], newton_schulz(batch[i]), rtol=1e-10, atol=1e-12)


def test_input_untouched_scale_free_and_steps_zero():
    X, *_ = spread_matrix(30, 20, seed=4)
    before = X.clone()
    Y = newton_schulz(X)
    assert torch.equal(X, before)
    torch.testing.assert_close(newton_schulz(1e4 * X), Y, rtol=1e-4, atol=1e-6)  # eps=1e-7 vs ‖X‖≈1
    torch.testing.assert_close(newton_schulz(X, steps=0), X / (X.norm() + 1e-7))
    assert torch.equal(newton_schulz(X, steps=3), newton_schulz_reference(X, steps=3))


def test_zero_matrix_stays_zero():
    assert torch.equal(newton_schulz(torch.zeros(5, 7)), torch.zeros(5, 7))


def test_newton_schulz_bad_input():
    with pytest.raises(ValueError, match="x"):
        newton_schulz(torch.randn(5))
    with pytest.raises(ValueError, match="steps"):
        newton_schulz(torch.randn(4, 4), steps=-1)
    with pytest.raises(TypeError, match="steps"):
        newton_schulz(torch.randn(4, 4), steps=2.0)
    with pytest.raises(ValueError, match="coefficients"):
        newton_schulz(torch.randn(4, 4), coefficients=(1.0, 2.0))
    with pytest.raises(TypeError, match="x"):
        newton_schulz([[1.0, 2.0]])


# ---------------------------------------------------------------- AuON normalization
def recovered_rms(m: torch.Tensor, u: torch.Tensor, eps: float = 1e-7, rms_eps: float = 1e-8) -> float:
    """rms from the kernel's output: ‖U‖ = ‖X‖ / (rms + rms_eps)."""
    x_norm = m.norm() / (m.norm() + eps)
    return (x_norm / u.norm()).item() - rms_eps


def auon_by_hand(m: torch.Tensor) -> torch.Tensor:
    x = m / (m.norm() + 1e-7)
    rms = torch.sqrt(torch.mean(torch.cosh(x) ** 2))
    return x / (rms + 1e-8)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 24), cols=st.integers(1, 24), log_scale=st.floats(-6, 6),
    seed=st.integers(0, 2**16), kind=st.sampled_from(["gauss", "spike", "uniform", "heavy"]),
)
def test_auon_rms_bound_holds_for_every_input(rows, cols, log_scale, seed, kind):
    gen = torch.Generator().manual_seed(seed)
    n = rows * cols
    if kind == "gauss":
        m = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    elif kind == "spike":  # all the mass on one entry: the upper bound is attained
        m = torch.zeros(rows, cols, dtype=torch.float64)
        m.view(-1)[seed % n] = -1.0 if seed % 2 else 1.0
    elif kind == "uniform":
        m = torch.ones(rows, cols, dtype=torch.float64)
    else:
        m = torch.randn(rows, cols, generator=gen, dtype=torch.float64) ** 5
    m = m * 10.0**log_scale
    u = auon_normalize(m)
    rms = recovered_rms(m, u)
    upper = math.sqrt(1 + math.sinh(1.0) ** 2 / n)
    assert 1 - 1e-9 <= rms <= upper + 1e-9, (rms, upper)
    if kind == "spike":
        size = 10.0**log_scale
        x = size / (size + 1e-7)  # → 1, the bound, as the eps becomes negligible
        assert rms == pytest.approx(math.sqrt((math.cosh(x) ** 2 + n - 1) / n), rel=1e-9)
        if size >= 1e-2:
            assert rms == pytest.approx(upper, rel=1e-5)
    torch.testing.assert_close(u, auon_by_hand(m), rtol=1e-10, atol=1e-12)
    # unit-order Frobenius norm: ‖U‖ = ‖X‖/rms ∈ [‖X‖/upper, 1], ‖X‖ = ‖M‖/(‖M‖ + eps) ≈ 1
    x_norm = (m.norm() / (m.norm() + 1e-7)).item()
    assert x_norm / upper * (1 - 1e-7) <= u.norm().item() <= 1 + 1e-9


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_auon_is_scale_invariant(scale):
    m = torch.randn(32, 48, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(auon_normalize(scale * m), auon_normalize(m), rtol=1e-5, atol=1e-7)


def test_auon_kernel_entry_matches_reference_and_is_pure():
    m = torch.randn(3, 4, 5)  # any shape: all elements form one matrix
    before = m.clone()
    out = auon_normalize(m, eps=1e-6, rms_eps=1e-5)
    assert torch.equal(m, before)
    torch.testing.assert_close(out, auon_normalize_reference(m, eps=1e-6, rms_eps=1e-5))
    assert torch.equal(auon_normalize(torch.zeros(4, 4)), torch.zeros(4, 4))


def test_auon_kernel_bad_input():
    with pytest.raises(ValueError, match="m"):
        auon_normalize(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="rms_eps"):
        auon_normalize(torch.ones(2, 2), rms_eps=-1.0)
    with pytest.raises(TypeError, match="m"):
        auon_normalize(3.0)
