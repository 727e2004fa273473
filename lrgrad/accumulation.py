"""Flora's compressed gradient accumulation.

"Flora: Low-Rank Adapters Are Secretly Gradient Compressors",
Hao, Cao & Mou 2024, arXiv:2402.03293.

Ordinary accumulation keeps an m x n ``.grad`` per matrix across the micro-batches
of a window. With a projector whose subspace does not depend on the gradient
(``gradient_free``: Flora's seeded ``RandomProjector``) the matrix ``P`` the next
optimizer step will use is known *before* any gradient of the window exists, so
each micro-batch's gradient can be compressed as soon as it is complete and the
full gradient freed:

    acc  <- acc + down_P(g_i)        (r x n or m x r, per micro-batch, in a backward hook)
    step:  u = rule(acc)             (the optimizer's rule, fed directly)

What is exact: ``down_P`` is linear, so ``Σ_i down_P(g_i) = down_P(Σ_i g_i)`` - the
rule receives the same low-rank gradient as after ordinary accumulation, and
the weights match ordinary accumulation with the same optimizer to float
rounding (only the summation order differs). The compressed sum is fed to the
rule directly rather than decompressed into ``.grad``: for Gaussian ``P``,
``down(up(R)) = R P Pᵀ ≠ R``, so a round trip through ``.grad`` would not be exact.

Between micro-batches each compressed param holds one low-rank buffer (r x n in
the compute dtype) instead of its m x n gradient; the full gradient exists only
transiently while its own micro-batch's backward produces it. Params that are
not compressed (full-rank params, or projected params whose projector needs the
gradient, e.g. GaLore's SVD, or whose update reads the full gradient, e.g. APOLLO's
``full_rank="apollo"``) accumulate into ``.grad`` as usual and are stepped
by the wrapped optimizer's ``step()``.

Not supported: global-norm clipping of the full gradient (its norm is not
recoverable from the compressed sum) and closures.

**DDP**: the hooks fire before DDP's all-reduce, so run *every* micro-batch of the
window inside ``ddp_model.no_sync()`` and call :meth:`CompressedAccumulator.all_reduce`
before ``step()``: it averages the compressed sums (every rank drew the same ``P``) and the
``.grad`` of the other params over the ranks. Without ``no_sync`` DDP writes its averaged
gradient back into params whose hook already compressed and freed it; ``step()`` refuses
that (``ValueError``) before writing anything, instead of stepping those params twice. With
``no_sync`` but without ``all_reduce`` each rank would step its replica from its own half of the
batch and the replicas would drift apart: the first ``step()`` of a multi-process run that did not
call ``all_reduce`` compares the ranks (one all-reduce of four numbers, once) and refuses when they
hold the same weights but not the same compressed sums. Independent runs that share an
initialization on purpose pass ``check_replicas=False``.

Usage::

    opt = lrgrad.FloraAdamW(lrgrad.param_groups(model, rank=128), lr=1e-3)
    acc = lrgrad.CompressedAccumulator(opt)
    for window in loader:
        for micro in window:
            (loss_fn(model, micro) / len(window)).backward()
        acc.step()
        acc.zero_grad()
"""

from __future__ import annotations

from typing import Any

import torch

from lrgrad.dtensor import is_dtensor
from lrgrad.optim.lowrank import LowRankOptimizer


