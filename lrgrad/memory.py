"""Exact optimizer-state accounting."""

from __future__ import annotations

import torch

from lrgrad.experts import state_tensors


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in ``optimizer.state`` tensors (each storage counted once).

    DTensor states (FSDP2) count this rank's shard. Shared buffers (e.g. a DCT basis
    shared by layers of one size) are reported
    by the optimizer's ``shared_state_bytes()`` when it has one, and added here.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for state in optimizer.state.values():
        for _, value in state_tensors(state):  # an expert stack's state: its experts' tensors
            if isinstance(value, torch.Tensor) and hasattr(value, "to_local"):
                value = value.to_local()  # a sharded (FSDP2) state: this rank's bytes
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                key = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
                if key in seen:
                    continue
                seen.add(key)
                total += value.untyped_storage().nbytes()
    shared = getattr(optimizer, "shared_state_bytes", None)
    return total + (shared() if callable(shared) else 0)
