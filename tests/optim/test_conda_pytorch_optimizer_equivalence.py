"""CondaAdamW against the reference package ``pytorch-optimizer`` (its ``Conda``, v4.1), in float64.

Both optimizers see the same gradients of a least-squares loss that depends on the weights and are
compared weight for weight after every step, over 4 refreshes of the momentum's basis (gap 3: steps 1,
3, 6, 9, 12), for a tall (projected from the right) and a wide (from the left) matrix.

The reference's ``Conda`` builds its projector with ``rank=None`` (every singular vector: a rotation).
lrgrad projects a matrix only for ``rank < min(m, n)`` (at ``rank >= min(m, n)`` a param runs its rule
full-rank), so the test gives the reference the same rank-r projector lrgrad uses - its own
``GaLoreProjector(rank=r)`` and an r-sized second moment, put in its state before the first step (the
reference's code path is otherwise unchanged). Where lrgrad deliberately differs, and how the test puts
both on common ground:

* **eps**: lrgrad puts Adam's ``eps`` where ``torch.optim.AdamW`` does; the reference adds it to ``√v``
  before the bias correction. Equal for ``eps=0`` (used here).
* **weight decay**: lrgrad decays before the step (torch AdamW's order); the reference decays the
  updated weight. Equal for ``weight_decay=0`` (used here).
* **SVD precision**: the reference takes the SVD of a float64 momentum in float32
  (``GaLoreProjector.get_orthogonal_matrix`` casts every non-fp32 input to fp32); lrgrad computes it in
  the compute dtype. The equality test rounds lrgrad's SVD input to fp32 the same way (so the bases are
  the same numbers) and compares the rest at 1e-12; unpatched, the two agree to the fp32 SVD's ~1e-6.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from state_utils import least_squares_problem, step_side_by_side

import lrgrad

STEPS, GAP, RANK, LR, SCALE, BETAS = 12, 3, 4, 0.05, 1.7, (0.9, 0.999)
SHAPES = ((24, 10), (9, 26))  # tall: right side (R is m×r); wide: left side (R is r×n)


def _reference():
    assert importlib.util.find_spec("pytorch_optimizer") is not None, \
        "pytorch-optimizer is a test dependency: pip install --no-deps pytorch-optimizer==4.1.0"
    from pytorch_optimizer import Conda
    from pytorch_optimizer.optimizer.utils.galore import GaLoreProjector

    return Conda, GaLoreProjector


def _fp32_svd_like_the_reference(monkeypatch) -> None:
    from lrgrad.projectors import svd

    exact = svd.top_singular_basis
    monkeypatch.setattr(svd, "top_singular_basis",
                        lambda grad, rank, side: exact(grad.float(), rank, side).to(grad.dtype))


@pytest.mark.parametrize("betas", [BETAS, (0.8, 0.99)])
def test_matches_pytorch_optimizer_conda(betas, monkeypatch):
    _fp32_svd_like_the_reference(monkeypatch)
    diffs = _run_both(betas)
    assert max(diffs) < 1e-12, diffs


def test_matches_to_the_references_fp32_svd_without_the_patch():
    diffs = _run_both(BETAS)
    assert max(diffs) < 1e-5, diffs  # the reference's fp32 SVD of a float64 momentum: ~4e-7 measured


def _run_both(betas):
    conda, projector_cls = _reference()
    weights, batches = least_squares_problem(SHAPES, STEPS)
    ours_p = [torch.nn.Parameter(w.clone()) for w in weights]
    theirs_p = [torch.nn.Parameter(w.clone()) for w in weights]
    ours = lrgrad.CondaAdamW([{"params": ours_p, "rank": RANK}], lr=LR, betas=betas, eps=0.0, weight_decay=0.0,
                             update_proj_gap=GAP, scale=SCALE)
    theirs = conda(theirs_p, lr=LR, betas=betas, weight_decay=0.0, update_proj_gap=GAP, scale=SCALE,
                   projection_type="std", eps=0.0)
    for p in theirs_p:  # the reference's own projector and state layout, at rank r
        m, n = p.shape
        theirs.state[p].update(exp_avg=torch.zeros_like(p),
                               exp_avg_sq=torch.zeros((m, RANK) if m >= n else (RANK, n), dtype=p.dtype),
                               projector=projector_cls(rank=RANK, update_proj_gap=GAP, scale=SCALE,
                                                       projection_type="std"))
    diffs, moved = step_side_by_side(ours, ours_p, theirs, theirs_p, batches, weights)
    assert moved > 1e-2
    assert all(ours.state[p]["proj_refreshes"] == 1 + STEPS // GAP for p in ours_p)  # steps 1, 3, 6, 9, 12
    assert all(ours.state[p]["proj_momentum"].shape == p.shape for p in ours_p)  # the momentum is full size
    return diffs
