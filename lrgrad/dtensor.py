"""DTensor helpers for FSDP2 (``Shard(0)`` parameters): layer 0, imports only torch.

FSDP2's ``fully_shard`` turns each parameter into a ``DTensor`` sharded along
dim 0 on a 1-D device mesh. Row ``i`` of a gradient then lives on one rank
only; :class:`ShardContext` tells a projector which rows are local and gives it
the collectives a sharded refresh needs.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (without importing it eagerly)."""
    if not isinstance(t, torch.Tensor) or type(t) is torch.Tensor or type(t).__name__ != "DTensor":
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def check_row_sharded(param: Any) -> None:
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = param.device_mesh, param.placements
    if mesh.ndim != 1 or len(placements) != 1 or not (
        isinstance(placements[0], Replicate) or (isinstance(placements[0], Shard) and placements[0].dim == 0)
    ):
        raise ValueError(
            f"Invalid params: lrgrad projects DTensor parameters sharded as (Shard(0),) or replicated on a "
            f"1-D mesh (FSDP2's layout); got placements {placements} on a {mesh.ndim}-D mesh"
        )


def is_row_sharded(param: Any) -> bool:
    from torch.distributed.tensor import Shard

    return isinstance(param.placements[0], Shard)


def row_range(num_rows: int, world: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a ``Shard(0)`` DTensor on ``rank`` (``torch.chunk``'s rule, uneven-safe)."""
    chunk = math.ceil(num_rows / world) if world else 0
    start = min(rank * chunk, num_rows)
    return start, min(start + chunk, num_rows)


def from_local(local: torch.Tensor, like: Any, placements: list, shape: tuple[int, ...]) -> Any:
    from torch.distributed.tensor import DTensor

    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, like.device_mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)


def low_rank_zeros(param: Any, shape: tuple[int, int], side: str, dtype: torch.dtype) -> Any:
    """Zeros shaped like the low-rank gradient of a DTensor ``param``.

    ``side="right"`` (m x r): ``Shard(0)`` like the weight, so the moments shard
    with it; ``side="left"`` (r x n): replicated (every rank holds the all-reduced ``R``).
    """
    from torch.distributed.tensor import Replicate, Shard

    check_row_sharded(param)
    device = param.to_local().device
    if side == "right" and is_row_sharded(param):
        local = torch.zeros(param.to_local().shape[0], shape[1], dtype=dtype, device=device)
        return from_local(local, param, [Shard(0)], shape)
    return from_local(torch.zeros(shape, dtype=dtype, device=device), param, [Replicate()], shape)


class ShardContext:
    """What a projector needs to refresh from a row shard ``G_i`` of ``G`` (m x n)."""

    def __init__(self, param: Any):
        check_row_sharded(param)
        self.mesh = param.device_mesh
        self.global_shape = (param.shape[0], param.numel() // param.shape[0])
        self.sharded = is_row_sharded(param)
        self.group = self.mesh.get_group()
        self.world = self.mesh.size() if self.sharded else 1
        rank = self.mesh.get_local_rank() if self.sharded else 0
        self.row_offset, self.row_stop = row_range(self.global_shape[0], self.world, rank)
        if not self.sharded:
            self.row_offset, self.row_stop = 0, self.global_shape[0]

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce over the shards (a no-op for a replicated param)."""
        if self.sharded and self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX,
                            group=self.group)
        return tensor

    def all_finite(self, local: torch.Tensor) -> bool:
        """True on every rank iff no shard has a NaN/Inf (all ranks take the same branch)."""
        bad = (~torch.isfinite(local)).any().to(torch.float32).reshape(1)
        return not bool(self.all_reduce(bad, op="max").item())


__all__ = ["ShardContext", "check_row_sharded", "from_local", "is_dtensor", "is_row_sharded", "low_rank_zeros",
           "row_range"]
