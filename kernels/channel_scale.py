"""Channel-wise scaling of a full gradient: the memory-bound passes of APOLLO and Fira.

"APOLLO: SGD-like Memory, AdamW-level Performance", Zhu et al. 2024, arXiv:2412.05270;
"Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?", Chen et al. 2024,
arXiv:2410.01623.

Both methods update a weight with the *full* gradient ``G`` (m×n) scaled per channel by factors
read off a low-rank optimizer, optionally minus a back-projected low-rank part ``B = up(R)``
(Fira's residual ``G − B``). Two passes over ``G`` do everything that touches m×n memory:

* ``channel_sumsq(grad, base=None, channel_dim)`` — one read of ``G`` (and ``B``): the per-channel
  sums of squares ``Σ (G − B)²`` that give the norm of the scaled update (the norm-growth limiter)
  without materializing it;
* ``channel_scale_update_(param, grad, scales, channel_dim, alpha, decay, base=None)`` — one read of
  ``G`` (and ``B``), one read and write of the weight:
  ``param ← decay·param + alpha·scales[c]·(G − B)``.

``channel_dim=0``: one channel per row (scales has m entries); ``channel_dim=1``: one per column
(n entries). Math in fp32 (fp64 for fp64 inputs); the weight is rounded once to its dtype.

Backends: a Triton kernel per pass for fp32/bf16/fp16 tensors on the Triton backend
(``lrgrad.kernels.triton_channel_scale``); the plain torch references below otherwise (and as
the tests' oracle).
"""

from __future__ import annotations

import torch

from lrgrad._checks import check_choice, check_tensor
from lrgrad.kernels.dispatch import backend_for

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(grad: torch.Tensor, base: torch.Tensor | None, channel_dim: int) -> None:
    check_tensor("grad", grad, ndim=2)
    if base is not None:
        check_tensor("base", base)
        if base.shape != grad.shape:
            raise ValueError(f"Invalid base: shape {tuple(base.shape)} differs from grad {tuple(grad.shape)}")
    check_choice("channel_dim", channel_dim, (0, 1))


# ---------------------------------------------------------------------- references
def channel_sumsq_reference(grad: torch.Tensor, base: torch.Tensor | None = None, channel_dim: int = 0) -> torch.Tensor:
    """Per-channel ``Σ (grad − base)²`` (plain torch): an m-vector (``channel_dim=0``) or n-vector."""
    acc = _accumulate_dtype(grad.dtype)
    x = grad.to(acc)
    if base is not None:
        x = x - base.to(acc)
    return (x * x).sum(dim=1 - channel_dim)


def channel_scale_update_reference(
    param: torch.Tensor, grad: torch.Tensor, scales: torch.Tensor, channel_dim: int, alpha: float, decay: float,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """``param ← decay·param + alpha·scales[c]·(grad − base)`` in place (plain torch)."""
    acc = _accumulate_dtype(grad.dtype)
    x = grad.to(acc)
    if base is not None:
        x = x - base.to(acc)
    s = scales.to(acc)
    x = x * (s[:, None] if channel_dim == 0 else s[None, :])
    work = param if param.dtype == acc else param.to(acc)
    work.mul_(decay).add_(x, alpha=alpha)
    if work is not param:
        param.copy_(work)
    return param


# ---------------------------------------------------------------------- entry points
def channel_sumsq(grad: torch.Tensor, base: torch.Tensor | None = None, channel_dim: int = 0) -> torch.Tensor:
    """Per-channel sums of squares of ``grad − base`` (``base`` optional), in fp32 (fp64 for fp64).

    Triton backend: one pass, each program reduces a block of channels over the other axis.
    """
    _check(grad, base, channel_dim)
    if (
        backend_for(grad) == "triton" and grad.numel()
        and grad.dtype in _TRITON_DTYPES and (base is None or (base.dtype in _TRITON_DTYPES
                                                               and base.device == grad.device))
    ):
        from lrgrad.kernels import triton_channel_scale

        return triton_channel_scale.channel_sumsq(grad, base, channel_dim)
    return channel_sumsq_reference(grad, base, channel_dim)


def channel_scale_update_(
    param: torch.Tensor, grad: torch.Tensor, scales: torch.Tensor, channel_dim: int, alpha: float, decay: float,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """``param ← decay·param + alpha·scales[c]·(grad − base)`` in place; returns ``param``.

    ``scales`` holds one factor per channel (rows for ``channel_dim=0``, columns for 1). Triton
    backend: one elementwise pass over 2-D tiles, fp32 math, one rounding to ``param.dtype``.
    """
    _check(grad, base, channel_dim)
    if not isinstance(param, torch.Tensor) or param.shape != grad.shape:
        raise ValueError(f"Invalid param: expected a tensor of shape {tuple(grad.shape)}, got "
                         f"{tuple(param.shape) if isinstance(param, torch.Tensor) else type(param).__name__}")
    channels = grad.shape[channel_dim]
    if not isinstance(scales, torch.Tensor) or scales.shape != (channels,):
        raise ValueError(f"Invalid scales: expected a vector of {channels} channel factors, got "
                         f"{tuple(scales.shape) if isinstance(scales, torch.Tensor) else type(scales).__name__}")
    tensors = (param, grad, scales) + (() if base is None else (base,))
    if (
        backend_for(param) == "triton" and grad.numel()
        and all(t.dtype in _TRITON_DTYPES and t.device == param.device for t in tensors)
    ):
        from lrgrad.kernels import triton_channel_scale

        return triton_channel_scale.channel_scale_update_(param, grad, scales, channel_dim, alpha, decay, base)
    return channel_scale_update_reference(param, grad, scales, channel_dim, alpha, decay, base)


__all__ = ["channel_scale_update_", "channel_scale_update_reference", "channel_sumsq", "channel_sumsq_reference"]
