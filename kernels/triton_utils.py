"""Small Triton helpers shared by the kernels."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from lrgrad.kernels.dispatch import interpreting


def fix_bf16() -> bool:
    """Whether kernels must round bf16 stores themselves: Triton 3.9's CPU interpreter converts
    fp32 → bf16 by truncation, where the GPU (and torch) round to nearest even."""
    return interpreting()


def device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``tensor``'s GPU the current device for a launch.

    Triton launches on the *current* device and stream; without this, a tensor on cuda:1 with
    cuda:0 current would run on the wrong GPU (wrong results or an illegal address). CPU tensors
    (the interpreter) need no guard.
    """
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


@triton.jit
def to_out(x, dtype: tl.constexpr, FIX_BF16: tl.constexpr):
    """``x.to(dtype)`` rounded to nearest even, also under the interpreter."""
    if FIX_BF16:
        if dtype == tl.bfloat16:
            x = x.to(tl.float32)
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + (0x7FFF + ((bits >> 16) & 1))
            bits = (bits >> 16) << 16  # now exactly representable: the truncating cast is exact
            x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)