def _moments(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """A fingerprint of ``tensors``: their sum and sum of squares in fp64 (equal on replicas)."""
    return [sum(t.double().sum() for t in tensors), sum(t.double().square().sum() for t in tensors)]


class CompressedAccumulator:
    """Accumulate compressed (low-rank) gradients across micro-batches (Flora, arXiv:2402.03293)."""

    def __init__(self, optimizer: LowRankOptimizer, check_replicas: bool = True):
        if not isinstance(optimizer, LowRankOptimizer):
            raise TypeError(f"Invalid optimizer: expected an lrgrad optimizer, got {type(optimizer).__name__}")
        if not isinstance(check_replicas, bool):
            raise TypeError(f"Invalid check_replicas: expected a bool, got {type(check_replicas).__name__}")
        self.optimizer = optimizer
        # the first step of a multi-process run without all_reduce() checks that replicas stay replicas
        self._check_replicas = check_replicas
        self._reduced = False
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}  # id -> (param, sum, draw)
        self._handles = []
        self.compressed_params: list[torch.Tensor] = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                # a basis that depends on the summed gradient (SVD), or an update that reads the full
                # gradient (APOLLO/Fira): accumulate in .grad and step with optimizer.step()
                if not (p.requires_grad and optimizer.can_compress(p, group)):
                    continue
                self.compressed_params.append(p)
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
        if not self.compressed_params:
            raise ValueError(
                "Invalid optimizer: no projected parameter uses a gradient-free projector "
                "(e.g. projector='random' / FloraAdamW); nothing to compress"
            )

    # ------------------------------------------------------------------ hooks
    @torch.no_grad()
    def _hook(self, param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        self.optimizer.check_grad(grad)
        entry = self._buffers.get(id(param))
        # projected into the subspace the next optimizer step will use (maximize applied: linear)
        low, draw = self.optimizer.compress(param, self.optimizer.group_of(param), grad,
                                            draw=entry[2] if entry is not None else None)
        if entry is None:
            self._buffers[id(param)] = (param, low, draw)
        else:
            entry[1].add_(low)
        param.grad = None  # the full gradient is not kept across micro-batches

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def all_reduce(self, group: Any = None) -> None:
        """DDP: average the compressed sums and every other param's ``.grad`` over the ranks of
        ``group`` (default: the whole world). Call after the window's last backward (all run under
        ``ddp_model.no_sync()``) and before :meth:`step`."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("Invalid call: all_reduce needs torch.distributed.init_process_group() first")
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if any(is_dtensor(p) for p in params):
            raise ValueError("Invalid call: all_reduce on FSDP2 (DTensor) params - FSDP2 reduce-scatters the "
                             "gradients before the hooks run; step() directly")
        world = dist.get_world_size(group)
        tensors = self.buffers() + [p.grad for p in params if p.grad is not None and id(p) not in self._buffers]
        for t in tensors:
            dist.all_reduce(t, group=group)
            t.div_(world)
        self._reduced = True

    @torch.no_grad()
    def step(self) -> None:
        """Step the compressed params with their accumulated low-rank gradients, then
        every other param through the optimizer's ``step()`` (ordinary ``.grad``)."""
        late = [param for param, _, _ in self._buffers.values() if param.grad is not None]
        if late:
            shapes = ", ".join(str(tuple(p.shape)) for p in late[:3]) + (", ..." if len(late) > 3 else "")
            raise ValueError(
                f"Invalid setup for CompressedAccumulator: a gradient was written into {len(late)} compressed "
                f"params ({shapes}) after their hook compressed and freed it - DistributedDataParallel's all-reduce, "
                "which runs after the hooks; stepping would use each rank's local sum and step those params a second "
                "time from .grad. Under DDP run every micro-batch of the window inside ddp_model.no_sync() and call "
                "acc.all_reduce() before acc.step()"
            )
        self._refuse_unreduced_replicas()
        opt = self.optimizer
        staged = [opt.stage_compressed(param, opt.group_of(param), low, draw)
                  for param, low, draw in self._buffers.values()]
        self._buffers.clear()
        self._reduced = False
        opt.apply_staged([item for item in staged if item is not None])
        opt.step()  # full-rank and uncompressed params; compressed ones have grad None and are skipped

    @torch.no_grad()
    def _refuse_unreduced_replicas(self) -> None:
        """Once, at the first step of a multi-process run whose window was not all-reduced: refuse when
        every rank holds the same weights (DDP replicas) but not the same compressed sums, which means
        ``no_sync`` without ``all_reduce``: stepping would train each replica on its own shard of the batch.
        Processes that hold different weights (not replicas) pass; FSDP2 (DTensor) reduces in its hooks."""
        import torch.distributed as dist

        check, self._check_replicas = self._check_replicas, False
        params = [param for param, _, _ in self._buffers.values()]
        if (not check or self._reduced or not params or not (dist.is_available() and dist.is_initialized())
                or dist.get_world_size() == 1 or any(is_dtensor(p) for p in params)):
            return
        local = torch.stack(_moments(params) + _moments(self.buffers()))
        both = torch.cat([local, -local])  # max and -min in one all-reduce
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        same = both[:4] == -both[4:]
        if bool(same[:2].all()) and not bool(same[2:].all()):
            raise ValueError(
                "Invalid setup for CompressedAccumulator: every process holds the same weights but its own "
                "compressed gradient sums: the window was run under ddp_model.no_sync() and acc.all_reduce() was "
                "not called, so each replica would step on its own shard of the batch and the replicas would "
                "drift apart. Call acc.all_reduce() before acc.step(); for independent runs that share an "
                "initialization on purpose pass CompressedAccumulator(opt, check_replicas=False)"
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the compressed sums and zero the optimizer's remaining gradients."""
        self._reduced = False
        self._buffers.clear()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ introspection
    def buffers(self) -> list[torch.Tensor]:
        """The compressed sums of the current window (e.g. to all-reduce under DDP)."""
        return [low for _, low, _ in self._buffers.values()]

    def buffer_bytes(self) -> int:
        """Bytes held by the compressed sums."""
        return sum(low.numel() * low.element_size() for low in self.buffers())

    def remove(self) -> None:
        """Remove the gradient hooks (the optimizer is usable on its own again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._buffers.clear()
