"""GaLore against independent implementations: the paper's equations, torch AdamW, Adafactor's formula."""

from __future__ import annotations

import pytest
import torch
from galore_reference import gapped_gradients, reference_galore, run_lrgrad

import lrgrad
from lrgrad.optim.lowrank import LowRankOptimizer
from lrgrad.projectors import register_projector
from lrgrad.projectors.base import Projector

# ---------------------------------------------------------------- oracles


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (32, 32)])
@pytest.mark.parametrize("policy", ["keep", "project", "reset"])
@pytest.mark.parametrize("svd", ["gram", "exact"])
def test_galore_matches_independent_reference(shape, policy, svd):
    """Both exact refreshes, the Gram eigenvectors (the default's first refresh and fallback) and
    torch.linalg.svd (LAPACK's signs, which "keep" moments see), against the paper's equations with the
    same basis (the default's later, iterated refreshes: tests/projectors/test_projector_svd_warm.py)."""
    rank, gap, steps = 6, 3, 10  # refreshes on steps 1, 4, 7, 10
    grads = gapped_gradients(*shape, rank, steps)
    w0 = torch.randn(*shape, dtype=torch.float64)
    expected = reference_galore(w0, grads, rank, gap, lr=0.01, scale=0.25, wd=0.1, policy=policy, svd=svd)
    got, opt = run_lrgrad(w0, grads, lr=0.01, rank=rank, update_proj_gap=gap, scale=0.25,
                          weight_decay=0.1, moment_policy=policy, svd=svd)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    state = next(iter(opt.state.values()))
    assert state["proj_refreshes"] == 4 and state["step"] == steps


def test_full_rank_params_match_torch_adamw():
    torch.manual_seed(0)
    shapes = [(7,), (5, 3), (4, 3, 2), (0,)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = lrgrad.GaLoreAdamW(ours, lr=0.01, weight_decay=0.1)  # no rank: full-rank
    opt_theirs = torch.optim.AdamW(theirs, lr=0.01, weight_decay=0.1, foreach=False)
    for _ in range(5):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


class SignedPermutationProjector(Projector):
    """A full-rank orthonormal basis (signed permutation) - a test double."""

    name = "test_signed_permutation"

    def refresh(self, state, grad, step, group):
        n = grad.shape[1] if self.side == "right" else grad.shape[0]
        g = torch.Generator().manual_seed(step)
        perm = torch.eye(n, dtype=grad.dtype)[torch.randperm(n, generator=g)]
        signs = torch.randint(0, 2, (n, 1), generator=g).to(grad.dtype) * 2 - 1
        state["proj_basis"] = signs * perm
        state["proj_refreshes"] += 1  # the protocol: a count of 0 means no subspace yet (refresh every step)
        return True


class ProjectEverything(LowRankOptimizer):
    def is_projected(self, param, group):
        return param.dim() >= 2


def test_full_rank_orthonormal_projection_reduces_to_plain_adamw():
    register_projector(SignedPermutationProjector)
    try:
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(12, 9, dtype=torch.float64))
        ref = torch.nn.Parameter(w.detach().clone())
        opt = ProjectEverything([w], lr=0.01, projector="test_signed_permutation", rank=9, scale=1.0,
                                update_proj_gap=2, weight_decay=0.1, moment_policy="project")
        ref_opt = torch.optim.AdamW([ref], lr=0.01, weight_decay=0.1)
        for _ in range(6):
            g = torch.randn(12, 9, dtype=torch.float64)
            w.grad, ref.grad = g.clone(), g.clone()
            opt.step()
            ref_opt.step()
        torch.testing.assert_close(w, ref, rtol=0, atol=1e-12)
    finally:
        lrgrad.PROJECTORS.pop("test_signed_permutation")


def test_adafactor_full_rank_matches_independent_formula():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64))
    w_ref = w.detach().clone()
    opt = lrgrad.GaLoreAdafactor([w], lr=0.05, beta1=0.9)
    row, col, m = torch.zeros(6, dtype=torch.float64), torch.zeros(5, dtype=torch.float64), torch.zeros(6, 5)
    m = m.double()
    for t in range(1, 5):
        g = torch.randn(6, 5, dtype=torch.float64)
        w.grad = g.clone()
        opt.step()
        beta2 = 1 - t ** -0.8
        sq = g * g + 1e-30
        row = beta2 * row + (1 - beta2) * sq.mean(1)
        col = beta2 * col + (1 - beta2) * sq.mean(0)
        v = torch.outer(row, col) / row.mean()
        u = g / v.sqrt()
        u = u / max(1.0, (u.pow(2).mean().sqrt() / 1.0).item())
        m = 0.9 * m + 0.1 * u
        w_ref = w_ref - 0.05 * m
    torch.testing.assert_close(w.detach(), w_ref, rtol=0, atol=1e-12)
