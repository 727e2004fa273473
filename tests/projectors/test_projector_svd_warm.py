"""``svd="warm"`` (the SVD projector's default): every refresh runs a subspace iteration from the
previous basis (the first: from seeded Gaussian columns), checked against ``torch.linalg.svd``'s
captured energy; a refresh that does not converge falls back to the exact Gram eigenvectors."""

from __future__ import annotations

import pytest
import torch
from spectra import captured_energy, spectrum_matrix
from state_utils import assert_rerun_and_resume_bit_identical

import lrgrad
from lrgrad.projectors import svd as svd_module
from lrgrad.projectors.svd import top_singular_basis, warm_top_basis


def warm(g: torch.Tensor, rank: int, side: str, previous: torch.Tensor, tol: float = 1e-3, iters: int = 3):
    return warm_top_basis(g, rank, side, previous, 8, tol, iters, torch.Generator().manual_seed(0))


SHAPES = [((96, 64), "right"), ((64, 96), "left"), ((200, 120), "right"), ((120, 300), "left")]


@pytest.mark.parametrize("shape, side", SHAPES)
@pytest.mark.parametrize("decay", [1.0, 2.0])
@pytest.mark.parametrize("start", ["unrelated", "drifted"])
@pytest.mark.parametrize("tol, iters", [(1e-3, 3), (1e-5, 6)])
def test_warm_basis_captures_the_exact_energy_on_gradient_like_spectra(shape, side, decay, start, tol, iters):
    """Gradients' spectra fall steeply (σ₁/σ_r of 30-200 on LLaMA blocks): from an unrelated previous
    basis (another matrix's) or a drifted one, the warm basis keeps the exact top-r energy to a quarter
    of the tolerance (the stop compares successive energies; the rest of the gap shrinks geometrically)."""
    g = spectrum_matrix(*shape, decay, seed=1)
    rank = 16
    if start == "unrelated":
        previous = top_singular_basis(spectrum_matrix(*shape, decay, seed=2), rank, side)
    else:
        previous = top_singular_basis(g + 0.3 * spectrum_matrix(*shape, 0.5, seed=3), rank, side)
    basis = warm(g, rank, side, previous, tol, iters)
    assert basis is not None
    exact = top_singular_basis(g.double(), rank, side)
    assert basis.shape == exact.shape and basis.dtype == g.dtype and basis.is_contiguous()
    assert captured_energy(g, basis, side) >= (1 - tol / 4) * captured_energy(g, exact, side)
    rows = (basis if side == "right" else basis.T).double()
    torch.testing.assert_close(rows @ rows.T, torch.eye(rank, dtype=torch.float64), atol=1e-5, rtol=0)
    assert bool((rows.gather(1, rows.abs().argmax(1, keepdim=True)) > 0).all())  # canonical signs


@pytest.mark.parametrize("shape, side", SHAPES)
def test_flat_spectrum_is_not_converged_and_returns_none(shape, side):
    """A flat spectrum (decay 0.3) converges slowly: rather than return a basis short of the exact
    energy the iteration gives up (the projector then takes the exact Gram eigenvectors)."""
    g = spectrum_matrix(*shape, 0.3, seed=1)
    previous = top_singular_basis(spectrum_matrix(*shape, 0.3, seed=2), 16, side)
    assert warm(g, 16, side, previous) is None


SCALES = [1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e4, 1e6]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("shape, side", SHAPES[:2])
def test_the_stop_is_relative_so_every_gradient_scale_behaves_the_same(shape, side, scale):
    """Gradients' norms span many decades (1e-6 late in training, 1e6 in a loss spike): the stop
    compares the energy gain with ``tol`` times the energy, so scaling G scales nothing but the
    basis's rounding. A steep spectrum converges at every scale to the exact energy and to the basis
    of the unscaled gradient; a flat one is not converged (``None``: the Gram fallback) at every
    scale. An absolute test would stop at once on a small G (short of the exact energy) and never
    on a large one."""
    rank, tol = 16, 1e-3
    steep = spectrum_matrix(*shape, 1.0, seed=1)
    start = top_singular_basis(spectrum_matrix(*shape, 1.0, seed=2), rank, side)  # unrelated: needs iterating
    reference = warm(steep, rank, side, start, tol)
    basis = warm(steep * scale, rank, side, start, tol)
    assert basis is not None
    exact = top_singular_basis(steep.double(), rank, side)
    assert captured_energy(steep, basis, side) >= (1 - tol / 4) * captured_energy(steep, exact, side)
    torch.testing.assert_close(basis, reference, rtol=0, atol=1e-3)
    flat = spectrum_matrix(*shape, 0.3, seed=1)
    flat_start = top_singular_basis(spectrum_matrix(*shape, 0.3, seed=2), rank, side)
    assert warm(flat * scale, rank, side, flat_start, tol) is None


def test_a_converged_start_stops_after_two_power_steps(monkeypatch):
    """Starting from the exact basis the energy is stationary at once: two power steps (the
    fewest that compare two energies), i.e. five GEMMs with G."""
    g = spectrum_matrix(96, 64, 1.0, seed=4)
    products = []
    real_eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a, *args, **kw: products.append(a.shape) or real_eigh(a))
    basis = warm(g, 16, "right", top_singular_basis(g, 16, "right"))
    assert basis is not None and len(products) == 2
    assert products[0] == (24, 24)  # k x k with k = rank + oversample, never the n x n Gram matrix


