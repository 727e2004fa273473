"""Every randomized/sketch refresh succeeds and moves the basis, on both sides, at every refresh.

A refresh that raises is caught by :func:`lrgrad.projectors.base.guarded_basis`: the old basis is
kept and ``proj_failures`` counts it, so training goes on in a stale subspace and every loss-based
test still passes. The left side (wide matrices) is the fragile one: it is cold-started each time
(its previous basis lives in the m space) while the right side is warm-started from the previous
basis, so a refresh that passes the previous basis to the wrong side fails from the second refresh
on. Here each refresh must count no failure, must replace the basis, and must capture nearly the
top-r energy of an independent oracle (fp64 ``torch.linalg.svd`` of the same gradient). The FSDP2
counterpart (the default ``svd_sharded="sketch"`` on row shards) is
``tests/distributed/test_fsdp2.py::test_fsdp2_sketch_refreshes_succeed_and_move_on_both_sides``."""

from __future__ import annotations

import pytest
import torch
from spectra import captured_energy, spectrum_matrix

import lrgrad
from lrgrad.projectors.svd import top_singular_basis

REFRESHES, RANK = 4, 6
#: (shape, proj_type, side): wide matrices project the left side under "std", the larger side under
#: "reverse_std" (a tall matrix's left side, a wide one's right side)
SHAPES = [((24, 60), "std", "left"), ((60, 24), "std", "right"), ((60, 24), "reverse_std", "left"),
          ((24, 60), "reverse_std", "right")]
#: the sketch's captured energy against the exact top-r energy: one pass (power_iters=0) on a spectrum
#: falling as i^-1 loses a few percent; a refresh left stale by a failure captures ~1/3 (a new subspace)
MIN_ENERGY = {0: 0.9, 1: 0.99}


@pytest.mark.parametrize("shape, proj_type, side", SHAPES, ids=["left", "right", "left-larger", "right-larger"])
@pytest.mark.parametrize("preset, options", [
    ("GaLoreAdamW", {"svd": "randomized"}),                          # the one-process randomized SVD
    ("GaLoreAdamW", {"svd": "randomized", "svd_power_iters": 1}),
    ("GaLoreAdamW8bit", {"svd": "randomized"}),
    ("QGaLoreAdamW", {"svd": "randomized", "adaptive_gap": False}),  # warm-started from its INT4 basis
], ids=["galore", "galore-power1", "galore8bit", "qgalore"])
def test_every_sketch_refresh_succeeds_and_moves_the_basis(preset, options, shape, proj_type, side):
    w = torch.nn.Parameter(torch.zeros(*shape))
    opt = getattr(lrgrad, preset)([w], lr=1e-2, rank=RANK, update_proj_gap=1, proj_type=proj_type, **options)
    projector = opt.projector_for(w, opt.param_groups[0])
    assert projector.side == side
    previous = None
    for k in range(REFRESHES):
        g = spectrum_matrix(*shape, 1.0, seed=k)  # a new dominant subspace each refresh
        w.grad = g
        opt.step()
        state = opt.state[w]
        assert state["proj_failures"] == 0, f"refresh {k + 1} failed"
        assert state["proj_refreshes"] == k + 1
        basis = projector.basis(state).clone()
        if previous is not None:
            assert not torch.equal(basis, previous), f"refresh {k + 1} kept the old basis"
        exact = top_singular_basis(g.double(), RANK, side)
        floor = MIN_ENERGY[options.get("svd_power_iters", 0)] * (0.95 if preset == "QGaLoreAdamW" else 1.0)
        assert captured_energy(g, basis, side) >= floor * captured_energy(g, exact, side)
        previous = basis
