"""A projector written the way CONTRIBUTING.md says a new one is: one class + one registry line.

The "coordinate" projector keeps the r coordinates (columns on the right side, rows on
the left) where the gradient has the most energy: its basis is r rows of the identity.
Nothing else in lrgrad knows about it; tests/projectors/test_new_projector.py proves the
estimator, every rule and FSDP2 reach it through the protocol alone.
"""

from __future__ import annotations

from typing import Any

import torch

from lrgrad.projectors import register_projector
from lrgrad.projectors.base import Projector, guarded_basis


class CoordinateProjector(Projector):
    name = "toy_coordinates"
    orthonormal = True

    def refresh(self, state: dict[str, Any], grad: torch.Tensor, step: int, group: dict[str, Any]) -> bool:
        def compute() -> torch.Tensor:
            energy = grad.square().sum(dim=0 if self.side == "right" else 1)
            keep = torch.topk(energy, self.rank).indices.sort().values
            eye = torch.eye(energy.numel(), dtype=grad.dtype, device=grad.device)[keep]  # r x d
            return eye if self.side == "right" else eye.T.contiguous()

        # a zero gradient keeps the basis in place, or gives a provisional first one (not counted)
        basis, counted = guarded_basis(state, grad, compute, keep_on_zero=self.has_basis(state))
        if basis is None:
            return False
        state["proj_basis"] = basis
        state["proj_refreshes"] += int(counted)
        return counted


register_projector(CoordinateProjector)
