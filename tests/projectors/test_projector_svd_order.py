"""The order contract of the SVD-family refreshes: every method returns its basis vectors in
descending order of the energy they capture (``‖G vᵢ‖²`` = σᵢ²), with :func:`canonical_signs`
(``svd="exact"`` alone keeps LAPACK's signs, galore-torch's). Under ``moment_policy="keep"`` the
rule's moments are carried across a refresh by position (and sign), so a method that returned the
same subspace in another order would pair each moment with another direction: invisible while one
method runs, a different trajectory as soon as methods mix (a Gram refresh, then warm ones).

The oracle is fp64 ``torch.linalg.svd`` of the same gradient: each returned vector's captured
energy against the matching σᵢ²; the sign convention is checked directly."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from spectra import spectrum_matrix

import lrgrad
from lrgrad.dtensor import LocalContext
from lrgrad.projectors.online_pca import OnlinePCAProjector
from lrgrad.projectors.qgalore import QGaLoreProjector
from lrgrad.projectors.svd import SVD_METHODS, SVDProjector

RANK = 6
#: (shape, side): the smaller side projected (std) on tall and wide matrices, and the larger side
#: (reverse_std: the Gram path's exact-SVD fallback)
CASES = [((48, 32), "right"), ((32, 48), "left"), ((32, 48), "right"), ((48, 32), "left")]


def _gradient(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """A steep spectrum (σᵢ = i^-1.5): neighbouring σᵢ² at least 1.1x apart among the top r + 1."""
    return spectrum_matrix(*shape, 1.5, seed=seed)


def _per_vector_energy(g: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """‖G vᵢ‖² for each basis vector (rows of an r x n basis, columns of an m x r one), fp64."""
    g, basis = g.double(), basis.double()
    low = g @ basis.T if side == "right" else basis.T @ g  # m x r or r x n
    return low.square().sum(dim=0 if side == "right" else 1)


def assert_ordered_like_the_svd(g: torch.Tensor, basis: torch.Tensor, side: str, rtol: float) -> None:
    """Vector i captures σᵢ² (fp64 SVD) to ``rtol``: hence descending, one vector per direction."""
    sigma_sq = torch.linalg.svdvals(g.double())[:RANK].square()
    energy = _per_vector_energy(g, basis, side)
    assert bool((energy[:-1] > energy[1:]).all()), f"not in descending order: {energy.tolist()}"
    torch.testing.assert_close(energy, sigma_sq, rtol=rtol, atol=0)


def assert_canonical_signs(basis: torch.Tensor, side: str) -> None:
    """Each vector's largest-magnitude entry is positive (one sign convention for every method)."""
    rows = basis if side == "right" else basis.T
    assert bool((rows.gather(1, rows.abs().argmax(1, keepdim=True)) > 0).all())


def _svd_projector(side: str, **options: Any) -> SVDProjector:
    return SVDProjector(RANK, 1, side, {**SVDProjector.option_defaults, **options})


def _state() -> dict[str, Any]:
    state: dict[str, Any] = {}
    _svd_projector("right").init_state(state, (1, 1), seed=7)
    return state


#: the accuracy of each method's per-vector energy on these spectra (warm: its tolerance; the one-pass
#: randomized sketch: the Nyström approximation's error on the smallest of the r vectors, up to 21% on
#: the larger side). A reversed or shuffled order is off by far more: σ₁²/σ₆² = 6³ here.
RTOL = {"warm": 1e-3, "gram": 1e-4, "exact": 1e-5, "randomized": 0.3}


@pytest.mark.parametrize("shape, side", CASES)
@pytest.mark.parametrize("method", SVD_METHODS)
def test_every_refresh_method_returns_vectors_by_descending_energy(method, shape, side):
    """The first refresh (cold) and a later one (warm-started from the previous basis where the
    method does that), through the projector's own ``refresh``."""
    projector = _svd_projector(side, svd=method)
    state = _state()
    for step, seed in ((1, 1), (2, 2)):
        g = _gradient(shape, seed)
        assert projector.refresh(state, g, step, {}) and state["proj_failures"] == 0
        basis = state["proj_basis"]
        assert_ordered_like_the_svd(g, basis, side, RTOL[method])
        if method != "exact":  # LAPACK's signs, kept for galore-torch parity
            assert_canonical_signs(basis, side)


