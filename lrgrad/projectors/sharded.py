"""The FSDP2 wrapper: any projector on a ``Shard(0)`` DTensor parameter.

FSDP2's ``fully_shard`` makes every parameter a ``DTensor`` sharded along dim 0;
row ``i`` of the gradient ``G`` lives on one rank only.

* ``side="right"`` (P is r x n, the unsharded side): ``R_i = G_i Pᵀ`` is local,
  the moments are ``Shard(0)`` DTensors sharded like the weight, and the update
  ``W_i += α U_i P`` is local.
* ``side="left"`` (P is m x r, along the sharded side): ``R = Σ_i P_iᵀ G_i`` is
  all-reduced (r x n per step), the rule state is replicated, ``W_i += α P_i U``
  is local.
* Refresh: the projector's ``refresh_sharded(state, grad_local, step, group, ctx)``
  hook computes the new subspace from the local rows with the collectives of
  :class:`lrgrad.dtensor.ShardContext`; a projector without one for the case at
  hand returns ``NotImplemented`` and the gradient is all-gathered for the
  refresh only (``DTensor.full_tensor``) - correct for every projector. A
  ``gradient_free`` projector refreshes without reading G at all.

Projector state (bases, indices, seeds) stays plain tensors, identical on
every rank; low-rank gradients, rule states and updates are DTensors.
"""

from __future__ import annotations

from typing import Any

import torch

from lrgrad import kernels
from lrgrad.dtensor import ShardContext, from_local, is_dtensor


class ShardedProjector:
    """Run a projector on a ``Shard(0)`` DTensor parameter (FSDP2) without all-gathering G.

    Projector state (bases, indices, seeds) stays plain tensors, identical on
    every rank; low-rank gradients, rule states and updates are DTensors.
    """

    def __init__(self, inner: Any, param: Any):
        self.inner = inner
        self.param = param
        self.ctx = ShardContext(param)
        self.side = inner.side
        self.rank = inner.rank
        self.update_proj_gap = inner.update_proj_gap

    def __getattr__(self, name: str) -> Any:  # name, orthonormal, options, has_basis, state_bytes, ...
        return getattr(self.inner, name)

    # ---------------------------------------------------------------- refresh
    def refresh(self, state: dict[str, Any], grad2d: Any, step: int, group: dict[str, Any]) -> bool:
        if grad2d is None or getattr(self.inner, "gradient_free", False):
            return self.inner.refresh(state, None, step, group)  # e.g. a seeded random basis: no G needed
        # The projector's own sharded refresh (small all-reduces), when it has one for this case.
        result = self.inner.refresh_sharded(state, grad2d.to_local(), step, group, self.ctx)
        if result is not NotImplemented:
            return result
        # Fallback: all-gather this one gradient for the refresh (every rank computes the same basis).
        return self.inner.refresh(state, grad2d.full_tensor(), step, group)

    def carry_moments(self, rule: Any, state: dict[str, Any], old_state: dict[str, Any]) -> None:
        """The inner projector's rule, applied to the local shards of the moments.

        Transitions act on the rank axis, which is never sharded (right side: the
        moments are row shards; left side: they are replicated), so this is exact.
        """
        dtensors = {k: v for k, v in state.items() if is_dtensor(v)}
        local = rule.local_state(state)
        before = dict(local)
        self.inner.carry_moments(rule, local, old_state)
        for key, value in local.items():
            if key in dtensors and value is not before[key]:  # a new tensor: wrap it like the old one
                old = dtensors[key]
                state[key] = from_local(value, old, list(old.placements), tuple(old.shape))
            elif key not in dtensors:
                state[key] = value

    def transition(self, old_state: dict[str, Any], new_state: dict[str, Any]) -> Any:
        from torch.distributed.tensor import Replicate

        t = self.inner.transition(old_state, new_state)
        return from_local(t, self.param, [Replicate()], tuple(t.shape))

    # ---------------------------------------------------------------- maps
    def _local_basis(self, state: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
        basis = self.inner.basis_like(state, torch.empty(0, dtype=dtype, device=self.param.to_local().device))
        return basis[self.ctx.row_offset:self.ctx.row_stop] if self.side == "left" else basis

    def down(self, state: dict[str, Any], grad2d: Any) -> Any:
        from torch.distributed.tensor import Replicate, Shard

        local = grad2d.to_local()
        m, n = self.ctx.global_shape
        if self.side == "right":
            low = self.inner.down(state, local)  # G_i Pᵀ: rows stay on their rank
            placement = Shard(0) if self.ctx.sharded else Replicate()
            return from_local(low, self.param, [placement], (m, self.rank))
        low = self.inner.take_shared_down((self.rank, n))  # already all-reduced by the refresh
        if low is None:
            low = kernels.project_down(local, self._local_basis(state, local.dtype), "left")  # Σ_i P_iᵀ G_i
            self.ctx.all_reduce(low)
        return from_local(low, self.param, [Replicate()], (self.rank, n))

    def up(self, state: dict[str, Any], update: Any) -> torch.Tensor:
        local = update.to_local()
        if self.side == "right":
            return self.inner.up(state, local)
        return kernels.project_up(local, self._local_basis(state, local.dtype), "left")

    def update_param_(self, state: dict[str, Any], param2d: Any, update: Any, alpha: float, decay: float) -> None:
        local_param = param2d.to_local() if is_dtensor(param2d) else param2d
        local_update = update.to_local() if is_dtensor(update) else update
        if self.side == "right":
            self.inner.update_param_(state, local_param, local_update, alpha, decay)
        else:
            kernels.lowrank_update_(local_param, local_update, self._local_basis(state, local_update.dtype), "left",
                                    alpha=alpha, decay=decay)
