"""DTensor helpers for FSDP2 (``Shard(0)`` parameters): layer 0, imports only torch.

FSDP2's ``fully_shard`` turns each parameter into a ``DTensor`` sharded along
dim 0 on a 1-D device mesh. Row ``i`` of a gradient then lives on one rank
only; :class:`ShardContext` tells a projector which rows are local and gives it
the collectives a sharded refresh needs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
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


def shard_block_state(like: Any, block: int, moments: tuple[tuple[str, bool], ...]) -> dict[str, Any]:
    """Zero 8-bit blockwise state for a DTensor moment ``like`` (FSDP2): ``{key}_codes`` are
    DTensors laid out like ``like`` (int8 for signed maps, uint8 otherwise) and
    ``{key}_absmax`` hold the fp32 maximum of each block of ``block`` consecutive *local*
    elements, so blocks never cross a shard and each rank quantizes alone.

    For a ``Shard(0)`` moment the block maxima are a ``Shard(0)`` DTensor of shape
    ``(world, B)``, one row per shard, ``B`` = the block count of the largest shard
    (``torch.chunk`` makes rank 0's the largest; a shorter shard leaves its tail at 0).
    DCP saves and loads them into the same world size; any other layout (another world
    size, one process: a 1-D tensor) has another shape, and
    :func:`lrgrad.distributed.load_checkpoint` refuses it by name.
    """
    from torch.distributed.tensor import Replicate, Shard

    check_row_sharded(like)
    local = like.to_local()
    placements = list(like.placements)
    if is_row_sharded(like):
        world = like.device_mesh.size()
        row_numel = like.numel() // like.shape[0] if like.shape[0] else 0
        per_rank = -(-math.ceil(like.shape[0] / world) * row_numel // block)
        absmax_shape, absmax_local = (world, per_rank), (1, per_rank)
    else:
        absmax_shape = absmax_local = (-(-like.numel() // block),)
        placements = [Replicate()]
    out: dict[str, Any] = {}
    for key, signed in moments:
        codes = torch.zeros(local.shape, dtype=torch.int8 if signed else torch.uint8, device=local.device)
        out[f"{key}_codes"] = from_local(codes, like, placements, tuple(like.shape))
        absmax = torch.zeros(absmax_local, dtype=torch.float32, device=local.device)
        out[f"{key}_absmax"] = from_local(absmax, like, [Shard(0)] if is_row_sharded(like) else placements,
                                          absmax_shape)
    return out


#: active collective logs (see :func:`count_collectives`)
_TRAFFIC_LOGS: list[list[dict[str, Any]]] = []


@contextlib.contextmanager
def count_collectives() -> Iterator[list[dict[str, Any]]]:
    """Record every collective a :class:`ShardContext` issues inside the block.

    Each entry is ``{"op", "numel", "bytes", "world", "sent"}`` where ``sent`` is the
    bytes one rank sends for it with ring algorithms: ``2(W-1)/W · bytes`` for an
    all-reduce, ``(W-1)/W · bytes`` (of the gathered result) for an all-gather.
    Used by ``experiments/bench/bench_comm.py`` and the tests to count real traffic.
    """
    log: list[dict[str, Any]] = []
    _TRAFFIC_LOGS.append(log)
    try:
        yield log
    finally:
        _TRAFFIC_LOGS.remove(log)


def _record(op: str, tensor: torch.Tensor, world: int) -> None:
    if not _TRAFFIC_LOGS:
        return
    nbytes = tensor.numel() * tensor.element_size()
    factor = 2 * (world - 1) / world if op == "all_reduce" else (world - 1) / world
    entry = {"op": op, "numel": tensor.numel(), "bytes": nbytes, "world": world, "sent": factor * nbytes}
    for log in _TRAFFIC_LOGS:
        log.append(entry)


def grad_code(t: torch.Tensor) -> torch.Tensor:
    """2 if ``t`` holds a NaN/Inf, else 1 if it holds a nonzero entry, else 0 (an fp32 scalar tensor):
    ordered so that the max over shards is the code of the whole matrix."""
    return torch.where(torch.isfinite(t).all(), t.ne(0).any().to(torch.float32), torch.tensor(2.0, device=t.device))


class LocalContext:
    """The single-shard :class:`ShardContext`: all rows are local and collectives are no-ops.

    Lets one implementation of a sharded algorithm serve the single-process path too
    (e.g. :func:`lrgrad.projectors.svd.sketch_basis`), so both compute the same thing.
    """

    sharded = False
    world = 1

    def __init__(self, num_rows: int):
        self.row_offset, self.row_stop = 0, num_rows

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor

    def all_gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        return local

    def all_finite(self, local: torch.Tensor) -> bool:
        return bool(torch.isfinite(local).all())

    def finite_and_nonzero(self, local: torch.Tensor) -> tuple[bool, bool]:
        code = float(grad_code(local))
        return code < 2, code >= 1


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

            _record("all_reduce", tensor, self.world)
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX,
                            group=self.group)
        return tensor

    def all_gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """The full ``(m, ...)`` tensor from every rank's rows ``[row_offset, row_stop)``
        (uneven shards: each rank pads to ``ceil(m / W)`` rows for the collective)."""
        if not (self.sharded and self.world > 1):
            return local
        import torch.distributed as dist

        m = self.global_shape[0]
        chunk = math.ceil(m / self.world)
        padded = local.new_zeros((chunk, *local.shape[1:]))
        padded[:local.shape[0]] = local
        parts = [torch.zeros_like(padded) for _ in range(self.world)]
        _record("all_gather", padded.new_empty((chunk * self.world, *local.shape[1:])), self.world)
        dist.all_gather(parts, padded, group=self.group)
        rows = [part[: b - a] for part, (a, b) in zip(parts, (row_range(m, self.world, r)
                                                              for r in range(self.world)))]
        return torch.cat(rows)

    def all_finite(self, local: torch.Tensor) -> bool:
        """True on every rank iff no shard has a NaN/Inf (all ranks take the same branch)."""
        bad = (~torch.isfinite(local)).any().to(torch.float32).reshape(1)
        return not bool(self.all_reduce(bad, op="max").item())

    def finite_and_nonzero(self, local: torch.Tensor) -> tuple[bool, bool]:
        """``(no shard has a NaN/Inf, some shard has a nonzero entry)``, the same on every rank, from the
        one-element vote :meth:`all_finite` casts (the max over ranks of :func:`grad_code`)."""
        code = float(self.all_reduce(grad_code(local).reshape(1), op="max").item())
        return code < 2, code >= 1


__all__ = ["LocalContext", "ShardContext", "count_collectives", "shard_block_state",
           "check_row_sharded", "from_local", "is_dtensor", "is_row_sharded", "low_rank_zeros",
           "row_range"]
