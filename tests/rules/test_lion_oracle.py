"""Lion against its equations (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms",
arXiv:2302.06675, Alg. 2), full rank and inside a projector, written out here:

    u = sign(β1 m + (1 - β1) g);   m <- β2 m + (1 - β2) g;   p <- p (1 - lr wd) - lr u

β1 and β2 are far apart so that using one for the other shows.
"""

from __future__ import annotations

import torch

import lrgrad

BETAS, LR, WD = (0.5, 0.98), 3e-3, 0.2


def grads(shape, steps=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(steps)]


def test_lion_full_rank_matches_the_paper():
    shapes = [(12, 8), (8,)]
    params = [torch.nn.Parameter(torch.randn(*s, dtype=torch.float64)) for s in shapes]
    expected = [p.detach().clone() for p in params]
    moments = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    opt = lrgrad.LowRankOptimizer(params, lr=LR, rule="lion", betas=BETAS, weight_decay=WD)
    series = [grads(s, seed=i) for i, s in enumerate(shapes)]
    for t in range(6):
        for p, g in zip(params, series):
            p.grad = g[t].clone()
        opt.step()
        for i, g in enumerate(series):
            u = torch.sign(BETAS[0] * moments[i] + (1 - BETAS[0]) * g[t])
            moments[i] = BETAS[1] * moments[i] + (1 - BETAS[1]) * g[t]
            expected[i] = expected[i] * (1 - LR * WD) - LR * u
            torch.testing.assert_close(params[i].detach(), expected[i], rtol=0, atol=1e-12)
            torch.testing.assert_close(opt.state[params[i]]["exp_avg"], moments[i], rtol=0, atol=1e-12)


def test_lion_inside_a_projector_matches_the_paper():
    """p <- p (1 - lr wd) - lr scale up(lion(R)), R = G Pᵀ and up(U) = U P on the SVD basis P (r x n)."""
    rank, scale = 4, 0.5
    w = torch.nn.Parameter(torch.randn(20, 12, dtype=torch.float64))
    expected = w.detach().clone()
    m = torch.zeros(20, rank, dtype=torch.float64)
    opt = lrgrad.LowRankLion([w], lr=LR, betas=BETAS, weight_decay=WD, rank=rank, scale=scale,
                             update_proj_gap=3, projector="svd")
    for g in grads((20, 12)):
        w.grad = g.clone()
        opt.step()
        basis = opt.state[w]["proj_basis"]
        assert basis.shape == (rank, 12)
        r = g @ basis.T
        u = torch.sign(BETAS[0] * m + (1 - BETAS[0]) * r)
        m = BETAS[1] * m + (1 - BETAS[1]) * r
        expected = expected * (1 - LR * WD) - LR * scale * (u @ basis)
        torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-12)
