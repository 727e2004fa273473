"""An all-zero gradient (a layer that saw no data: an unused branch after ``zero_grad(set_to_none=False)``, an
MoE expert called on no tokens, the zero-gradient template step torch's distributed checkpoint runs on a fresh
optimizer before its first save) names no subspace and no update size. Neither may linger: a first refresh on
it gives a provisional basis that the first gradient with data replaces, and the norm-growth limiter of
APOLLO/Fira does not take its zero norm as the reference that caps every later update."""

from __future__ import annotations

import io

import pytest
import torch
from torch.distributed.checkpoint.state_dict import _init_optim_state

import lrgrad

SHAPES = [(40, 48), (48, 40)]


def _planted(shape: tuple[int, int], steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Gradients of one rank-4 structure plus noise: every refresh from data finds the same subspace."""
    g = torch.Generator().manual_seed(seed)
    left, right = torch.randn(shape[0], 4, generator=g), torch.randn(4, shape[1], generator=g)
    return [left @ right + 0.01 * torch.randn(shape, generator=g) for _ in range(steps)]


def _subspace(opt: lrgrad.LowRankOptimizer, w: torch.Tensor) -> torch.Tensor:
    """The orthogonal projector onto the subspace ``w``'s basis spans, on its projected side (d x d)."""
    group = opt.param_groups[0]
    projector = opt.projector_for(w, group)
    basis = projector.basis(opt.state[w]).float()
    basis = basis.T if projector.side == "right" else basis  # d x r
    q = torch.linalg.qr(basis).Q  # the INT4 basis of Q-GaLore is orthonormal only to its rounding
    return q @ q.T


def _gradient_chosen(name: str) -> bool:
    """Presets whose refresh reads the subspace from data (G, Conda's momentum of G); LDAdam re-chooses every
    step and Flora/GoLore/APOLLO draw theirs."""
    preset = lrgrad.optim.presets.preset_of(lrgrad.OPTIMIZERS[name])
    return preset.projector in ("svd", "qgalore", "dct", "grass", "online_pca", "conda")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", [n for n in sorted(lrgrad.OPTIMIZERS) if _gradient_chosen(n)])
def test_a_zero_first_gradient_leaves_a_provisional_basis_that_the_first_data_replaces(name, shape):
    """Before, the first refresh took the SVD (DCT scores, row norms) of the zero matrix, counted it, and kept
    that arbitrary basis for the whole gap: ~r/d of the gradient's energy was trained for 200 steps. Now the
    zero step leaves a provisional basis (``proj_refreshes == 0``, no failure), the next step refreshes from
    its gradient and lands on the subspace a run without the zero step has."""
    grads = _planted(shape, 3)

    def run(zero_first: bool):
        w = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
        opt = lrgrad.OPTIMIZERS[name]([w], lr=1e-3, rank=4, update_proj_gap=1000)
        if zero_first:
            w.grad = torch.zeros(shape)
            opt.step()
            assert opt.state[w]["proj_refreshes"] == 0 and opt.state[w]["proj_failures"] == 0
            projector = opt.projector_for(w, opt.param_groups[0])
            assert projector.has_basis(opt.state[w]) and projector.lacks_subspace(opt.state[w])  # provisional
        for g in grads:
            w.grad = g.clone()
            opt.step()
        return opt, w

    opt, w = run(zero_first=True)
    ref_opt, ref_w = run(zero_first=False)
    assert opt.state[w]["proj_refreshes"] == ref_opt.state[ref_w]["proj_refreshes"] >= 1
    distance = torch.linalg.matrix_norm(_subspace(opt, w) - _subspace(ref_opt, ref_w)).item()
    assert distance < 0.05, distance  # an arbitrary basis: ~2√2 (two rank-4 projectors, no overlap)


@pytest.mark.parametrize("name", ["GaLoreAdamW", "DCTAdamW", "OnlineSubspaceAdamW", "QGaLoreAdamW", "LDAdamW"])
def test_the_template_step_of_a_first_checkpoint_resumes_bit_identically(name):
    """torch's ``get_optimizer_state_dict`` on a fresh optimizer (a checkpoint saved before the first step) runs
    one zero-gradient step at lr 0: the provisional basis it leaves is saved, loaded and replaced exactly as in
    the run that never stopped."""
    grads = _planted((40, 48), 4)

    def fresh():
        w = torch.nn.Parameter(torch.randn(40, 48, generator=torch.Generator().manual_seed(1)))
        return w, lrgrad.OPTIMIZERS[name]([w], lr=1e-3, rank=4, update_proj_gap=2)

    w, opt = fresh()
    _init_optim_state(opt)  # what get_optimizer_state_dict(model, opt) runs on an optimizer without state
    assert opt.state[w]["proj_refreshes"] == 0
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed_w, resumed = fresh()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for g in grads:
        w.grad, resumed_w.grad = g.clone(), g.clone()
        opt.step()
        resumed.step()
    assert torch.equal(w, resumed_w)
    assert opt.state[w]["proj_refreshes"] == resumed.state[resumed_w]["proj_refreshes"] >= 2


@pytest.mark.parametrize("name", ["APOLLOAdamW", "APOLLOMiniAdamW", "FiraAdamW"])
@pytest.mark.parametrize("when", ["first", "mid-run"])
def test_a_zero_gradient_step_leaves_the_norm_growth_limiter_as_it_was(name, when):
    """The limiter caps ‖S_t‖ at γ(‖S_{t−1}‖ + 1e-8). A zero-gradient step has ‖S‖ = 0; stored as the
    reference, it capped the next updates at ~1e-8·γᵏ, and the weights did not move for ~1400 steps. The
    zero step keeps the reference it found, so the steps after it are those of a run without it (same
    update sizes, to the bias-correction's shift of one step)."""
    shape = (12, 16)
    grads = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(30)]
    zero_at = 0 if when == "first" else 10
    rank = {} if name == "APOLLOMiniAdamW" else {"rank": 4}

    def run(with_zero: bool):
        w = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(99)))
        opt = lrgrad.OPTIMIZERS[name]([w], lr=1e-2, weight_decay=0.0, **rank)
        moved = []
        for i, g in enumerate(grads):
            if with_zero and i == zero_at:
                before = opt.state[w]["limiter_norm"].clone() if opt.state[w] else torch.tensor(-1.0)
                w.grad = torch.zeros(shape)
                opt.step()
                assert torch.equal(opt.state[w]["limiter_norm"], before)
            start = w.detach().clone()
            w.grad = g.clone()
            opt.step()
            moved.append((w.detach() - start).norm().item())
        return moved

    moved, reference = run(True), run(False)
    after = slice(zero_at, zero_at + 5)
    ratios = torch.tensor(moved[after]) / torch.tensor(reference[after])
    assert ratios.min() > 0.5, ratios  # the stall moved the weights by ~1e-8 of this


def test_a_zero_first_gradient_under_a_group_with_data_keeps_the_other_params_refreshing():
    """Per param, not per group: an unused layer's provisional basis does not hold back a used one's schedule."""
    used = torch.nn.Parameter(torch.randn(40, 48))
    unused = torch.nn.Parameter(torch.randn(40, 48))
    opt = lrgrad.GaLoreAdamW([used, unused], rank=4, update_proj_gap=3)
    for g in _planted((40, 48), 5):
        used.grad, unused.grad = g, torch.zeros(40, 48)
        opt.step()
    assert opt.state[used]["proj_refreshes"] == 2  # steps 1 and 4
    assert opt.state[unused]["proj_refreshes"] == 0 and opt.state[unused]["proj_failures"] == 0
