"""DCT's sketched left-side scores: what FSDP2 refreshes with by default (``dct_sharded="sketch"``)
and one process runs with ``dct_scores="sketch"``.

Exact left-side scores ``‖q_kᵀ G‖²`` mix the rows of G, which FSDP2 shards; the sketch scores
``G V Vᵀ`` (V from a seeded randomized range of GᵀG) instead. The checks: exact when the sketch
spans G's row space, a selection that keeps >= 99% of the exact top-r score energy on
gradients whose energy is concentrated in some DCT modes (where the choice matters), the
right side untouched, a bit-identical resume, and bad options refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from state_utils import assert_states_equal, roundtrip
from tiny_model import TinyLM, train

import lrgrad
from lrgrad.projectors.dct import DCTProjector, dct_basis, dct_coefficients, select_indices, sketched_left_scores


def exact_scores(g: torch.Tensor) -> torch.Tensor:
    return dct_coefficients(g, "left", "matmul").square().sum(dim=1)


def sketch(g: torch.Tensor, width: int, power_iters: int = 0, seed: int = 0) -> torch.Tensor:
    return sketched_left_scores(g, width, power_iters, torch.Generator().manual_seed(seed), "matmul")


def mode_concentrated(m: int, n: int, decay: float, seed: int) -> torch.Tensor:
    """G = Q[:, perm] diag(w) R: DCT mode perm[j] carries energy ∝ w_j² = j^-2·decay (R Gaussian)."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(m, generator=gen)
    w = torch.arange(1, m + 1, dtype=torch.float64) ** -decay
    r = torch.randn(m, n, generator=gen, dtype=torch.float64)
    return dct_basis(m, dtype=torch.float64)[:, perm] @ (w[:, None] * r)


def captured(exact: torch.Tensor, chosen: torch.Tensor) -> float:
    return float(exact[chosen.long()].sum())


def test_sketch_spanning_the_row_space_is_exact():
    g = torch.randn(40, 70, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sketch(g, width=70), exact_scores(g), rtol=1e-10, atol=1e-12)
    low_rank = g[:, :6] @ torch.randn(6, 70, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sketch(low_rank, width=10), exact_scores(low_rank), rtol=1e-9, atol=1e-12)
    assert torch.equal(select_indices(sketch(low_rank, width=10), 8), select_indices(exact_scores(low_rank), 8))


@pytest.mark.parametrize("decay", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("shape,rank", [((128, 344), 32), ((256, 688), 64)])
def test_sketched_selection_keeps_99_percent_of_the_exact_top_r_energy(shape, rank, decay):
    g = mode_concentrated(*shape, decay=decay, seed=3)
    exact = exact_scores(g)
    best = captured(exact, select_indices(exact, rank))
    got = captured(exact, select_indices(sketch(g, rank + 8), rank))
    assert got >= 0.99 * best
    # the bound is not vacuous: a choice blind to the scores keeps r/m of the energy on average
    assert rank / shape[0] * float(exact.sum()) < 0.8 * best


def test_the_sketch_is_seeded_by_param_seed_and_step():
    g = mode_concentrated(64, 160, decay=0.25, seed=5)
    proj = DCTProjector(16, 1, "left", {**DCTProjector.option_defaults, "dct_scores": "sketch"})
    states = []
    for seed, step in ((0, 1), (0, 1), (0, 2), (1, 1)):
        state: dict = {}
        proj.init_state(state, tuple(g.shape), seed=seed)
        states.append(proj._sketched_scores(state, g, step))
    assert torch.equal(states[0], states[1])
    assert not torch.equal(states[0], states[2]) and not torch.equal(states[0], states[3])


def test_right_side_is_exact_under_the_sketch_option():
    """``dct_scores="sketch"`` changes only the left side (the right side is exact and shard-local)."""
    g = torch.randn(48, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    chosen = {}
    for scores in ("sketch", "auto"):
        proj = DCTProjector(6, 1, "right", {**DCTProjector.option_defaults, "dct_scores": scores})
        state: dict = {}
        proj.init_state(state, tuple(g.shape), seed=0)
        proj.refresh(state, g, 1, {})
        chosen[scores] = state["proj_indices"]
    assert torch.equal(chosen["sketch"], chosen["auto"])


def test_sketch_training_resumes_bit_identically():
    torch.manual_seed(0)
    model = TinyLM().double()
    resumed = copy.deepcopy(model)

    def make(m):
        return lrgrad.DCTAdamW(lrgrad.param_groups(m, rank=8, update_proj_gap=2), lr=1e-2, dct_scores="sketch")

    opt = make(model)
    train(model, opt, steps=3)
    saved_model, saved_opt = roundtrip(model.state_dict()), roundtrip(opt.state_dict())
    train(model, opt, steps=4, batch_seed=3)
    resumed.load_state_dict(saved_model)
    opt2 = make(resumed)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, steps=4, batch_seed=3)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert_states_equal(opt.state_dict(), opt2.state_dict())
    left = [s for p, s in opt.state.items() if p.dim() == 2 and p.shape[0] < p.shape[1] and "proj_indices" in s]
    assert left, "TinyLM has a left-side (m < n) projected matrix"


@pytest.mark.parametrize("key,value,error", [
    ("dct_sharded", "allgather", ValueError),
    ("dct_oversample", -1, ValueError),
    ("dct_power_iters", 1.5, TypeError),
    ("dct_scores", "sketched", ValueError),
])
def test_bad_sketch_options_are_refused_by_name(key, value, error):
    with pytest.raises(error, match=key):
        lrgrad.DCTAdamW(TinyLM().named_parameters(), rank=8, **{key: value})


def test_sharded_refresh_options_name_real_options():
    """Each projector's one-process equivalent of its sharded default is a valid option set."""
    for name, cls in lrgrad.PROJECTORS.items():
        assert set(cls.sharded_refresh_options) <= set(cls.option_defaults), name
