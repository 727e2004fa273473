"""An independent oracle for Newton–Schulz at any precision: the polar map through an fp64 SVD.

Nothing here imports lrgrad. Muon's quintic iteration X ← aX + (bXXᵀ + c(XXᵀ)²)X is an odd
matrix polynomial: on X = U S Vᵀ it gives U p(S) Vᵀ with p(σ) = aσ + bσ³ + cσ⁵, the singular
vectors untouched. So in exact arithmetic ``steps`` iterations on X = G / (‖G‖_F + eps) equal
``U diag(p^steps(σ / (‖σ‖₂ + eps))) Vᵀ`` from one fp64 SVD of G — computed here without any
matrix iteration, so it shares no rounding (and no code path) with the iteration under test.
"""

from __future__ import annotations

import torch

MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def scalar_map(sigma: torch.Tensor, steps: int, coefficients=MUON_COEFFICIENTS, eps: float = 1e-7) -> torch.Tensor:
    """p applied ``steps`` times to the Frobenius-normalized singular values (fp64)."""
    a, b, c = coefficients
    s = sigma.double() / (torch.linalg.vector_norm(sigma.double()) + eps)
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


def polar_map(g: torch.Tensor, steps: int, coefficients=MUON_COEFFICIENTS, eps: float = 1e-7) -> torch.Tensor:
    """The exact result of ``steps`` quintic Newton–Schulz iterations on ``g`` (fp64)."""
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return (u * scalar_map(s, steps, coefficients, eps)) @ vh


def relative_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    """‖actual − exact‖_F / ‖exact‖_F in fp64."""
    return float(torch.linalg.matrix_norm(actual.double() - exact) / torch.linalg.matrix_norm(exact))
