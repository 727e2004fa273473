"""The step counts torch's fused Adam kernels read: one fp32 0-d tensor per param, built without a host sync.

lrgrad keeps ``state["step"]`` as a Python int (checkpoints stay plain), so every fused call turns the
counts into tensors on the params' device. ``torch.tensor(steps, device="cuda")`` copies from pageable
host memory, and a blocking copy waits for everything already queued on the stream - the backward
pass - so each call would stall the host once per step, and the GPU would then idle while the host
launches the optimizer's kernels. On a GPU the counts are therefore written by a device fill when they
are all equal (every param stepped together, the common case) and otherwise copied from pinned memory
with ``non_blocking=True`` (torch's caching host allocator keeps the buffer until the copy has run).
CPU tensors keep the plain ``torch.tensor`` (no queue to wait for), the reference of the others.
"""

from __future__ import annotations

import torch


def step_counts_reference(steps: list[int], device: torch.device | str) -> list[torch.Tensor]:
    """``torch.tensor(steps)`` on ``device``, one 0-d fp32 view per count (blocking on a GPU)."""
    return list(torch.tensor([float(s) for s in steps], dtype=torch.float32, device=device).unbind())


def step_counts(steps: list[int], device: torch.device | str) -> list[torch.Tensor]:
    """:func:`step_counts_reference` (equal values), with no host sync on a GPU."""
    device = torch.device(device)
    if device.type == "cpu" or not steps:
        return step_counts_reference(steps, device)
    if all(s == steps[0] for s in steps):
        return list(torch.full((len(steps),), float(steps[0]), dtype=torch.float32, device=device).unbind())
    host = torch.tensor([float(s) for s in steps], dtype=torch.float32)
    if device.type == "cuda" and torch.cuda.is_available():
        host = host.pin_memory()
    return list(host.to(device, non_blocking=True).unbind())
