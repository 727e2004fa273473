"""Test matrices with a chosen singular spectrum, and the energy a basis captures from them."""

from __future__ import annotations

import torch


def spectrum_matrix(m: int, n: int, decay: float, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """U diag(i^-decay) Vᵀ with random orthonormal U, V: flat (decay 0.3) to steep (2.0) spectra."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -decay
    return ((u * s) @ v.T).to(dtype)


def captured_energy(g: torch.Tensor, basis: torch.Tensor, side: str) -> float:
    g, basis = g.double(), basis.double()
    low = g @ basis.T if side == "right" else basis.T @ g
    return float(torch.linalg.matrix_norm(low) ** 2)