@pytest.mark.parametrize("shape, side", CASES[:2])
@pytest.mark.parametrize("sharded", ["sketch", "gram"])
def test_the_sharded_refreshes_return_vectors_by_descending_energy(sharded, shape, side):
    """FSDP2's refreshes (``refresh_sharded``; one shard holding every row): the seeded sketch on
    both sides and the all-reduced Gram matrix on the right (the left falls back to all-gathering)."""
    projector = _svd_projector(side, svd_sharded=sharded)
    state = _state()
    g = _gradient(shape, 1)
    result = projector.refresh_sharded(state, g, 1, {}, LocalContext(shape[0]))
    if sharded == "gram" and side == "left":
        assert result is NotImplemented
        return
    assert result is True and state["proj_failures"] == 0
    assert_ordered_like_the_svd(g, state["proj_basis"], side, RTOL["randomized" if sharded == "sketch" else "gram"])
    assert_canonical_signs(state["proj_basis"], side)


@pytest.mark.parametrize("shape, side", CASES[:2])
@pytest.mark.parametrize("pca_init", ["svd", "randomized"])
def test_online_pca_starts_from_vectors_by_descending_energy(pca_init, shape, side):
    projector = OnlinePCAProjector(RANK, 1, side, {**OnlinePCAProjector.option_defaults, "pca_init": pca_init})
    state: dict[str, Any] = {}
    projector.init_state(state, shape, seed=3)
    g = _gradient(shape, 1)
    projector.refresh(state, g, 1, {"lr": 1e-3})
    assert_ordered_like_the_svd(g, state["proj_basis"], side, RTOL["gram" if pca_init == "svd" else "randomized"])
    assert_canonical_signs(state["proj_basis"], side)


@pytest.mark.parametrize("shape, side", CASES[:2])
def test_qgalore_keeps_the_order_through_its_int4_basis(shape, side):
    options = {**SVDProjector.option_defaults, **QGaLoreProjector.option_defaults}
    projector = QGaLoreProjector(RANK, 1, side, options)
    state: dict[str, Any] = {}
    projector.init_state(state, shape, seed=3)
    for step, seed in ((1, 1), (2, 2)):
        g = _gradient(shape, seed)
        assert projector.refresh(state, g, step, {})
        assert_ordered_like_the_svd(g, projector.basis(state), side, 0.3)  # INT4 rounding of the basis


# ---------------------------------------------------------------- mixed methods under moment_policy="keep"
def _run(methods: list[str], shape: tuple[int, int]) -> torch.Tensor:
    """GaLoreAdamW with ``moment_policy="keep"``, a refresh every 2 steps, refresh ``k`` by ``methods[k]``."""
    w = torch.nn.Parameter(torch.zeros(*shape))
    opt = lrgrad.GaLoreAdamW([w], lr=1e-2, rank=RANK, update_proj_gap=2, moment_policy="keep", svd_power_iters=1)
    for t in range(2 * len(methods)):
        if t % 2 == 0:
            opt.param_groups[0]["svd"] = methods[t // 2]
        # the subspace drifts between refreshes (a new dominant spectrum each time) and the gradient between steps
        w.grad = _gradient(shape, t // 2) + 0.01 * spectrum_matrix(*shape, 0.5, seed=100 + t)
        opt.step()
        assert opt.state[w]["proj_failures"] == 0
    return w.detach().clone()


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)], ids=["right", "left"])
@pytest.mark.parametrize("methods", [
    ["gram", "warm", "warm", "gram", "warm", "warm"],
    ["gram", "randomized", "warm", "randomized", "gram", "warm"],
    ["warm"] * 6,
    ["randomized"] * 6,
], ids=["gram-then-warm", "all-three-mixed", "warm-only", "randomized-only"])
def test_mixed_refresh_methods_under_keep_follow_the_gram_run(methods, shape):
    """Six refreshes mixing methods end where the all-Gram run does, to each method's accuracy
    (≤ 1e-3 here; a refresh returning its vectors in another order or sign moves the weights by
    ~0.1, their own size)."""
    reference = _run(["gram"] * 6, shape)
    got = _run(methods, shape)
    assert float(reference.abs().max()) > 0.05
    torch.testing.assert_close(got, reference, rtol=0, atol=3e-3)