def test_tolerance_zero_runs_to_the_cap_and_is_not_converged():
    """``tol=0`` asks for an exactly stationary energy, which fp32 rounding does not give within a
    few steps from an unrelated start: the cap is honoured and ``None`` returned."""
    g = spectrum_matrix(200, 120, 1.0, seed=5)
    previous = top_singular_basis(spectrum_matrix(200, 120, 1.0, seed=6), 16, "right")
    assert warm(g, 16, "right", previous, tol=0.0, iters=2) is None


# ---------------------------------------------------------------- the projector around it
def _count_gram(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = svd_module.gram_top_basis
    monkeypatch.setattr(svd_module, "gram_top_basis", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_every_refresh_iterates_and_only_a_flat_gradient_falls_back_to_gram(monkeypatch):
    """The first refresh starts from seeded Gaussian columns, the later ones from the previous basis;
    steep (gradient-like) spectra converge without the Gram eigh, a flat one falls back to it."""
    calls = _count_gram(monkeypatch)
    w = torch.nn.Parameter(torch.zeros(96, 64))
    opt = lrgrad.GaLoreAdamW([w], lr=1e-2, rank=16, update_proj_gap=1)
    for s in range(3):
        g = spectrum_matrix(96, 64, 1.5, seed=s)
        w.grad = g
        opt.step()
        basis = opt.state[w]["proj_basis"]
        exact = top_singular_basis(g.double(), 16, "right")
        assert captured_energy(g, basis, "right") >= (1 - 2.5e-4) * captured_energy(g, exact, "right")
    assert len(calls) == 0  # all three refreshes (the first included) converged
    w.grad = spectrum_matrix(96, 64, 0.3, seed=9)
    opt.step()
    assert len(calls) == 1  # not converged: the exact fallback
    assert opt.state[w]["proj_failures"] == 0 and opt.state[w]["proj_refreshes"] == 4


def test_a_flat_first_gradient_falls_back_to_the_gram_basis(monkeypatch):
    calls = _count_gram(monkeypatch)
    w = torch.nn.Parameter(torch.zeros(96, 64))
    opt = lrgrad.GaLoreAdamW([w], lr=1e-2, rank=16, update_proj_gap=1)
    w.grad = spectrum_matrix(96, 64, 0.3, seed=9)
    opt.step()
    assert len(calls) == 1 and opt.state[w]["proj_refreshes"] == 1


@pytest.mark.parametrize("shape, side", SHAPES)
def test_cold_start_from_gaussian_columns_captures_the_exact_energy(shape, side):
    """No previous basis (the first refresh): the same iteration from r + oversample seeded columns."""
    g = spectrum_matrix(*shape, 1.0, seed=1)
    basis = warm(g, 16, side, None)
    assert basis is not None
    exact = top_singular_basis(g.double(), 16, side)
    assert captured_energy(g, basis, side) >= (1 - 2.5e-4) * captured_energy(g, exact, side)


def test_explicit_gram_never_iterates(monkeypatch):
    monkeypatch.setattr(svd_module, "warm_top_basis", lambda *a, **k: pytest.fail("warm iteration ran"))
    w = torch.nn.Parameter(torch.zeros(48, 32))
    opt = lrgrad.GaLoreAdamW([w], lr=1e-2, rank=6, update_proj_gap=1, svd="gram")
    for s in range(3):
        w.grad = spectrum_matrix(48, 32, 1.0, seed=s)
        opt.step()


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_warm_refresh_on_every_side_is_bit_identical_on_a_rerun_and_after_a_resume(proj_type):
    """The oversampling columns come from the (param seed, step) generator, so a rerun and a resumed
    run give the same weights bit for bit, on either side (reverse_std: the larger one)."""
    grads = [spectrum_matrix(48, 32, 1.0, seed=s) for s in range(6)]
    opt = assert_rerun_and_resume_bit_identical(
        lambda params: lrgrad.GaLoreAdamW(params, lr=1e-2, rank=6, update_proj_gap=2, proj_type=proj_type), grads)
    group = opt.param_groups[0]
    assert group["svd"] == "warm" and opt.state[group["params"][0]]["proj_refreshes"] == 3


def test_qgalore_warm_starts_from_its_dequantized_int4_basis():
    """Q-GaLore's previous basis is INT4 codes: the iteration starts from the dequantized (not quite
    orthonormal) basis and still reaches the exact energy, up to the new basis's INT4 rounding."""
    w = torch.nn.Parameter(torch.zeros(96, 64))
    opt = lrgrad.QGaLoreAdamW([w], lr=1e-2, rank=16, update_proj_gap=1, adaptive_gap=False)
    for s in range(3):
        g = spectrum_matrix(96, 64, 1.5, seed=s)
        w.grad = g
        opt.step()
    projector = opt.projector_for(w, opt.param_groups[0])
    basis = projector.basis(opt.state[w])
    exact = top_singular_basis(g.double(), 16, "right")
    assert captured_energy(g, basis, "right") >= 0.99 * captured_energy(g, exact, "right")


@pytest.mark.parametrize(
    "key, value, error",
    [("svd_warm_iters", 1, ValueError), ("svd_warm_iters", 2.5, TypeError), ("svd_warm_tol", -1e-3, ValueError),
     ("svd_warm_tol", float("nan"), ValueError), ("svd_warm_tol", "1e-3", TypeError), ("svd", "warmest", ValueError)],
)
def test_bad_warm_options_are_rejected_by_name(key, value, error):
    w = torch.nn.Parameter(torch.randn(32, 16))
    with pytest.raises(error, match=key):
        lrgrad.GaLoreAdamW([w], rank=4, **{key: value})
