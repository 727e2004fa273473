"""``svd="gram"`` (the fallback of the default ``"warm"``): the top-r
eigenvectors of the projected side's Gram matrix, against ``torch.linalg.svd``; and which param
groups get galore-torch's exact SVD instead."""

from __future__ import annotations

import pytest
import torch
from spectra import captured_energy, spectrum_matrix
from state_utils import assert_rerun_and_resume_bit_identical

import lrgrad
from lrgrad.projectors.svd import canonical_signs, gram_top_basis, top_singular_basis


@pytest.mark.parametrize("shape, side", [((96, 64), "right"), ((64, 96), "left"), ((64, 64), "right")])
@pytest.mark.parametrize("decay", [0.3, 1.0, 2.0])
def test_gram_basis_captures_the_svd_energy(shape, side, decay):
    """fp32 Gram eigenvectors keep the exact top-r energy to 1e-6 relative, on flat and steep spectra
    (on the steep one the fp32 Gram cannot resolve the tail directions: they carry < eps of it)."""
    g = spectrum_matrix(*shape, decay)
    rank = 16
    gram = gram_top_basis(g, rank, side)
    exact = top_singular_basis(g.double(), rank, side)
    assert gram.shape == exact.shape and gram.dtype == torch.float32 and gram.is_contiguous()
    assert captured_energy(g, gram, side) >= (1 - 1e-6) * captured_energy(g, exact, side)
    # orthonormal basis vectors
    gram64 = gram.double()
    eye = gram64 @ gram64.T if side == "right" else gram64.T @ gram64
    torch.testing.assert_close(eye, torch.eye(rank, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_gram_basis_is_the_svd_subspace_where_fp32_resolves_it(side):
    """With σ_r² far above eps·σ₁² (a flat spectrum) the subspace equals the SVD's to 1e-4, and each
    vector equals the singular vector up to its sign; the sign is canonical (largest entry positive)."""
    shape = (80, 48) if side == "right" else (48, 80)
    g = spectrum_matrix(*shape, decay=0.3, seed=3)
    rank = 12
    gram = gram_top_basis(g, rank, side).double()
    exact = top_singular_basis(g.double(), rank, side)
    proj = (lambda b: b.T @ b) if side == "right" else (lambda b: b @ b.T)
    torch.testing.assert_close(proj(gram), proj(exact), atol=1e-4, rtol=0)
    rows = gram if side == "right" else gram.T
    exact_rows = exact if side == "right" else exact.T
    for v, e in zip(rows, exact_rows):
        assert abs(float(v @ e)) == pytest.approx(1.0, abs=1e-5)
        assert v[v.abs().argmax()] > 0


def test_gram_basis_in_fp64_matches_the_svd_to_fp64_precision():
    g = spectrum_matrix(60, 40, decay=1.0, dtype=torch.float64)
    gram = gram_top_basis(g, 8, "right")
    exact = top_singular_basis(g, 8, "right")
    assert gram.dtype == torch.float64
    torch.testing.assert_close(gram.T @ gram, exact.T @ exact, atol=1e-9, rtol=0)


def test_larger_projected_side_uses_the_exact_svd(monkeypatch):
    """reverse_std projects the larger side: its Gram matrix would be the larger square, so the exact
    SVD runs instead (torch.linalg.eigh is never called), its vectors signed canonically like every
    other refresh's (not LAPACK's signs: mixing methods under moment_policy="keep" needs one convention)."""
    def no_eigh(*args, **kwargs):
        raise AssertionError("eigh called on the larger side")

    g = torch.randn(50, 20)
    monkeypatch.setattr(torch.linalg, "eigh", no_eigh)
    exact = top_singular_basis(g, 5, "left")
    torch.testing.assert_close(gram_top_basis(g, 5, "left"), canonical_signs(exact.T).T)


def test_gram_refresh_is_bit_identical_on_a_rerun_and_after_a_resume():
    torch.manual_seed(0)
    grads = [torch.randn(48, 32) for _ in range(6)]
    assert_rerun_and_resume_bit_identical(
        lambda params: lrgrad.GaLoreAdamW(params, lr=1e-2, rank=6, update_proj_gap=2, svd="gram"), grads)


# ---------------------------------------------------------------- which groups get which SVD
def _svd_of(opt: torch.optim.Optimizer) -> list[str]:
    return [g["svd"] for g in opt.param_groups]


def test_default_refresh_is_warm_and_galore_torch_groups_get_the_exact_svd():
    w, b = torch.nn.Parameter(torch.randn(32, 16)), torch.nn.Parameter(torch.randn(16))
    assert _svd_of(lrgrad.GaLoreAdamW([w], rank=4)) == ["warm"]
    assert _svd_of(lrgrad.GaLoreAdamW([{"params": [w], "rank": 4, "scale": 0.25}])) == ["warm"]

    def galore_torch(**extra):  # torch.optim fills a group dict in place, so a fresh one each time
        return {"params": [w], "rank": 4, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std", **extra}

    assert _svd_of(lrgrad.GaLoreAdamW([galore_torch(), {"params": [b]}])) == ["exact", "warm"]
    # an explicit choice wins, in the group or in the constructor
    assert _svd_of(lrgrad.GaLoreAdamW([galore_torch(svd="randomized")])) == ["randomized"]
    assert _svd_of(lrgrad.GaLoreAdamW([galore_torch()], svd="gram")) == ["gram"]
    # Q-GaLore runs the SVD projector too; projectors without an svd option are untouched
    assert _svd_of(lrgrad.QGaLoreAdamW([galore_torch()])) == ["exact"]
    assert "svd" not in lrgrad.DCTAdamW([galore_torch()]).param_groups[0]
    # a group added later follows the same rule
    opt = lrgrad.GaLoreAdamW([w], rank=4)
    opt.add_param_group(galore_torch(params=[torch.nn.Parameter(torch.randn(32, 16))]))
    assert _svd_of(opt) == ["warm", "exact"]


def test_bad_svd_is_rejected_by_name():
    w = torch.nn.Parameter(torch.randn(32, 16))
    with pytest.raises(ValueError, match="svd"):
        lrgrad.GaLoreAdamW([w], rank=4, svd="eig")
