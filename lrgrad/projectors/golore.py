r"""GoLore: GaLore's SVD subspace for a warm-up, then random orthonormal (Stiefel) subspaces.

"Subspace Optimization for Large Language Models with Convergence Guarantees", He et al., ICML 2025,
arXiv:2410.11289.

GaLore's top-r SVD subspace of a stochastic gradient is dominated by its noise once the true gradient
is small, so GaLore provably stalls under small-batch noise; GoLore replaces it by a subspace drawn
uniformly at random (independent of the gradient noise), which converges. The paper's recipe runs
GaLore first and GoLore after. ``projector="golore"`` is the SVD projector (every ``svd`` option,
its FSDP2 refresh included) with one more option:

* ``golore_switch`` (T_s, default 0): a refresh at step ``t > T_s`` (1-based) draws the new basis at
  random instead of from the gradient - ``0`` is GoLore from the first step; the reference's
  pretraining runs switch at 80% of the training steps (``rand_ratio = 0.8``).

The random basis is the Haar-distributed orthonormal ``Q`` of a d x r standard Gaussian draw (QR with
``diag(R) > 0``: ``lrgrad.projectors.random.random_matrix(kind="orthonormal")``), seeded by (the param's
seed, the step): every FSDP2 rank draws the same one without reading G, and a resume redraws nothing
(the basis is stored, like GaLore's, as the reference does). ``E[P Pᵀ] = (r/d) I`` (tested).

Moments at a refresh (``moment_policy="project"``, the GoLore preset's): the first moment is carried into
the new subspace, ``M ← P_newᵀ P_old M`` (left; ``M P_old P_newᵀ`` right), and the second moment is
kept as it is (``golore_v_transfer="keep"``, the reference's choice); ``"quadratic"`` applies ``T∘T`` as
the SVD projector does.
"""

from __future__ import annotations

from typing import Any

import torch

from lrgrad._checks import check_choice, check_int
from lrgrad.projectors.random import matrix_seed, random_matrix
from lrgrad.projectors.svd import SVDProjector

GOLORE_V_TRANSFERS = ("keep", "quadratic")


class GoLoreProjector(SVDProjector):
    """GaLore's SVD refresh up to step ``golore_switch``, seeded random orthonormal bases after it."""

    name = "golore"
    option_defaults: dict[str, Any] = {**SVDProjector.option_defaults, "golore_switch": 0,
                                       "golore_v_transfer": "keep"}

    @classmethod
    def validate_options(cls, group: dict[str, Any]) -> None:
        super().validate_options(group)
        check_int("golore_switch", group["golore_switch"], 0)
        check_choice("golore_v_transfer", group["golore_v_transfer"], GOLORE_V_TRANSFERS)

    def is_random_step(self, step: int) -> bool:
        """Whether the refresh at ``step`` (1-based) draws at random (GoLore) instead of from G (GaLore)."""
        return step > self.options["golore_switch"]

    def random_basis(self, state: dict[str, Any], step: int, shape2d: tuple[int, int], like: torch.Tensor
                     ) -> torch.Tensor:
        """The Haar-distributed orthonormal basis of ``step`` for a ``shape2d`` gradient: r x n (right) or
        m x r (left), in ``like``'s dtype and device."""
        dim = shape2d[1] if self.side == "right" else shape2d[0]
        basis = random_matrix(matrix_seed(state["proj_seed"], step), self.rank, dim, self.side, "orthonormal",
                              like.dtype, like.device)
        return basis.contiguous()

    def refresh(self, state: dict[str, Any], grad: torch.Tensor, step: int, group: dict[str, Any]) -> bool:
        if self.is_random_step(step):
            self.store_basis(state, self.random_basis(state, step, tuple(grad.shape), grad), step)
            return True
        return super().refresh(state, grad, step, group)

    def refresh_sharded(self, state: dict[str, Any], grad_local: torch.Tensor, step: int,
                        group: dict[str, Any], ctx: Any) -> Any:
        """A random refresh reads no gradient: every rank draws the same basis (no collective); the
        warm-up's SVD refreshes are the SVD projector's sharded ones."""
        if self.is_random_step(step):
            self.store_basis(state, self.random_basis(state, step, ctx.global_shape, grad_local), step)
            return True
        return super().refresh_sharded(state, grad_local, step, group, ctx)

    def carry_moments(self, rule: Any, state: dict[str, Any], old_state: dict[str, Any]) -> None:
        """First moments: ``down_new(up_old(M))``; second moments kept (``"keep"``) or ``T∘T``."""
        transition = self.transition(old_state, state)
        if self.options["golore_v_transfer"] == "quadratic":
            rule.change_basis(state, transition, self.side)
            return
        carried = dict(state)
        rule.change_basis(carried, transition, self.side)
        for key in rule.linear_keys:
            if key in state:
                state[key] = carried[key]


__all__ = ["GOLORE_V_TRANSFERS", "GoLoreProjector"]
