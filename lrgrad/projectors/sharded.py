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

* Full-size projector state (``row_state_keys``: Conda's momentum, LDAdam's error buffer) is a
  ``Shard(0)`` DTensor laid out like the weight. The hooks that read or write it
  (``corrected_grad``, ``refresh_sharded``, ``carry_moments``, ``advance``) get a view of the
  state with every DTensor replaced by its local part, and this rank's rows of G; what they
  assign is wrapped back (``inner.shard_ctx`` is the :class:`lrgrad.dtensor.ShardContext`
  for the rows and collectives they need).

Other projector state (bases, indices, seeds) stays plain tensors, identical on
every rank; low-rank gradients, rule states and updates are DTensors.
"""

from __future__ import annotations

from typing import Any

import torch

from lrgrad import kernels
from lrgrad.dtensor import ShardContext, from_local, is_dtensor


def unshardable_message(cls: type) -> str:
    """The ``ValueError`` for a projector class that declares ``supports_sharding = False`` on FSDP2 params."""
    return (f"Invalid params: the {cls.__name__} ({cls.name!r}) projector declares supports_sharding=False: it "
            f"cannot run on FSDP2-sharded (Shard(0) DTensor) params; use DDP, or another projector")


class ShardedProjector:
    """Run a projector on a ``Shard(0)`` DTensor parameter (FSDP2) without all-gathering G.

    Projector state (bases, indices, seeds) stays plain tensors, identical on
    every rank; low-rank gradients, rule states and updates are DTensors.
    """

    def __init__(self, inner: Any, param: Any):
        if not inner.supports_sharding:
            raise ValueError(unshardable_message(type(inner)))
        self.inner = inner
        self.param = param
        self.ctx = ShardContext(param)
        inner.shard_ctx = self.ctx
        self.side = inner.side
        self.rank = inner.rank
        self.update_proj_gap = inner.update_proj_gap

    # ---------------------------------------------------------------- the inner projector's contract
    # Everything the optimizer, the estimator and L4 read on a projector, forwarded by name (the
    # maps and the refresh below are the sharded versions): a capability added to ``Projector``
    # must be added here too, or the wrapper answers with the base class's default.
    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def orthonormal(self) -> bool:
        return self.inner.orthonormal

    @property
    def options(self) -> dict[str, Any]:
        return self.inner.options

    @property
    def structural_state_keys(self) -> tuple[str, ...]:
        return self.inner.structural_state_keys

    @property
    def gradient_free(self) -> bool:
        return self.inner.gradient_free

    @property
    def down_reads_every_entry(self) -> bool:
        return self.inner.down_reads_every_entry

    @property
    def refresh_plain_keys(self) -> tuple[str, ...]:
        return self.inner.refresh_plain_keys

    @property
    def row_state_keys(self) -> tuple[str, ...]:
        return self.inner.row_state_keys

    @property
    def supports_sharding(self) -> bool:
        return self.inner.supports_sharding

    def init_state(self, state: dict[str, Any], shape2d: tuple[int, int], seed: int) -> None:
        self.inner.init_state(state, shape2d, seed)

    def has_basis(self, state: dict[str, Any]) -> bool:
        return self.inner.has_basis(state)

    def lacks_subspace(self, state: dict[str, Any]) -> bool:
        return self.inner.lacks_subspace(state)

    def should_refresh(self, state: dict[str, Any], step: int) -> bool:
        return self.inner.should_refresh(state, step)

    def draw_for_step(self, state: dict[str, Any], step: int) -> int:
        return self.inner.draw_for_step(state, step)

    def default_scale(self, shape2d: tuple[int, int]) -> float:
        return self.inner.default_scale(shape2d)

    def projected_dim(self, shape2d: tuple[int, int]) -> int:
        return self.inner.projected_dim(shape2d)

    def refresh_state_spec(self, shape2d: tuple[int, int], dtype: torch.dtype) -> dict[str, Any]:
        return self.inner.refresh_state_spec(shape2d, dtype)

    def basis_bytes(self, shape2d: tuple[int, int], dtype: torch.dtype, world_size: int = 1) -> int:
        return self.inner.basis_bytes(shape2d, dtype, world_size)

    def state_bytes(self, state: dict[str, Any]) -> int:
        return self.inner.state_bytes(state)

    def shared_buffers(self, state: dict[str, Any]) -> dict[Any, int]:
        return self.inner.shared_buffers(state)

    def memo_bytes(self) -> int:
        return self.inner.memo_bytes()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.ctx.all_reduce(t) if self.ctx.sharded else t

    def basis(self, state: dict[str, Any]) -> torch.Tensor:
        return self.inner.basis(state)

    # ---------------------------------------------------------------- the local view of the state
    @staticmethod
    def local_view(state: dict[str, Any]) -> dict[str, Any]:
        """``state`` with every DTensor replaced by this rank's part (the moments' and row states' rows)."""
        return {k: (v.to_local() if is_dtensor(v) else v) for k, v in state.items()}

    def store_local(self, state: dict[str, Any], local: dict[str, Any], before: dict[str, Any]) -> None:
        """Put what a hook assigned in the local view ``local`` (taken as ``before``) back into ``state``:
        a new tensor for a DTensor entry is wrapped like the old one, a new row state (its first
        refresh) as a ``Shard(0)`` DTensor of the gradient's shape, anything else as it is."""
        from torch.distributed.tensor import Replicate, Shard

        for key, value in local.items():
            if key in before and value is before[key]:
                continue
            old = state.get(key)
            if isinstance(value, torch.Tensor) and is_dtensor(old):
                state[key] = from_local(value, old, list(old.placements), tuple(old.shape))
            elif isinstance(value, torch.Tensor) and key in self.inner.row_state_keys:
                placement = Shard(0) if self.ctx.sharded else Replicate()
                state[key] = from_local(value, self.param, [placement], self.ctx.global_shape)
            else:
                state[key] = value

    def run_local(self, state: dict[str, Any], hook: Any, *args: Any, view: Any = None) -> Any:
        """``hook(local, *args)`` on the local view of ``state`` (``view(state)``, default
        :meth:`local_view`), then what it assigned stored back into ``state``."""
        local = (view or self.local_view)(state)
        before = dict(local)
        result = hook(local, *args)
        self.store_local(state, local, before)
        return result

    # ---------------------------------------------------------------- the step's gradient
    def corrected_grad(self, state: dict[str, Any], grad2d: Any) -> Any:
        """The inner projector's ``corrected_grad`` on this rank's rows (row-local by contract)."""
        local = grad2d.to_local()
        corrected = self.run_local(state, self.inner.corrected_grad, local)
        if corrected is local:
            return grad2d
        return from_local(corrected, grad2d, list(grad2d.placements), tuple(grad2d.shape))

    def advance(self, state: dict[str, Any], grad2d: Any, low: Any) -> None:
        """The inner projector's ``advance`` on this rank's rows of G and its part of R (right side: the
        same rows; left side: the whole, all-reduced R)."""
        self.run_local(state, self.inner.advance, grad2d.to_local(), low.to_local())

    # ---------------------------------------------------------------- refresh
    def refresh(self, state: dict[str, Any], grad2d: Any, step: int, group: dict[str, Any]) -> bool:
        if grad2d is None or self.inner.gradient_free:
            return self.inner.refresh(state, None, step, group)  # e.g. a seeded random basis: no G needed
        # The projector's own sharded refresh (small all-reduces), when it has one for this case.
        result = self.run_local(state, self.inner.refresh_sharded, grad2d.to_local(), step, group, self.ctx)
        if result is not NotImplemented:
            return result
        if self.inner.row_state_keys:
            raise NotImplementedError(f"the {self.inner.name!r} projector keeps row-sharded state "
                                      f"{self.inner.row_state_keys}: its refresh_sharded must handle every case")
        # Fallback: all-gather this one gradient for the refresh (every rank computes the same basis).
        return self.inner.refresh(state, grad2d.full_tensor(), step, group)

    def carry_moments(self, rule: Any, state: dict[str, Any], old_state: dict[str, Any]) -> None:
        """The inner projector's rule, applied to the local shards of the moments (and row states).

        Transitions act on the rank axis, which is never sharded (right side: the
        moments are row shards; left side: they are replicated), so this is exact.
        """
        self.run_local(state, lambda local: self.inner.carry_moments(rule, local, old_state), view=rule.local_state)

    def transition(self, old_state: dict[str, Any], new_state: dict[str, Any]) -> Any:
        from torch.distributed.tensor import Replicate

        t = self.inner.transition(old_state, new_state)
        return from_local(t, self.param, [Replicate()], tuple(t.shape))

    # ---------------------------------------------------------------- maps
    def _local_basis(self, state: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
        basis = self.inner.basis_like(state, torch.empty(0, dtype=dtype, device=self.param.to_local().device))
        return basis[self.ctx.row_offset:self.ctx.row_stop] if self.side == "left" else basis

    def down(self, state: dict[str, Any], grad2d: Any, draw: int | None = None) -> Any:
        """This rank's rows (right) or the all-reduced sum (left) of ``down``; ``draw`` as the inner
        projector's (a gradient-free one's next subspace)."""
        from torch.distributed.tensor import Replicate, Shard

        local = grad2d.to_local()
        m, n = self.ctx.global_shape
        if self.side == "right":
            # G_i Pᵀ: rows stay on their rank
            low = self.inner.down(state, local) if draw is None else self.inner.down(state, local, draw=draw)
            placement = Shard(0) if self.ctx.sharded else Replicate()
            return from_local(low, self.param, [placement], (m, self.rank))
        if draw is not None:  # projecting ahead (Flora's accumulation): the draw's rows of P, Σ_i P_iᵀ G_i
            matrix = getattr(self.inner, "matrix", None)
            if matrix is None:
                raise NotImplementedError(f"ShardedProjector: projecting ahead (draw=) on the sharded side needs "
                                          f"{type(self.inner).__name__}.matrix(state, device, dtype, draw)")
            rows = matrix(state, local.device, local.dtype, draw)[self.ctx.row_offset:self.ctx.row_stop]
            low = kernels.project_down(local, rows, "left")
            self.ctx.all_reduce(low)
            return from_local(low, self.param, [Replicate()], (self.rank, n))
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
