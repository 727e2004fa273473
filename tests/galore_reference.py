"""An independent GaLore-AdamW written from the paper's equations, and test gradients (no lrgrad code)."""

from __future__ import annotations

import torch

import lrgrad


def gapped_gradients(m: int, n: int, rank: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """float64 gradients with a clear spectral gap after ``rank`` whose subspace drifts over time."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    spectrum = torch.cat([torch.linspace(10.0, 5.0, rank), torch.linspace(0.5, 0.01, k - rank)]).double()
    grads = []
    u0, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v0, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    for _ in range(steps):
        # rotate the singular vectors a little each step so refreshes see a new subspace
        u0, _ = torch.linalg.qr(u0 + 0.3 * torch.randn(m, k, generator=g, dtype=torch.float64))
        v0, _ = torch.linalg.qr(v0 + 0.3 * torch.randn(n, k, generator=g, dtype=torch.float64))
        grads.append(u0 @ torch.diag(spectrum) @ v0.T)
    return grads


def svd_basis(g: torch.Tensor, rank: int, right: bool) -> torch.Tensor:
    """galore-torch's basis: the top-r singular vectors with LAPACK's signs."""
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    return vh[:rank] if right else u[:, :rank]


def gram_basis(g: torch.Tensor, rank: int, right: bool) -> torch.Tensor:
    """The top-r eigenvectors of GᵀG (right) or GGᵀ (left), largest eigenvalue first, each signed
    so that its entry of largest magnitude is positive."""
    gram = g.T @ g if right else g @ g.T
    _, vectors = torch.linalg.eigh(gram)
    cols = []
    for j in range(vectors.shape[1] - 1, vectors.shape[1] - 1 - rank, -1):
        v = vectors[:, j]
        cols.append(v if v[v.abs().argmax()] > 0 else -v)
    basis = torch.stack(cols, dim=1)  # d x r
    return basis.T if right else basis


def reference_galore(
    w0: torch.Tensor, grads: list[torch.Tensor], rank: int, gap: int, lr: float, scale: float, wd: float,
    betas=(0.9, 0.999), eps=1e-8, policy="keep", svd="exact",
) -> torch.Tensor:
    """A straightforward GaLore-AdamW written from the paper's equations (no lrgrad code).

    Refresh on 1-based steps 1, gap+1, ...; "std" side; torch.optim.AdamW's eps
    placement and decoupled decay order (lrgrad's documented fixes of galore-torch).
    """
    w = w0.clone()
    m_dim, n_dim = w.shape
    right = m_dim >= n_dim
    p = exp_avg = exp_avg_sq = None
    for t, g in enumerate(grads, start=1):
        if (t - 1) % gap == 0:
            new_p = gram_basis(g, rank, right) if svd == "gram" else svd_basis(g, rank, right)
            if p is not None and policy != "keep":
                if policy == "reset":
                    exp_avg.zero_()
                    exp_avg_sq.zero_()
                else:
                    tr = p @ new_p.T if right else new_p.T @ p
                    if right:
                        exp_avg, exp_avg_sq = exp_avg @ tr, exp_avg_sq @ (tr * tr)
                    else:
                        exp_avg, exp_avg_sq = tr @ exp_avg, (tr * tr) @ exp_avg_sq
            p = new_p
        r = g @ p.T if right else p.T @ g
        if exp_avg is None:
            exp_avg, exp_avg_sq = torch.zeros_like(r), torch.zeros_like(r)
        exp_avg = betas[0] * exp_avg + (1 - betas[0]) * r
        exp_avg_sq = betas[1] * exp_avg_sq + (1 - betas[1]) * r * r
        m_hat = exp_avg / (1 - betas[0] ** t)
        denom = (exp_avg_sq / (1 - betas[1] ** t)).sqrt() + eps
        n = m_hat / denom
        back = n @ p if right else p @ n
        w = w * (1 - lr * wd) - lr * scale * back
    return w


def run_lrgrad(w0, grads, **options) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    w = torch.nn.Parameter(w0.clone())
    opt = lrgrad.GaLoreAdamW([w], **options)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return w.detach(), opt
