"""APOLLOAdamW / APOLLOMiniAdamW against the reference package ``apollo-torch`` (its ``APOLLOAdamW``), in float64.

Both optimizers are given the *same* projection matrices (the test draws them and patches each
side's generator), the same gradients of a least-squares loss that depends on the weights, and
are compared weight for weight after every step, over 4 refreshes of the projection
(``update_proj_gap=3``, 12 steps), for a tall (projected from the right) and a wide (from the
left) matrix.

Where lrgrad deliberately differs from apollo-torch, and how this test puts both on common ground:

* **eps**: lrgrad puts Adam's ``eps`` where ``torch.optim.AdamW`` does,
  ``(m/(1−β1ᵗ)) / (√v/√(1−β2ᵗ) + eps)``; apollo-torch uses ``m/(√v + eps)`` and folds the bias
  corrections into the step size. Equal for ``eps=0`` (used here).
* **weight decay**: lrgrad decays before the step, ``W(1−ηλ) − η·update`` (torch AdamW's order);
  apollo-torch decays the already updated weight. Equal for ``weight_decay=0`` (used here).
* **scale**: lrgrad multiplies the update by ``scale`` (α, as GaLore's scale everywhere in
  lrgrad); apollo-torch multiplies by ``sqrt(scale)``. So apollo-torch's ``scale=128`` (APOLLO-Mini)
  is lrgrad's ``scale=√128``; the test passes ``α²`` to apollo-torch.
* **norm-growth limiter**: lrgrad limits the update that is applied, ``G ⊙ s`` with ``s`` from
  the bias-corrected Adam direction (the paper's algorithm); apollo-torch limits ``G ⊙ s'`` with
  ``s'`` from ``m/(√v+eps)`` *before* its bias-correction factor ``c_t = √(1−β2ᵗ)/(1−β1ᵗ)``, so
  its limiter also reacts to ``c_t/c_{t−1}`` (and damps the first ~20 steps). The two agree
  whenever ``c_t`` is constant: the limiter test runs with ``betas=(0, 0)`` (``c_t = 1``); the
  moment tests run with the paper's betas and the limiter off in both
  (``norm_growth_limit=None`` / ``disable_nl=True``).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types

import pytest
import torch
from state_utils import least_squares_problem, step_side_by_side

import lrgrad
from lrgrad.projectors.random import RandomProjector

STEPS, GAP, RANK = 12, 3, 4
SHAPES = ((24, 10), (9, 26))  # tall: projected from the right (R is m×r); wide: from the left (R is r×n)


def _apollo_torch_module():
    """``apollo_torch.apollo`` (the APOLLO optimizer) without the package ``__init__``, which also
    imports the 8-bit GaLore optimizer and with it bitsandbytes (a CUDA package the Makefile does
    not install: ``pip install --no-deps apollo-torch``). A bare package module pointing at the
    installed folder lets the two pure-torch modules the test needs import normally."""
    if "apollo_torch" not in sys.modules:
        spec = importlib.util.find_spec("apollo_torch")
        assert spec is not None, "apollo-torch is a test dependency: make .venv/.lrgrad-installed installs it"
        package = types.ModuleType("apollo_torch")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["apollo_torch"] = package
    return importlib.import_module("apollo_torch.apollo"), importlib.import_module("apollo_torch.random_projector")


def _matrices() -> dict[tuple[tuple[int, int], int], torch.Tensor]:
    """The shared projections: (basis shape, draw) -> N(0, 1/r) matrix, fp64."""
    gen = torch.Generator().manual_seed(1234)
    out = {}
    for m, n in SHAPES:
        shape = (RANK, n) if m >= n else (m, RANK)
        for draw in range(1, STEPS // GAP + 2):
            out[(shape, draw)] = torch.randn(*shape, generator=gen, dtype=torch.float64) / math.sqrt(RANK)
    return out


@pytest.fixture
def shared_projection(monkeypatch):
    apollo, random_projector = _apollo_torch_module()
    mats = _matrices()

    def ours(self, state, device, dtype, draw=None):
        draw = state["proj_refreshes"] if draw is None else draw
        shape = (self.rank, state["proj_dim"]) if self.side == "right" else (state["proj_dim"], self.rank)
        return mats[(shape, draw)].to(device=device, dtype=dtype)

    def theirs(self, weights, rank, type, seed):  # noqa: A002 - the reference's signature
        self.test_draws = getattr(self, "test_draws", 0) + 1
        shape = (rank, weights.shape[1]) if type == "right" else (weights.shape[0], rank)
        return mats[(shape, self.test_draws)].clone()

    monkeypatch.setattr(RandomProjector, "matrix", ours)
    monkeypatch.setattr(random_projector.GradientProjector, "get_orthogonal_matrix", theirs)
    return apollo


def _run_both(apollo, *, scale_type, alpha, betas, limiter, limiter_input="update"):
    weights, batches = least_squares_problem(SHAPES, STEPS)
    ours_p = [torch.nn.Parameter(w.clone()) for w in weights]
    theirs_p = [torch.nn.Parameter(w.clone()) for w in weights]
    ours = lrgrad.APOLLOAdamW([{"params": ours_p, "rank": RANK}], lr=0.05, betas=betas, eps=0.0, weight_decay=0.0,
                              update_proj_gap=GAP, scale=alpha, scale_type=scale_type,
                              norm_growth_limit=1.01 if limiter else None, limiter_input=limiter_input)
    theirs = apollo.AdamW([{"params": theirs_p, "rank": RANK, "proj": "random", "scale_type": scale_type,
                            "update_proj_gap": GAP, "scale": alpha**2, "proj_type": "std"}],
                          lr=0.05, betas=betas, eps=0.0, weight_decay=0.0, disable_nl=not limiter)
    diffs, moved = step_side_by_side(ours, ours_p, theirs, theirs_p, batches, weights)
    return diffs, moved, ours, ours_p


@pytest.mark.parametrize("scale_type, alpha", [("channel", 1.0), ("tensor", math.sqrt(128.0))])
def test_matches_apollo_torch_with_adam_moments(shared_projection, scale_type, alpha):
    diffs, moved, ours, params = _run_both(shared_projection, scale_type=scale_type, alpha=alpha,
                                           betas=(0.9, 0.999), limiter=False)
    assert moved > 1e-2  # the weights really moved
    assert max(diffs) < 1e-12, diffs
    assert all(ours.state[p]["proj_refreshes"] == STEPS // GAP for p in params)  # 4 projections each


@pytest.mark.parametrize("scale_type, alpha", [("channel", 1.0), ("tensor", math.sqrt(128.0))])
def test_matches_apollo_torch_norm_growth_limiter(shared_projection, scale_type, alpha):
    diffs, _, _, params = _run_both(shared_projection, scale_type=scale_type, alpha=alpha, betas=(0.0, 0.0),
                                    limiter=True)
    assert max(diffs) < 1e-12, diffs
    # the limiter really acted: without it the same run ends elsewhere
    _, _, _, unlimited = _run_both(shared_projection, scale_type=scale_type, alpha=alpha, betas=(0.0, 0.0),
                                   limiter=False)
    assert max(float((a - b).detach().abs().max()) for a, b in zip(params, unlimited)) > 1e-3


@pytest.mark.parametrize("scale_type, alpha", [("channel", 1.0), ("tensor", math.sqrt(128.0))])
def test_limiter_input_uncorrected_is_apollo_torch_with_the_papers_betas(shared_projection, scale_type, alpha):
    """``limiter_input="uncorrected"`` limits where apollo-torch does (before Adam's bias correction):
    equal to it with the limiter on and the paper's betas. lrgrad's default (``"update"``, the paper's
    Algorithm 1: the applied update is limited) is a different algorithm in the first steps."""
    diffs, moved, _, _ = _run_both(shared_projection, scale_type=scale_type, alpha=alpha, betas=(0.9, 0.999),
                                   limiter=True, limiter_input="uncorrected")
    assert moved > 1e-2
    assert max(diffs) < 1e-12, diffs
    default, _, _, _ = _run_both(shared_projection, scale_type=scale_type, alpha=alpha, betas=(0.9, 0.999),
                                 limiter=True)
    assert max(default) > 1e-2, default


def test_limiter_input_is_checked_and_decides_the_algorithm():
    w = torch.nn.Parameter(torch.randn(12, 8))
    with pytest.raises(ValueError, match="limiter_input"):
        lrgrad.APOLLOAdamW([w], rank=2, limiter_input="before")
    with pytest.raises(ValueError, match="limiter_input"):  # Lion has no bias correction to undo
        lrgrad.LowRankLion([w], rank=2, projector="random", full_rank="apollo", limiter_input="uncorrected")
    source = lrgrad.APOLLOAdamW([w], rank=2, limiter_input="uncorrected")
    w.grad = torch.randn(12, 8)
    source.step()
    with pytest.raises(ValueError, match="limiter_input"):
        lrgrad.APOLLOAdamW([w], rank=2).load_state_dict(source.state_dict())


def test_apollo_mini_preset_is_rank_one_tensor_scaling():
    w = torch.nn.Parameter(torch.randn(12, 8, dtype=torch.float64))
    opt = lrgrad.APOLLOMiniAdamW([w])
    group = opt.param_groups[0]
    assert (group["rank"], group["scale_type"], group["full_rank"]) == (1, "tensor", "apollo")
    assert group["scale"] == pytest.approx(math.sqrt(128.0)) and group["projector"] == "random"
